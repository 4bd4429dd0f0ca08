"""drop_identity: nodes that compute their input in eval mode are bypassed.

``nn.Identity``, eval-mode ``nn.Dropout``/``Dropout1d/2d/3d``/``AlphaDropout`` and
``F.dropout(..., training=False)``: y = x exactly, so every user of y reads x instead. What is
left of them after the other passes (timm blocks keep several per block: ``ls1``, ``drop_path``,
``attn_drop``, ``proj_drop``, ...) costs a Python call each in eager mode.
"""
from __future__ import annotations

import torch.fx as fx
from torch import nn

from fxfuse.match import Chain
from fxfuse.ir import IDENTITY, view
from fxfuse.pass_manager import Candidate, Options


class DropIdentity:
    name = "drop_identity"

    def candidates(self, gm: fx.GraphModule, options: Options) -> list[Candidate]:
        ops = [view(gm, node) for node in gm.graph.nodes]
        return [Candidate(Chain([op]), nn.Identity(), tolerance=0.0) for op in ops
                if op is not None and op.kind == IDENTITY]
