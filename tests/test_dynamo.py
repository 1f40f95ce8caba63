"""torch.compile(backend="fxopt"): models torch.export cannot take whole, split by Dynamo and built by fxopt."""

import pytest
import torch
import torch.nn as nn

import fxopt.api
from fxopt import FxoptError
from fxopt.dynamo import fxopt_backend
from fxopt.zoo import load_zoo_model
from tests.codegen.test_backend import assert_close


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:  # data-dependent control flow: torch.export refuses it, Dynamo breaks the graph here
            h = h * 2
        return self.b(h)


@pytest.fixture
def optimized_graphs(monkeypatch):
    built = []
    real = fxopt.api.optimize

    def spy(model, *args, **kwargs):
        built.append(real(model, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(fxopt.api, "optimize", spy)
    torch._dynamo.reset()
    yield built
    torch._dynamo.reset()


def test_a_model_with_a_graph_break_compiles_piecewise_and_matches_eager(optimized_graphs):
    model, x = Branchy().eval(), torch.randn(3, 8)
    with pytest.raises(Exception):
        torch.export.export(model, (x,))
    compiled = torch.compile(model, backend="fxopt", options={"target": "cpu", "dispatch": "tvm"}, dynamic=False)
    with torch.no_grad():
        for inputs in (x, -x):  # both branches
            assert_close(compiled(inputs), model(inputs))
    assert len(optimized_graphs) >= 2  # the graphs before and after the break
    assert all(len(g.program.placeholders()) == 1 for g in optimized_graphs)  # weights are constants, not inputs
    assert any(s.backend == "tvm" for g in optimized_graphs for s in g.report().segments)


@pytest.mark.parametrize("name", ["resnet-tiny", "gpt2-tiny"])
def test_zoo_models_compile_through_dynamo_and_match_eager(name, optimized_graphs):
    model, args = load_zoo_model(name)
    compiled = torch.compile(model, backend="fxopt", options={"target": "torch"}, dynamic=False)
    with torch.no_grad():
        assert_close(compiled(*args), model(*args))
    assert optimized_graphs


def test_unknown_options_are_named():
    gm = torch.fx.symbolic_trace(nn.ReLU())
    with pytest.raises(FxoptError, match="unknown option 'targte'"):
        fxopt_backend(gm, [torch.randn(2)], {"targte": "cpu"})
