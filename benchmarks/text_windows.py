"""Helpers shared by the language-model tie benchmarks (tie_decoder.py, tie_text.py): random windows
of a token stream and the bytes a ``torch.save`` checkpoint takes."""
from __future__ import annotations

import io

import torch
from torch import nn


def windows(data: torch.Tensor, count: int, length: int, seed: int) -> torch.Tensor:
    """``count`` windows of ``length`` consecutive tokens of ``data`` at random starts (a generator
    seeded with ``seed``, so the same arguments give the same windows), as int64, shape (count, length)."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(data) - length, (count,), generator=g)
    return data[starts[:, None] + torch.arange(length)].long()


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of ``torch.save(model.state_dict())``: a tensor shared under several names is stored once."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell()
