"""awq: activation-aware channel scaling before weight-only quantization (exactness:
tests/property/test_quantize.py)."""

import pytest
import torch
from torch import nn

from fxopt import PassManager, capture
from fxopt.errors import PassError, PipelineError
from tests.passes.helpers import ops


class Outliers(nn.Module):
    """Two linears reading an activation with a few large channels, as LLM activations have."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Linear(64, 32), nn.Linear(64, 16)
        self.gain = torch.ones(64)
        self.gain[[5, 17, 40]] = 30.0

    def forward(self, x):
        h = x * self.gain
        return self.a(h) + self.b(h).sum(-1, keepdim=True)


def test_awq_scales_salient_channels_and_lowers_weight_only_error():
    calibration = [torch.randn(4, 8, 64) for _ in range(2)]
    model, example = Outliers(), torch.randn(4, 8, 64)
    program = capture(model, (example,))
    spec = "quantize{scheme=w4 group-size=32}"
    plain, _ = PassManager(spec, verify="off").run(program)
    scaled, (awq, _) = PassManager(f"awq{{group-size=32}},{spec}", verify="off", calibration=calibration).run(program)
    (reference,), (out_plain,), (out_scaled,) = program.run_flat(), plain.run_flat(), scaled.run_flat()
    assert awq.stats["scaled activations"] == 1 and "of unscaled on average" in awq.notes[0]
    assert ops(scaled).count(torch.ops.aten.mul.Tensor) == 2  # the gain, and the scale only the layers read
    assert (out_scaled - reference).square().mean() < 0.7 * (out_plain - reference).square().mean()


def test_awq_skips_layers_that_do_not_group_and_checks_its_options():
    program = capture(Outliers(), (torch.randn(4, 8, 64),))
    result, (record,) = PassManager("awq", verify="off", calibration=[torch.randn(4, 8, 64)]).run(program)
    assert not record.changed and "not a multiple of group-size 128" in record.notes[0]
    with pytest.raises(PipelineError, match="pass 'awq': grid must be at least 1"):
        PassManager("awq{grid=0}")
    with pytest.raises(PipelineError, match="pass 'awq': group-size must be 0"):
        PassManager("awq{group-size=-1}")
    with pytest.raises(PassError, match="awq needs calibration data"):
        PassManager("awq{group-size=32}", verify="off").run(program)
    with pytest.raises(PipelineError, match="bits"):
        PassManager("awq{bits=3}")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("awq,quantize{scheme=w8}", r"bits=4 \(quantize's: 8\)"),
        ("awq{group-size=64},quantize{scheme=w4}", r"group-size=64 \(quantize's: 128\)"),
        ("awq,quantize{scheme=w4 weights=asymmetric}", r"weights=symmetric \(quantize's: asymmetric\)"),
        ("awq,quantize", "awq prepares weight-only quantization .* uses w8a8"),
    ],
)
def test_awq_must_match_the_quantize_after_it(spec, message):
    # The scales are searched for the rounding quantize will do; a mismatch searched for another one.
    with pytest.raises(PipelineError, match=message):
        PassManager(spec)
    PassManager("awq{bits=8 group-size=64},quantize{scheme=mixed mix=[w8,float] group-size=64}")  # agrees
