"""The built-in demo model: what a LayerCollapse-trained network looks like (random weights), and
randomize_batchnorm, which gives random BatchNorms the statistics of trained ones (tests, benchmarks).

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


class FeedForward(nn.Module):
    """Linear → act → Linear, or SwiGLU: down(act(gate(x)) ⊙ up(x))."""

    def __init__(self, dim: int, hidden: int, act: str = "gelu"):
        super().__init__()
        self.act_name = act
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        if act == "swiglu":
            self.up = nn.Linear(dim, hidden, bias=False)
        self.act = {"gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "relu": nn.ReLU(), "silu": nn.SiLU(),
                    "swiglu": nn.SiLU(), "prelu": nn.PReLU()}[act]

    def forward(self, x):
        h = self.act(self.fc1(x))
        if self.act_name == "swiglu":
            h = h * self.up(x)
        return self.fc2(h)


class Block(nn.Module):
    """A pre-LayerNorm decoder block: causal self-attention, then a feed-forward sublayer."""

    def __init__(self, dim: int, heads: int, hidden: int, act: str):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff = FeedForward(dim, hidden, act)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff(self.ln2(x))


class TinyDecoder(nn.Module):
    """A small decoder-only (GPT-style) language model: token ids (B, T) → logits (B, T, vocab)."""

    def __init__(self, vocab: int = 96, dim: int = 64, layers: int = 6, heads: int = 4, hidden: int = 256,
                 context: int = 64, act: str = "gelu"):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(context, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden, act) for _ in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, ids):
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def randomize_batchnorm(model: nn.Module, generator: torch.Generator | None = None) -> nn.Module:
    """Give every BatchNorm (any ``_BatchNorm`` subclass, timm's BatchNormAct2d included) non-trivial
    running statistics and affine parameters, so that a fold of random weights is really tested."""
    for bn in (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)):
        with torch.no_grad():
            if bn.running_mean is not None:
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=generator) * 0.5)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=generator) * 1.5 + 0.5)
            if bn.affine:
                bn.weight.copy_(torch.randn(bn.num_features, generator=generator) * 0.2 + 1)
                bn.bias.copy_(torch.randn(bn.num_features, generator=generator) * 0.2)
    return model
