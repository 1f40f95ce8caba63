"""Hypothesis strategies for random models: CNN stages, then transformer-like stages.

A model is a list of op descriptors drawn by :func:`random_models`; the
generated ``nn.Module`` runs them in order. Besides real layers the generator
sprinkles in what the cleanup passes should find: no-op copies and casts,
identical subexpressions, and parameter-only arithmetic.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

CNN_OPS = ["conv", "bn", "relu", "gelu", "residual", "concat", "noop", "duplicate", "const-scale"]
SEQ_OPS = ["linear", "layernorm", "relu", "residual-mlp", "attention", "sdpa", "noop", "duplicate", "const-scale"]


class RandomModel(nn.Module):
    """Runs a list of (op, params) descriptors on an image batch, then on a token sequence."""

    def __init__(self, channels: int, cnn: list, seq: list, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.cnn, self.seq = cnn, seq
        self.layers = nn.ModuleDict()
        c = channels
        for i, (op, p) in enumerate(cnn):
            if op == "conv":
                groups = math.gcd(c, p["out"]) if p["grouped"] else 1
                self.layers[f"c{i}"] = nn.Conv2d(c, p["out"], p["k"], padding=p["k"] // 2, groups=groups, bias=p["bias"])
                c = p["out"]
            elif op == "bn":
                bn = nn.BatchNorm2d(c)
                bn.running_mean.uniform_(-1, 1)
                bn.running_var.uniform_(0.5, 2)
                bn.weight.data.uniform_(0.5, 1.5)
                bn.bias.data.uniform_(-0.5, 0.5)
                self.layers[f"c{i}"] = bn
            elif op == "residual":
                self.layers[f"c{i}"] = nn.Conv2d(c, c, 3, padding=1)
            elif op == "concat":
                self.layers[f"c{i}a"] = nn.Conv2d(c, p["out"], 1)
                self.layers[f"c{i}b"] = nn.Conv2d(c, p["out"], 3, padding=1)
                c = 2 * p["out"]
            elif op in ("duplicate", "const-scale"):
                self.layers[f"c{i}"] = nn.Conv2d(c, c, 1)
        d = c
        for i, (op, p) in enumerate(seq):
            if op == "linear":
                self.layers[f"s{i}"] = nn.Linear(d, p["out"], bias=p["bias"])
                d = p["out"]
            elif op == "layernorm":
                self.layers[f"s{i}"] = nn.LayerNorm(d)
            elif op == "residual-mlp":
                self.layers[f"s{i}"] = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            elif op in ("attention", "sdpa"):
                heads = p["heads"] if d % p["heads"] == 0 else 1
                self.heads = heads
                self.layers[f"s{i}"] = nn.Linear(d, 3 * d)
                self.layers[f"s{i}o"] = nn.Linear(d, d)
            elif op in ("duplicate", "const-scale"):
                self.layers[f"s{i}"] = nn.Linear(d, d)
        self.out_features = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (op, p) in enumerate(self.cnn):
            x = self._cnn_op(i, op, p, x)
        x = x.flatten(2).transpose(1, 2)  # [N, H*W, C]: a token sequence
        for i, (op, p) in enumerate(self.seq):
            x = self._seq_op(i, op, p, x)
        return x

    def _cnn_op(self, i, op, p, x):
        layer = self.layers[f"c{i}"] if f"c{i}" in self.layers else None
        if op in ("conv", "bn"):
            return layer(x)
        if op == "relu":
            return F.relu(x)
        if op == "gelu":
            return F.gelu(x)
        if op == "residual":
            return x + F.relu(layer(x))
        if op == "concat":
            return torch.cat([self.layers[f"c{i}a"](x), self.layers[f"c{i}b"](x)], dim=1)
        if op == "noop":
            return (x.contiguous() * 1 + 0).to(x.dtype)
        if op == "duplicate":
            return layer(x) + layer(x)
        if op == "const-scale":  # parameter-only arithmetic: folds to a constant weight
            return F.conv2d(x, layer.weight * 0.5 + 0.1, layer.bias)
        raise AssertionError(op)

    def _seq_op(self, i, op, p, x):
        layer = self.layers[f"s{i}"] if f"s{i}" in self.layers else None
        if op in ("linear", "layernorm"):
            return layer(x)
        if op == "relu":
            return F.relu(x)
        if op == "residual-mlp":
            return x + layer(x)
        if op in ("attention", "sdpa"):
            n, t, d = x.shape
            q, k, v = layer(x).view(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            if op == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads), dim=-1) @ v
            return x + self.layers[f"s{i}o"](y.transpose(1, 2).reshape(n, t, d))
        if op == "noop":
            return x.reshape(x.shape).clone() * 1
        if op == "duplicate":
            return torch.tanh(layer(x)) + torch.tanh(layer(x))
        if op == "const-scale":
            return F.linear(x, layer.weight.t().t() * 2, layer.bias - 1)
        raise AssertionError(op)


def _op(kinds: list[str]):
    return st.sampled_from(kinds).flatmap(
        lambda op: st.fixed_dictionaries(
            {
                "out": st.integers(2, 12),
                "k": st.sampled_from([1, 3]),
                "bias": st.booleans(),
                "grouped": st.booleans(),
                "heads": st.sampled_from([1, 2, 4]),
            }
        ).map(lambda params: (op, params))
    )


@st.composite
def random_models(draw, max_cnn: int = 5, max_seq: int = 5):
    """A ``(model, example_input)`` pair: a random CNN stage feeding a random sequence stage."""
    channels = draw(st.integers(1, 6))
    size = draw(st.integers(2, 6))
    batch = draw(st.integers(1, 2))
    cnn = draw(st.lists(_op(CNN_OPS), max_size=max_cnn))
    seq = draw(st.lists(_op(SEQ_OPS), max_size=max_seq))
    seed = draw(st.integers(0, 2**16))
    model = RandomModel(channels, cnn, seq, seed).eval()
    x = torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
    return model, (x,)
