"""Run one pass on a captured model and check before/after numerics."""

import torch

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


__all__ = ["PASSES", "run_pass", "ops", "assert_same_outputs"]
