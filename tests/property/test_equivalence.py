"""Capture and every exact pass preserve the outputs of random models.

Bound: max |optimized - original| <= 1e-5 + 1e-4 * max|original| (float32),
fxopt's default :class:`~fxopt.Tolerance`; these passes reorder no arithmetic,
so in practice the error is exactly zero.
"""

import pytest
import torch
from hypothesis import given, settings

from fxopt import PASSES, PassManager, Tolerance, capture, optimize
from fxopt.ir.numerics import compare_outputs
from tests.property.generators import RandomModel, random_models

TOLERANCE = Tolerance(rtol=1e-4, atol=1e-5)


def _assert_close(outputs, reference):
    worst_abs, worst_rel, failing = compare_outputs(outputs, reference, TOLERANCE)
    assert failing is None, f"max abs error {worst_abs}, relative {worst_rel}"


@given(random_models())
def test_capture_preserves_outputs(case):
    model, inputs = case
    program = capture(model, inputs)
    with torch.no_grad():
        _assert_close([program(*inputs)], [model(*inputs)])


def test_capture_pinned_example_of_two_attention_layers_of_different_widths():
    # Hypothesis found the generator giving every attention layer the last one's heads (2 heads of a 1-wide layer).
    attention = {"heads": 2, "out": 2, "k": 1, "bias": True, "grouped": False}
    seq = [("attention", attention), ("linear", {**attention, "bias": False}), ("attention", attention)]
    model, x = RandomModel(1, [], seq, 0).eval(), torch.randn(1, 1, 2, 2)
    with torch.no_grad():
        _assert_close([capture(model, (x,))(x)], [model(x)])


# Half the profile's examples: tests/property/test_random_dags.py runs every exact pass on new random DAGs too.
@pytest.mark.parametrize("pass_name", sorted(name for name, cls in PASSES.items() if cls.exact))  # lossy: own bounds
@settings(max_examples=max(4, settings().max_examples // 2))
@given(case=random_models())
def test_each_pass_preserves_outputs(pass_name, case):
    model, inputs = case
    program = capture(model, inputs)
    # Data-driven exact passes (shift-/smooth-activations) calibrate on the example inputs.
    optimized, records = PassManager(pass_name, verify="off", calibration=[inputs]).run(program)
    with torch.no_grad():
        _assert_close(optimized.run_flat(), [model(*inputs)])


@given(random_models())
def test_default_pipeline_preserves_outputs_and_never_grows_the_graph(case):
    model, inputs = case
    result = optimize(model, inputs, target="torch", verify="each")
    report = result.report()
    first, last = report.passes[0], report.passes[-1]
    assert last.nodes[1] <= first.nodes[0]
    assert last.flops[1] <= first.flops[0]
    with torch.no_grad():
        _assert_close([result(*inputs)], [model(*inputs)])


# Each example compiles with TVM (seconds), so this test draws fewer examples than the profile's.
@settings(max_examples=max(3, settings().max_examples // 3))
@given(case=random_models())
def test_cpu_target_matches_pytorch(case):
    """Random graphs through the TVM CPU backend, every lowerable segment forced into TVM."""
    model, inputs = case
    result = optimize(model, inputs, target="cpu", dispatch="tvm", verify="off")
    with torch.no_grad():
        _assert_close([result(*inputs)], [model(*inputs)])
    assert all(s.backend == "tvm" for s in result.report().segments)
