"""Run one pass on a captured model and check before/after numerics."""

import torch
from torch import nn

from fxopt import PASSES, PassManager, capture


def run_pass(model, inputs, spec):
    """Capture, run ``spec`` (verified to the default tolerance), return (before, after, record)."""
    before = capture(model, inputs)
    after, (record, *_) = PassManager(spec, verify="each").run(before)
    return before, after, record


def ops(program):
    return [n.target for n in program.graph.nodes if n.op == "call_function"]


def assert_same_outputs(model, program, inputs):
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs), model.eval()(*inputs), rtol=0, atol=0)


class NormFeedingLinears(nn.Module):
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


class NormReluFeedingLinears(NormFeedingLinears):
    """A ReLU between the norm and the linears: the change cannot fold into the norm."""

    def forward(self, x):
        h = torch.relu(self.norm(x))
        return self.q(h) * self.k(h)


def run_calibrated(model, spec):
    """Run one data-driven exact pass (verified after it) on a ``[2, 5, 16]`` input with other calibration data."""
    program = capture(model, (torch.randn(2, 5, 16),))
    result, (record,) = PassManager(spec, verify="each", calibration=[torch.randn(2, 5, 16) * 2]).run(program)
    return program, result, record


__all__ = [
    "PASSES",
    "run_pass",
    "run_calibrated",
    "ops",
    "assert_same_outputs",
    "NormFeedingLinears",
    "NormReluFeedingLinears",
]
