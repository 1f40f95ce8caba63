"""Real model classes from transformers (random init) through capture and the default pipeline."""

import pytest
import torch
import torch.utils._pytree as pytree

from fxopt import optimize
from fxopt.zoo import ZOO, load_zoo_model

TINY = [name for name in ZOO if name.endswith("-tiny")]
FULL = [name for name in ZOO if not name.endswith("-tiny")]


def _check(name):
    model, inputs = load_zoo_model(name)
    result = optimize(model, inputs, verify="each")
    with torch.no_grad():
        want = pytree.tree_leaves(model(*inputs))
    got = pytree.tree_leaves(result(*inputs))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    report = result.report()
    assert report.passes[-1].nodes[1] <= report.passes[0].nodes[0]
    return report


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_optimize_exactly(name):
    _check(name)


def test_transformer_cleanup_really_removes_nodes():
    report = _check("gpt2-tiny")
    assert report.passes[-1].nodes[1] < report.passes[0].nodes[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_models_optimize_exactly(name):
    _check(name)
