"""The built-in demo model: what a LayerCollapse-trained network looks like (random weights).

A conv stem Conv3×3 → BatchNorm → PReLU(α=1) → Conv1×1 (composable), a wide MLP head
Linear → BatchNorm → PReLU(α=1) → Dropout → Linear (collapsible), and, to show what is left alone,
a bottleneck Linear → PReLU(α=1) → Linear (negative gain) and a PReLU with the default α = 0.25.
"""
from __future__ import annotations

import torch
from torch import nn


def demo_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.BatchNorm2d(64), nn.PReLU(64, init=1.0), nn.Conv2d(64, 16, 1),
        nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(256, 1024), nn.BatchNorm1d(1024), nn.PReLU(init=1.0), nn.Dropout(0.1), nn.Linear(1024, 128),
        nn.PReLU(),
        nn.Linear(128, 16), nn.PReLU(init=1.0), nn.Linear(16, 128),
        nn.PReLU(), nn.Linear(128, 10),
    )
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        nn.init.normal_(bn.weight, 1.0, 0.2)
        nn.init.normal_(bn.bias, 0.0, 0.2)
    return model.eval()


def demo_inputs(batch: int = 2) -> tuple[torch.Tensor]:
    return (torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1)),)
