"""``fuse-attention`` on random spelled-out attention: heads, sizes, scale spellings, mask shapes, dtypes; scales,
additive masks and where-masks in any order and number, on the 4-D or the flattened scores.

Bound: max |fused - original| <= 1e-4 * max|original| + 1e-5 in float32 (the default tolerance:
SDPA sums in another order). In float16 both are compared with the float32 model, and the fused
error may not exceed the eager spelling's own by more than 2e-3 * max|reference| (fp16 rounding of
the scores and probabilities, which SDPA keeps in float32 on CPU).
"""

import math

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from fxopt import PassManager, capture

aten = torch.ops.aten


class Attention(nn.Module):
    def __init__(self, heads: int, head_dim: int, scaling: str):
        super().__init__()
        self.heads, self.head_dim, self.scaling = heads, head_dim, scaling
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.scaling == "query":
            scores = (q * self.head_dim**-0.5) @ k.transpose(-1, -2)
        elif self.scaling == "div":
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
        else:
            scores = q @ k.transpose(-1, -2) * self.head_dim**-0.5
        if mask is not None:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v


@st.composite
def attentions(draw):
    heads, head_dim = draw(st.integers(1, 4)), draw(st.sampled_from([1, 4, 8, 16]))
    n, t = draw(st.integers(1, 3)), draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Attention(heads, head_dim, draw(st.sampled_from(["query", "div", "mul"]))).eval()
    mask_shape = draw(st.sampled_from([None, (n, 1, 1, t), (1, 1, t, t), (n, heads, t, t), (t, t)]))
    if mask_shape is None:
        mask = None
    elif draw(st.booleans()):  # a padding/causal mask of large negatives, as transformers builds it
        mask = torch.where(torch.rand(mask_shape, generator=generator) < 0.3, -1e4, 0.0)
    else:  # a relative-position bias
        mask = torch.randn(mask_shape, generator=generator)
    x = torch.randn(n, t, heads * head_dim, generator=generator)
    return model, x, mask


def _fuse(model, inputs):
    fused, (record,) = PassManager("fuse-attention", verify="off").run(capture(model, inputs))
    assert record.stats["attentions-fused"] == 1, record.notes
    assert [n.target for n in fused.graph.nodes].count(aten._softmax.default) == 0
    return fused


@given(attentions())
def test_random_attention_becomes_sdpa_and_matches(case):
    model, x, mask = case
    fused = _fuse(model, (x, mask))
    with torch.no_grad():
        expected = model(x, mask)
        assert (fused(x, mask) - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5


@given(attentions())
def test_random_half_attention_is_no_worse_than_the_eager_spelling(case):
    model, x, mask = case
    with torch.no_grad():
        reference = model(x, mask)
    half = model.half()
    inputs = (x.half(), None if mask is None else mask.half())
    fused = _fuse(half, inputs)
    with torch.no_grad():
        eager_error = (half(*inputs).float() - reference).abs().max()
        fused_error = (fused(*inputs).float() - reference).abs().max()
    assert fused_error <= eager_error + 2e-3 * reference.abs().max() + 1e-3


class Spelled(nn.Module):
    """Attention whose scores go through ``steps`` in order: ``("scale", c)``, ``("bias", None)`` (an additive
    term), ``("where", fill)`` (keys outside ``keep`` set to ``fill``), ``("masked_fill", fill)``; computed on
    the flattened ``[batch * heads, L, S]`` scores when ``flat`` (Falcon's and BLOOM's spelling)."""

    def __init__(self, heads: int, head_dim: int, flat: bool, steps: list):
        super().__init__()
        self.heads, self.head_dim, self.flat, self.steps = heads, head_dim, flat, steps
        self.qkv = nn.Linear(heads * head_dim, 3 * heads * head_dim)

    def forward(self, x, bias, keep):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.flat:
            flat = (n * self.heads, t, self.head_dim)
            scores = torch.bmm(q.reshape(flat), k.reshape(flat).transpose(1, 2))
        else:
            scores = q @ k.transpose(-1, -2)
        for kind, value in self.steps:
            if kind == "scale":
                scores = scores * value
            elif kind == "bias":
                scores = scores + bias
            elif kind == "where":
                scores = torch.where(keep, scores, torch.tensor(value))
            else:
                scores = scores.masked_fill(~keep, value)
        if self.flat:
            scores = scores.view(n, self.heads, t, t)
        return torch.softmax(scores, dim=-1) @ v


@st.composite
def spelled_attentions(draw):
    heads, head_dim = draw(st.integers(1, 3)), draw(st.sampled_from([1, 4, 8]))
    n, t = draw(st.integers(1, 2)), draw(st.integers(1, 9))
    flat = draw(st.booleans())
    fill = st.sampled_from([float("-inf"), torch.finfo(torch.float32).min, -3e38])
    step = st.one_of(
        st.tuples(st.just("scale"), st.sampled_from([0.125, 0.5, 2.0])),
        st.tuples(st.just("bias"), st.none()),
        st.tuples(st.sampled_from(["where", "masked_fill"]), fill),
    )
    steps = draw(st.lists(step, min_size=1, max_size=4))
    seed = draw(st.integers(0, 2**16))
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = Spelled(heads, head_dim, flat, steps).eval()
    bias_shape = (n * heads, 1, t) if flat else draw(st.sampled_from([(n, 1, 1, t), (1, heads, t, t), (t, t)]))
    bias = torch.randn(bias_shape, generator=generator)
    keep = torch.rand(t, t, generator=generator) < 0.7
    keep[:, 0] = True  # no row loses every key (-inf: NaN in softmax, zeros in SDPA, documented)
    x = torch.randn(n, t, heads * head_dim, generator=generator)
    return model, (x, bias, keep)


@given(spelled_attentions())
def test_scales_masks_and_wheres_in_any_order_become_sdpa_and_match(case):
    model, inputs = case
    fused = _fuse(model, inputs)
    with torch.no_grad():
        expected = model(*inputs)
        assert (fused(*inputs) - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5
