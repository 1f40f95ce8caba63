"""smooth-activations: activation ranges migrated into weights (exactness is verified by the manager)."""

import pytest

import torch
from torch import nn

from fxopt import PassManager, capture
from tests.passes.helpers import ops


class Block(nn.Module):
    """A Pre-LN attention-like block: one LayerNorm feeding two linears (one without bias)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.norm = nn.LayerNorm(16)
        self.q, self.k = nn.Linear(16, 16), nn.Linear(16, 16, bias=False)
        with torch.no_grad():
            self.norm.bias.uniform_(-3, 3)
            self.norm.weight.uniform_(0.1, 5)

    def forward(self, x):
        h = self.norm(x)
        return self.q(h) * self.k(h)


class Unfoldable(Block):
    """A ReLU between the norm and the linears: the change cannot fold into the norm."""

    def forward(self, x):
        h = torch.relu(self.norm(x))
        return self.q(h) * self.k(h)


def run(model, spec):
    program = capture(model, (torch.randn(2, 5, 16),))
    result, (record,) = PassManager(spec, verify="each", calibration=[torch.randn(2, 5, 16) * 2]).run(program)
    return program, result, record


def test_the_scale_folds_into_the_layer_norm():
    program, result, record = run(Block(), "smooth-activations")
    assert record.stats == {"smoothed activations": 1}
    assert ops(result) == ops(program)


def test_activation_ranges_even_out_and_weights_take_the_difference():
    program, result, _ = run(Unfoldable(), "smooth-activations{alpha=1}")
    (mul,) = [n for n in result.graph.nodes
              if n.target is torch.ops.aten.mul.Tensor and n.args[0].target is torch.ops.aten.relu.default]
    from fxopt.ir.calibration import Calibration, observe

    seen = []
    observe(result, Calibration((torch.randn(2, 5, 16) * 2,)), {mul: seen.append, mul.args[0]: seen.append})
    before, after = (v.reshape(-1, 16).abs().amax(0) for v in seen)
    spread = lambda r: float(r.max() / r.clamp_min(1e-6).min())  # noqa: E731
    assert spread(after) < spread(before)  # alpha=1: every channel's range becomes the same, up to data drift


def test_alpha_is_validated():
    from fxopt.errors import PassError

    with pytest.raises(PassError, match=r"alpha must be in \[0, 1\]"):
        run(Block(), "smooth-activations{alpha=1.5}")
