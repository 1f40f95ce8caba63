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
        self.heads: dict[int, int] = {}  # per attention layer: its width decides
        c = channels
        for i, (op, p) in enumerate(cnn):
            if op == "conv":
                groups = math.gcd(c, p["out"]) if p["grouped"] else 1
                self.layers[f"c{i}"] = nn.Conv2d(
                    c, p["out"], p["k"], padding=p["k"] // 2, groups=groups, bias=p["bias"]
                )
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
                self.heads[i] = p["heads"] if d % p["heads"] == 0 else 1
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
            heads = self.heads[i]
            q, k, v = layer(x).view(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            if op == "sdpa":
                y = F.scaled_dot_product_attention(q, k, v)
            else:
                y = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // heads), dim=-1) @ v
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


# ----------------------------------------------------------------------------- models for structured pruning

PRUNE_CNN_BLOCKS = ["residual", "concat", "depthwise", "grouped", "expand"]
PRUNE_SEQ_BLOCKS = ["attention", "gated-mlp", "mlp"]


class PrunableNet(nn.Module):
    """A CNN (image in) or a transformer (feature sequence in) built from block descriptors, ending in a linear head.

    CNN blocks: residual (conv-bn-relu-conv-bn + x), concat of a 1x1 and a
    3x3 branch, depthwise conv with a channel multiplier, grouped conv,
    1x1 expansion; the head pools or flattens. Transformer blocks:
    multi-head attention with separate Q/K/V/O projections and optional
    grouped-query K/V (expanded per query head like LLaMA), gated MLP, plain
    MLP, each residual and optionally Pre-LN.
    """

    def __init__(self, kind: str, width: int, blocks: list, flatten: bool, norm: bool, seed: int, classes: int = 5):
        super().__init__()
        torch.manual_seed(seed)
        self.kind, self.blocks, self.flatten, self.norm = kind, blocks, flatten, norm
        self.layers = nn.ModuleDict()
        c = width
        if kind == "cnn":
            self.layers["stem"] = nn.Sequential(nn.Conv2d(3, c, 3, padding=1), _bn(c), nn.ReLU())
        else:
            self.layers["stem"] = nn.Linear(c, c)  # the residual stream is not the model input: it can shrink
        for i, (block, p) in enumerate(blocks):
            name = f"b{i}"
            if block == "residual":
                self.layers[name] = nn.Sequential(
                    nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c), nn.ReLU(), nn.Conv2d(c, c, 1), _bn(c)
                )
            elif block == "concat":
                self.layers[name + "a"] = nn.Conv2d(c, p["a"], 1)
                self.layers[name + "b"] = nn.Conv2d(c, p["b"], 3, padding=1)
                c = p["a"] + p["b"]
            elif block == "depthwise":
                self.layers[name] = nn.Sequential(
                    nn.Conv2d(c, c * p["mult"], 3, padding=1, groups=c), _bn(c * p["mult"]), nn.ReLU()
                )
                c *= p["mult"]
            elif block == "grouped":
                groups = p["groups"] if c % p["groups"] == 0 else 1
                self.layers[name] = nn.Conv2d(c, groups * p["per_group"], 3, padding=1, groups=groups)
                c = groups * p["per_group"]
            elif block == "expand":
                self.layers[name] = nn.Conv2d(c, p["out"], 1)
                c = p["out"]
            elif block == "attention":
                heads, kv = p["heads"], p["kv_heads"]
                if norm:
                    self.layers[name + "n"] = nn.LayerNorm(c)
                for proj, out in (("q", heads), ("k", kv), ("v", kv)):
                    self.layers[name + proj] = nn.Linear(c, out * p["head_dim"], bias=p["bias"])
                self.layers[name + "o"] = nn.Linear(heads * p["head_dim"], c)
            elif block in ("gated-mlp", "mlp"):
                if norm:
                    self.layers[name + "n"] = nn.LayerNorm(c)
                self.layers[name + "up"] = nn.Linear(c, p["hidden"])
                if block == "gated-mlp":
                    self.layers[name + "gate"] = nn.Linear(c, p["hidden"], bias=False)
                self.layers[name + "down"] = nn.Linear(p["hidden"], c)
        features = c * (16 if kind == "cnn" and flatten else 1)
        self.layers["head"] = nn.Linear(features, classes)
        self.width = width

    def example_input(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        shape = (1, 3, 4, 4) if self.kind == "cnn" else (1, 6, self.width)
        return torch.randn(*shape, generator=g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers["stem"](x)
        for i, (block, p) in enumerate(self.blocks):
            x = self._block(f"b{i}", block, p, x)
        if self.kind == "cnn":
            x = x.flatten(1) if self.flatten else x.mean((2, 3))
        else:
            x = x.flatten(1)[:, : x.shape[-1]] if self.flatten else x.mean(1)
        return self.layers["head"](x)

    def _block(self, name, block, p, x):
        layers = self.layers
        if block == "residual":
            return torch.relu(x + layers[name](x))
        if block == "concat":
            return torch.cat([layers[name + "a"](x), layers[name + "b"](x)], 1)
        if block in ("depthwise", "grouped", "expand"):
            return layers[name](x)
        h = layers[name + "n"](x) if self.norm else x
        if block == "attention":
            b, t, _ = h.shape
            heads, kv, d = p["heads"], p["kv_heads"], p["head_dim"]
            q = layers[name + "q"](h).view(b, t, heads, d).transpose(1, 2)
            k = layers[name + "k"](h).view(b, t, kv, d).transpose(1, 2)
            v = layers[name + "v"](h).view(b, t, kv, d).transpose(1, 2)
            if kv != heads:  # grouped-query attention: each K/V head serves heads // kv query heads
                k = k[:, :, None].expand(b, kv, heads // kv, t, d).reshape(b, heads, t, d)
                v = v[:, :, None].expand(b, kv, heads // kv, t, d).reshape(b, heads, t, d)
            y = F.scaled_dot_product_attention(q, k, v)
            return x + layers[name + "o"](y.transpose(1, 2).reshape(b, t, heads * d))
        up = layers[name + "up"](h)
        up = F.silu(layers[name + "gate"](h)) * up if block == "gated-mlp" else F.gelu(up)
        return x + layers[name + "down"](up)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.uniform_(0.5, 1.5)
    bn.bias.data.uniform_(-0.5, 0.5)
    return bn


def _prune_block(kinds: list[str]):
    def params(block):
        if block == "attention":
            return st.sampled_from([(1, 1), (2, 1), (2, 2), (4, 2), (4, 1), (3, 3)]).flatmap(
                lambda h: st.fixed_dictionaries(
                    {
                        "heads": st.just(h[0]),
                        "kv_heads": st.just(h[1]),
                        "head_dim": st.sampled_from([2, 4]),
                        "bias": st.booleans(),
                    }
                )
            )
        return st.fixed_dictionaries(
            {
                "a": st.integers(1, 6),
                "b": st.integers(1, 6),
                "mult": st.sampled_from([1, 2]),
                "groups": st.sampled_from([2, 3]),
                "per_group": st.integers(1, 4),
                "out": st.integers(2, 12),
                "hidden": st.integers(2, 16),
            }
        )

    return st.sampled_from(kinds).flatmap(lambda b: st.tuples(st.just(b), params(b)))


@st.composite
def prunable_models(draw, max_blocks: int = 4) -> PrunableNet:
    """A random :class:`PrunableNet`: a CNN or a transformer, residuals, concats, grouped convs, GQA, gated MLPs."""
    kind = draw(st.sampled_from(["cnn", "transformer"]))
    blocks = draw(
        st.lists(_prune_block(PRUNE_CNN_BLOCKS if kind == "cnn" else PRUNE_SEQ_BLOCKS), min_size=1, max_size=max_blocks)
    )
    width = draw(st.integers(2, 8))
    return PrunableNet(
        kind,
        width,
        blocks,
        draw(st.booleans()),
        kind == "transformer" and draw(st.booleans()),
        draw(st.integers(0, 2**16)),
    ).eval()
