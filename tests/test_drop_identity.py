import torch
import torch.nn.functional as F
from conftest import applied, optimize_and_compare
from torch import nn

import fxfuse
from fxfuse.passes import DropIdentity


class Noops(nn.Module):
    """Identity, eval Dropout and F.dropout(training=False) around layers, one value read twice."""

    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(8, 8), nn.LayerNorm(8)
        self.keep, self.drop, self.drop2d = nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.1)

    def forward(self, x):
        h = self.keep(self.fc(x))
        y = F.dropout(self.norm(h), 0.3, training=self.training)
        return self.drop(y) + h * F.relu(self.drop2d(y))


NOOP_OPS = (torch.ops.aten.dropout.default, torch.ops.aten.clone.default, torch.ops.aten.alias.default)


def test_noops_are_bypassed_and_the_function_kept(each_capture):
    x = (torch.randn(2, 3, 8),)
    gm, report = optimize_and_compare(Noops().eval(), x, passes=[DropIdentity()])
    if each_capture == "fx":
        assert len(applied(report, "drop_identity")) == 4
        assert {n.target for n in gm.graph.nodes if n.op == "call_module"} == {"fc", "norm"}
    else:  # torch.export already leaves nn.Identity out; the eval-mode dropouts stay as aten.dropout
        exported = torch.export.export(Noops().eval(), x).module()
        noops = [n for n in exported.graph.nodes if n.target in NOOP_OPS]
        assert len(noops) >= 2 and len(applied(report, "drop_identity")) == len(noops)
        assert not [n for n in gm.graph.nodes if n.target in NOOP_OPS]
    again = fxfuse.optimize(gm, (torch.randn(2, 3, 8),), passes=[DropIdentity()])
    assert not fxfuse.report_of(again).applied


class ActiveDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return F.dropout(self.fc(x), 0.5)  # training=True by default: random even in eval mode


def test_dropout_that_is_active_in_eval_is_kept():
    gm = fxfuse.optimize(ActiveDropout().eval(), passes=[DropIdentity()])
    assert not fxfuse.report_of(gm).applied
    assert any(n.target is F.dropout for n in gm.graph.nodes)
