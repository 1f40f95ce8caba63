"""Layout chains read through (fxopt.codegen.layout): every element of a chain's result is the source element
its index map names, for the chains transformers put before attention and the corner cases of each op."""

import itertools

import pytest
import torch
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
