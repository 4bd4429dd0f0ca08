"""LayerCollapse fine-tuning of a prepared model: regulariser, AdamLC, self-distillation, schedule.

- Regulariser (Eq. 9): L_reg = lc·Σ (1 − α)² over the prepared slopes; ∂L_reg/∂α = 2·lc·(α − 1).
- AdamLC (App. B, Algorithm 2): Adam, then for the slopes only the decoupled pull
  θ ← θ − 2·(θ − 1)·lc·lr. With no loss gradient (m = 0) the slope's distance to 1 shrinks by
  the factor (1 − 2·lc·lr) every step: θ_t − 1 = (1 − 2·lc·lr)^t·(θ_0 − 1).
- Self-distillation (Eq. 21): ½·CE(p, labels) + ½·KL(p̃ ‖ p) + L_reg, p̃ the original model's
  prediction. With AdamLC the pull lives in the optimizer, so L_reg is left out of the loss.
- Schedule (App. D.2.1): one pair at a time, from the last; the next pair's pull starts when the
  active pair's L_reg falls below ``threshold`` (1e-4). Finished pairs keep being pulled.

Where AdamLC stops: the Adam step moves a slope by about lr·m̂/√v̂ against the pull 2·lc·lr·(α − 1),
so while the loss keeps pushing back a slope settles near |1 − α| ≈ (m̂/√v̂)/(2·lc), independent
of lr. A slope that passed the schedule's test is within √(threshold/lc) of 1; collapse the pairs
that passed with ``fxfuse.optimize(..., tau=max_slope_deviation(gm, passed))``, which measures the
error of each approximate collapse and reports it beside the bounds of Eq. 4–5. With
2·lc·lr ≥ 1 the pull overshoots 1 (and diverges from 2·lc·lr > 2 on), so the schedule refuses it.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .errors import InputError
from .prepare import CollapsePair, collapse_pairs, prepared_pairs, slopes
from .progress import progress as progress_bar


def collapse_regularizer(gm: fx.GraphModule, lc: float, pairs: Sequence[CollapsePair] | None = None) -> torch.Tensor:
    """Eq. 9 summed over the slopes of ``pairs`` (default all prepared): lc·Σ (1 − α)²."""
    return lc * sum((((1 - a) ** 2).sum() for a in slopes(gm, pairs)), torch.zeros(()))


def self_distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                           reg: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Eq. 21: ½·CE(logits, labels) + ½·KL(softmax(teacher) ‖ softmax(logits)) + reg (batch means)."""
    ce = F.cross_entropy(logits, labels)
    kl = F.kl_div(F.log_softmax(logits, -1), F.log_softmax(teacher_logits.detach(), -1),
                  log_target=True, reduction="batchmean")
    return 0.5 * ce + 0.5 * kl + reg


class AdamLC(torch.optim.Adam):
    """Algorithm 2: Adam (lines 7–13, ``torch.optim.Adam`` with its options), then
    θ ← θ − 2·(θ − 1)·lc·lr (line 15) for the groups with ``lc`` > 0.

    Put the slopes in a group of their own with ``lc`` set (``collapse_param_groups`` does); the
    other parameters take a plain Adam step. Parameters without a gradient are left alone. Each
    step checks 2·lc·lr < 1 (groups' lc and lr may change between steps, as ``finetune_collapse``
    and learning-rate schedulers do).
    """

    def __init__(self, params, lr: float = 1e-3, lc: float = 0.0, **adam):
        if lc < 0:
            raise InputError(f"AdamLC needs lc ≥ 0; got lc={lc}.")
        self.default_lc = lc
        super().__init__(params, lr=lr, **adam)

    def add_param_group(self, group: dict) -> None:
        group.setdefault("lc", self.default_lc)
        super().add_param_group(group)

    @torch.no_grad()
    def step(self, closure: Callable | None = None):
        for group in self.param_groups:
            _check_pull(group["lc"], group["lr"])
        loss = super().step(closure)
        for group in self.param_groups:
            if group["lc"]:
                for p in group["params"]:
                    if p.grad is not None:
                        p.sub_(2 * group["lc"] * group["lr"] * (p - 1))
        return loss


def _check_pull(lc: float, lr: float) -> None:
    if 2 * lc * lr >= 1:
        raise InputError(f"2·lc·lr = {2 * lc * lr:g} ≥ 1: AdamLC's pull θ ← θ − 2·lc·lr·(θ − 1) would reach or "
                         "overshoot α = 1 in one step (past 2 it diverges). Lower lc or lr (finetune_collapse's "
                         "default lc = 200 with lr = 5e-4 gives 0.2).")


def collapse_param_groups(gm: fx.GraphModule, lc: float, pairs: Sequence[CollapsePair] | None = None) -> list[dict]:
    """Param groups for AdamLC: one per prepared pair (its slope, ``lc``), then every other parameter (lc = 0)."""
    pairs = collapse_pairs(gm) if pairs is None else list(pairs)
    groups = [{"params": [a], "lc": lc, "pair": p} for p, a in zip(pairs, slopes(gm, pairs))]
    taken = {id(g["params"][0]) for g in groups}
    return groups + [{"params": [q for q in gm.parameters() if id(q) not in taken], "lc": 0.0}]


def max_slope_deviation(gm: fx.GraphModule, pairs: Sequence[CollapsePair] | None = None) -> float:
    """max |1 − α| over the slopes (0 for no pairs): ``fxfuse.optimize(tau=...)`` collapses a pair when it is ≤ τ."""
    return max(((1 - a.detach()).abs().max().item() for a in slopes(gm, pairs)), default=0.0)


def finetune_collapse(prepared: fx.GraphModule, teacher: nn.Module, batches: Iterable, *, epochs: int,
                      lr: float = 5e-4, lc: float = 200.0, threshold: float = 1e-4, tau: float | None = None,
                      callback: Callable[[int, fx.GraphModule], dict | None] | None = None,
                      progress: bool = True) -> list[dict]:
    """Fine-tune ``prepared`` with Eq. 21 and AdamLC, one pair at a time from the last (App. D.2).

    ``batches`` is re-iterated every epoch and yields (inputs, labels). lr = 5e-4 is App. D.2.2's;
    lc = 200 pulls a slope by 2·lc·lr = 20 % of its distance to 1 per step (AdamLC's lc multiplies
    lr, so it is not the paper's coupled-loss lc of 0.05–5). The active pair's slope is
    pulled (its group's lc) until lc·Σ(1 − α)² < ``threshold``; then the next pair, earlier in the
    graph, starts. Training stops after ``epochs``, or once every pair has passed and every slope
    is within ``tau`` of 1 (default √(threshold/lc), the deviation at which a pair passes).
    ``callback(epoch, prepared)`` runs after each epoch (in eval mode) and may return metrics for
    the history. Returns one dict per epoch: mean loss, the active pair, the pairs done (in the
    order they passed), max|1 − α|, and the callback's metrics. A progress bar (epochs; step, pairs
    done, loss) on a terminal unless ``progress=False`` or ``FXFUSE_QUIET=1``.
    """
    if epochs < 1 or lc <= 0 or threshold <= 0:
        raise InputError(f"finetune_collapse needs epochs ≥ 1, lc > 0, threshold > 0; got {epochs}, {lc}, {threshold}.")
    _check_pull(lc, lr)  # before any training (AdamLC checks again at each step)
    tau = math.sqrt(threshold / lc) if tau is None else tau
    pending = list(reversed(prepared_pairs(prepared)))  # last pair first
    groups = collapse_param_groups(prepared, 0.0, pending)
    optimizer = AdamLC(groups, lr=lr)
    by_pair = {g["pair"]: g for g in groups if "pair" in g}
    done: list[CollapsePair] = []
    by_pair[pending[0]]["lc"] = lc
    teacher.eval()
    history = []
    bar = progress_bar(desc="fxfuse finetune_collapse", total=epochs, unit="epoch", show=progress)
    for epoch in range(epochs):
        prepared.train()
        losses = []
        for step, (x, y) in enumerate(batches):
            with torch.no_grad():
                target = teacher(x)
            loss = self_distillation_loss(prepared(x), y, target)  # L_reg: decoupled, in AdamLC
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            while pending and collapse_regularizer(prepared, lc, pending[:1]).item() < threshold:
                done.append(pending.pop(0))
                if pending:
                    by_pair[pending[0]]["lc"] = lc
            bar.set_postfix_str(f"step {step + 1} pairs {len(done)}/{len(done) + len(pending)} "
                                f"loss {sum(losses[-20:]) / len(losses[-20:]):.4f}")
        prepared.eval()
        record = {"epoch": epoch + 1, "loss": sum(losses) / max(len(losses), 1), "done": [p.slope for p in done],
                  "active": pending[0].slope if pending else None, "max_deviation": max_slope_deviation(prepared)}
        record.update((callback(epoch + 1, prepared) or {}) if callback else {})
        history.append(record)
        bar.update()
        if not pending and record["max_deviation"] <= tau:
            break
    bar.close()
    return history
