"""Layout chains read through (fxopt.codegen.layout): every element of a chain's result is the source element
its index map names, for the chains transformers put before attention, the corner cases of each op, and random
chains of every layout op."""

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

from fxopt.codegen.layout import read_through

CHAINS = {
    # GPT-2: the fused projection viewed, split in three, each part viewed per head and permuted heads first.
    "gpt-2 q/k/v": lambda x: x.view(1, 8, 18).split([6, 6, 6], 2)[1].view(1, 8, 3, 2).permute(0, 2, 1, 3),
    # BERT after fxopt's fuse-projections: a slice of the last dim, viewed per head, transposed.
    "bert q/k/v": lambda x: x[:, 12:18].view(1, 8, 3, 2).transpose(1, 2),
    "split of equal parts": lambda x: x.split(6, dim=-1)[2].reshape(2, 4, 6),
    "strided slice, negative start": lambda x: x[-5::2, 1:],
    "regrouping reshape": lambda x: x.reshape(4, 36).transpose(0, 1).reshape(9, 16),
    "unit dims": lambda x: x.view(1, 8, 1, 18)[:, :, 0].transpose(-1, -2),
    "clone": lambda x: x.t().clone(),
}


def traced(fn, x):
    gm = make_fx(fn)(x)
    FakeTensorProp(gm).propagate(x)
    out = gm.graph.output_node().args[0]
    return out[0] if isinstance(out, (tuple, list)) else out


@pytest.mark.parametrize("chain", CHAINS)
def test_a_chain_reads_its_source_through_its_index_map(chain):
    x = torch.randn(8, 18)
    result = CHAINS[chain](x)
    gather = read_through(traced(CHAINS[chain], x))
    assert gather.source.op == "placeholder" and gather.shape == (8, 18)
    for index in itertools.product(*map(range, result.shape)):
        assert x[tuple(gather.index(list(index)))] == result[index], index


def test_the_chain_stops_at_the_first_op_that_computes():
    gather = read_through(traced(lambda x: (x * 2).t()[1:], torch.randn(8, 18)))
    assert str(gather.source.target) == "aten.mul.Tensor" and len(gather.steps) == 2


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def layout_chains(draw):
    """A random tensor shape and a chain of 1-5 layout ops that applies to it, built as the shape evolves."""
    shape = draw(st.lists(st.integers(1, 5), min_size=1, max_size=4))
    ops, current = [], list(shape)
    for _ in range(draw(st.integers(1, 5))):
        rank = len(current)
        kinds = ["reshape", "permute", "transpose", "slice", "unsqueeze", "clone", "split"]
        kinds += ["select", "squeeze"] if rank > 1 else []
        kind = draw(st.sampled_from(kinds))
        dim = draw(st.integers(0, rank - 1))
        if kind == "reshape":  # any regrouping of the elements, in up to four dims
            left, new = math.prod(current), []
            while left > 1 and len(new) < 3:
                new.append(draw(st.sampled_from(_divisors(left))))
                left //= new[-1]
            new.append(left)
            ops.append(lambda x, new=new: x.reshape(new))
            current = list(new)  # the op keeps its own list
        elif kind == "permute":
            order = draw(st.permutations(range(rank)))
            ops.append(lambda x, order=order: x.permute(order))
            current = [current[d] for d in order]
        elif kind == "transpose":
            other = draw(st.integers(-rank, rank - 1))
            ops.append(lambda x, a=dim, b=other: x.transpose(a, b))
            current[dim], current[other] = current[other], current[dim]
        elif kind == "slice":  # a non-empty strided slice, its start counted from either end
            start = draw(st.integers(0, current[dim] - 1))
            step = draw(st.integers(1, 3))
            from_end = draw(st.booleans())
            begin = start - current[dim] if from_end else start
            ops.append(lambda x, d=dim, b=begin, s=step: x[(slice(None),) * d + (slice(b, None, s),)])
            current[dim] = len(range(start, current[dim], step))
        elif kind == "split":
            size = draw(st.integers(1, current[dim]))
            part = draw(st.integers(0, (current[dim] - 1) // size))
            ops.append(lambda x, d=dim, s=size, p=part: x.split(s, dim=d)[p])
            current[dim] = min(size, current[dim] - part * size)
        elif kind == "select":
            at = draw(st.integers(-current[dim], current[dim] - 1))
            ops.append(lambda x, d=dim, i=at: x.select(d, i))
            del current[dim]
        elif kind == "unsqueeze":
            ops.append(lambda x, d=dim: x.unsqueeze(d))
            current.insert(dim, 1)
        elif kind == "squeeze":
            ops.append(lambda x, d=dim: x.squeeze(d))
            current = current[:dim] + current[dim + 1 :] if current[dim] == 1 else current
        else:
            ops.append(lambda x: x.clone())
    return shape, ops


@settings(max_examples=100)  # tracing only, no build: 100 chains take about a second
@given(layout_chains())
def test_random_layout_chains_read_their_source_through_their_index_map(case):
    shape, ops = case

    def chain(x):
        for op in ops:
            x = op(x)
        return x

    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape)  # every element tells where it was
    result = chain(x)
    gather = read_through(traced(chain, x))
    assert gather.source.op == "placeholder" and gather.shape == tuple(shape)
    for index in itertools.product(*map(range, result.shape)):
        assert x[tuple(gather.index(list(index)))] == result[index], index
