"""shift-activations: centered channels, compensated in the readers' biases (exactness is verified by the manager)."""

import torch

from fxopt import PassManager, capture
from tests.passes.helpers import NormFeedingLinears, NormReluFeedingLinears, ops, run_calibrated


def test_the_shift_folds_into_the_layer_norm_and_gives_bias_free_readers_a_bias():
    program, result, record = run_calibrated(NormFeedingLinears(), "shift-activations")
    assert record.stats == {"shifted activations": 1}
    assert ops(result) == ops(program)  # folded into the norm's bias: no new op
    k = [n for n in result.graph.nodes if n.target is torch.ops.aten.linear.default][1]
    assert len(k.args) > 2 and k.args[2] is not None


def test_channels_are_centered_on_the_calibration_data():
    program, result, _ = run_calibrated(NormReluFeedingLinears(), "shift-activations")
    (sub,) = [n for n in result.graph.nodes if n.target is torch.ops.aten.sub.Tensor]
    from fxopt.calibration import Calibration, observe

    values = []
    observe(result, Calibration((torch.randn(2, 5, 16) * 2,)), {sub: values.append})
    flat = values[0].reshape(-1, 16)
    # Fresh data from the calibration's distribution: each channel's midpoint is near zero, within its spread.
    assert (flat.amax(0) + flat.amin(0)).abs().max() < (flat.amax(0) - flat.amin(0)).max()


def test_without_calibration_the_error_says_how_to_give_it():
    import pytest

    from fxopt.errors import PassError

    with pytest.raises(PassError, match="shift-activations needs calibration data"):
        PassManager("shift-activations").run(capture(NormFeedingLinears(), (torch.randn(2, 5, 16),)))
