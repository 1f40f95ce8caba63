"""Quantization properties.

- quantize→dequantize moves every value by at most the scheme's analytic bound: half a step for int8/int4
  within the calibrated range, 2⁻⁴ relative (or 2⁻¹⁰ of the scale near zero) for fp8 e4m3;
- the reference int8 kernels (``fxopt::linear_q``, ``fxopt::conv_q``) compute exactly what float64 computes on the
  same integer values, zero points included; int4 packing round-trips;
- ``shift-activations``, ``smooth-activations`` and ``awq`` are exact in float32 on random transformers and CNNs;
- int8 attention moves each output by at most half a softmax weight level per key from the float attention of
  the same (int8-grid) values;
- ``quantize`` with any scheme yields a verified graph with the model's output shapes and finite outputs.
"""

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt import PassManager, capture
from fxopt.quant.formats import FP8, INT4, INT8, affine_params, dequantize_groups, fake_quantize, pack_int4, unpack_int4
from fxopt.quant.weights import group_params
from tests.property.generators import prunable_models

fxopt_ops = torch.ops.fxopt


def _tensor(seed: int, shape, spread: float) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=generator) * spread + torch.randn((), generator=generator) * spread


@given(st.integers(0, 2**16), st.integers(1, 300), st.floats(1e-3, 1e3), st.booleans())
def test_int8_error_is_at_most_half_a_step_in_range(seed, n, spread, symmetric):
    x = _tensor(seed, (n,), spread)
    scale, zero_point = affine_params(x.min(), x.max(), INT8, symmetric)
    error = (fake_quantize(x, scale, zero_point, INT8) - x).abs()
    assert (error <= scale / 2 * (1 + 1e-5) + 1e-6 * x.abs()).all()


@given(st.integers(0, 2**16), st.integers(1, 300), st.floats(1e-3, 1e3))
def test_fp8_error_is_within_e4m3_rounding(seed, n, spread):
    x = _tensor(seed, (n,), spread)
    scale, _ = affine_params(x.min(), x.max(), FP8, True)
    error = (fake_quantize(x, scale, None, FP8) - x).abs()
    assert (error <= torch.maximum(x.abs() * 2**-4, scale * 2**-10) * (1 + 1e-5)).all()


@given(
    st.integers(0, 2**16),
    st.integers(1, 6),
    st.sampled_from([2, 4, 8, 32]),
    st.integers(1, 4),
    st.sampled_from([INT8, INT4]),
    st.booleans(),
)
def test_group_quantization_error_is_at_most_half_a_step_per_group(seed, out, group, groups, fmt, symmetric):
    weight = _tensor(seed, (out, group * groups), 1.0)
    q, scale, zero_point = group_params(weight, group, fmt, symmetric)
    assert int(q.min()) >= fmt.qmin and int(q.max()) <= fmt.qmax
    error = (dequantize_groups(q, scale, zero_point) - weight).abs()
    assert (error <= scale.repeat_interleave(group, 1) / 2 * (1 + 1e-5) + 1e-6).all()
    if fmt is INT4:
        assert torch.equal(unpack_int4(pack_int4(q)).int(), q.int())


@given(
    st.integers(0, 2**16),
    st.integers(1, 5),
    st.integers(1, 70),
    st.integers(1, 9),
    st.integers(-128, 127),
    st.booleans(),
)
def test_int8_linear_is_exact_on_integers(seed, rows, in_features, out_features, zero_point, with_bias):
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (rows, in_features), generator=generator, dtype=torch.int8)
    wq = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (out_features,), generator=generator).float() if with_bias else None
    one = torch.ones(())
    out = fxopt_ops.linear_q(
        xq, one, torch.tensor(zero_point, dtype=torch.int32), wq, torch.ones(out_features), bias, torch.float32
    )
    expected = F.linear(xq.double() - zero_point, wq.double(), None if bias is None else bias.double())
    assert torch.equal(out.double(), expected)  # |sums| < 2^24: exact in float32 too


@given(
    st.integers(0, 2**16),
    st.integers(1, 3),
    st.integers(1, 4),
    st.integers(3, 7),
    st.integers(1, 3),
    st.integers(0, 1),
    st.integers(-128, 127),
)
def test_int8_conv_is_exact_on_integers(seed, in_groups, out_per_group, size, kernel, padding, zero_point):
    generator = torch.Generator().manual_seed(seed)
    groups = in_groups
    xq = torch.randint(-128, 128, (1, 2 * groups, size, size), generator=generator, dtype=torch.int8)
    wq = torch.randint(-127, 128, (out_per_group * groups, 2, kernel, kernel), generator=generator, dtype=torch.int8)
    out = fxopt_ops.conv_q(
        xq,
        torch.ones(()),
        torch.tensor(zero_point, dtype=torch.int32),
        wq,
        torch.ones(wq.shape[0]),
        None,
        [1, 1],
        [padding] * 2,
        [1, 1],
        groups,
        torch.float32,
    )
    # Padding pads the real value 0, which is the zero point in the quantized domain.
    expected = F.conv2d(xq.double() - zero_point, wq.double(), None, 1, padding, 1, groups)
    assert torch.equal(out.double(), expected)


@given(st.integers(0, 2**16), st.integers(1, 2000), st.integers(1, 150), st.integers(-128, -100))
def test_int8_reductions_longer_than_float32_holds_exactly_stay_exact(seed, in_features, channels, zero_point):
    # Near-extreme values: sums pass 2^24, where float32 stops holding every integer. The reference sums
    # EXACT_FLOAT32_TERMS products at a time in float32 and adds the chunks in float64.
    generator = torch.Generator().manual_seed(seed)
    zp, one = torch.tensor(zero_point, dtype=torch.int32), torch.ones(())

    def extreme(*shape):
        return torch.randint(100, 128, shape, generator=generator, dtype=torch.int8)

    xq, wq = extreme(3, in_features), extreme(4, in_features)
    out = fxopt_ops.linear_q(xq, one, zp, wq, torch.ones(4), None, torch.float32)
    assert torch.equal(out, F.linear(xq.double() - zero_point, wq.double()).float())
    xq, wq = extreme(1, channels, 5, 5), extreme(2, channels, 3, 3)
    out = fxopt_ops.conv_q(xq, one, zp, wq, torch.ones(2), None, [1, 1], [1, 1], [1, 1], 1, torch.float32)
    assert torch.equal(out, F.conv2d(xq.double() - zero_point, wq.double(), None, 1, 1).float())


@settings(deadline=None)
@given(
    st.integers(0, 2**16),
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 70),
    st.sampled_from([1, 8, 64]),
    st.floats(0.01, 3.0),
    st.booleans(),
)
def test_int8_attention_moves_each_output_by_at_most_half_a_weight_level_per_key(
    seed, heads, length, source, dim, spread, masked
):
    # Q, K and V on their int8 grids (what the layer's own quantization leaves of them): the integer sums are
    # exact, so attention_q differs from float64 attention of the same values only by each weight's rounding to
    # a level (at most half of one): out - exact = sum_t e_t (v_t - exact) / sum_t levels_t, |e_t| <= 1/2.
    generator = torch.Generator().manual_seed(seed)
    scales = [torch.rand(heads, generator=generator) * spread + 1e-3 for _ in range(3)]
    levels = [
        torch.randint(-127, 128, (2, heads, n, dim), generator=generator).double() for n in (length, source, source)
    ]
    q, k, v = (lv * s.double().reshape(1, -1, 1, 1) for lv, s in zip(levels, scales))
    mask = torch.rand(2, 1, length, source, generator=generator) > 0.3 if masked else None
    out = fxopt_ops.attention_q(q.float(), k.float(), v.float(), mask, *scales, dim**-0.5, False).double()
    factor = (scales[0] * scales[1] * dim**-0.5).double().reshape(1, -1, 1, 1)  # as float32 rounds it
    scores = (levels[0] @ levels[1].transpose(-1, -2)) * factor
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    top = scores.amax(-1, keepdim=True)
    weights = (255 * torch.exp(scores - top)).nan_to_num(0.0)
    exact = (weights @ v) / weights.sum(-1, keepdim=True).clamp_min(1e-300)
    deviation = (v.unsqueeze(-3) - exact.unsqueeze(-2)).abs()  # [..., length, source, dim]: |v_t - exact|
    live = (weights > 0).unsqueeze(-1)
    bound = 0.5 * (deviation * live).sum(-2) / torch.floor(weights + 0.5).sum(-1, keepdim=True).clamp_min(1)
    assert ((out - exact).abs() <= bound * 1.001 + 1e-5 * v.abs().amax()).all()


@given(st.integers(0, 2**16), st.integers(1, 3))
def test_fp8_grouped_conv_sums_in_float32(seed, groups):
    # fp8 products accumulate in float32 (fxopt.quant.formats' conventions), grouped or not.
    generator = torch.Generator().manual_seed(seed)
    xq = (torch.randn(1, 16 * groups, 6, 6, generator=generator) * 40).to(torch.float8_e4m3fn)
    wq = (torch.randn(4 * groups, 16, 3, 3, generator=generator) * 40).to(torch.float8_e4m3fn)
    out = fxopt_ops.conv_q(
        xq,
        torch.ones(()),
        torch.zeros((), dtype=torch.int32),
        wq,
        torch.ones(()),
        None,
        [1, 1],
        [1, 1],
        [1, 1],
        groups,
        torch.float32,
    )
    assert torch.equal(out, F.conv2d(xq.float(), wq.float(), None, 1, 1, 1, groups))


@given(
    prunable_models(),
    st.sampled_from(
        [
            "shift-activations",
            "smooth-activations",
            "shift-activations,smooth-activations{alpha=0.8}",
            "awq{group-size=0}",
            "awq{bits=8 group-size=2 weights=asymmetric grid=4}",
        ]
    ),
)
def test_activation_transformations_are_exact(model, spec):
    program = capture(model, (model.example_input(),))
    calibration = [model.example_input() * 3]  # ranges from other data than the check: exactness cannot depend on it
    PassManager(spec, verify="each", calibration=calibration).run(program)  # raises if outputs change


@settings(max_examples=max(4, settings().max_examples // 2))  # tests/property/test_random_dags.py draws more
@given(
    prunable_models(),
    st.sampled_from(["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "mixed"]),
    st.sampled_from(["minmax", "percentile", "mse", "entropy"]),
    st.sampled_from([0, 2, 4]),
)
def test_quantize_yields_a_valid_graph(model, scheme, observer, group_size):
    program = capture(model, (model.example_input(),))
    spec = f"quantize{{scheme={scheme} observer={observer} group-size={group_size}}}"
    quantized, _ = PassManager(spec, verify="off", calibration=[model.example_input()]).run(program)  # IR verified
    (out,), (reference,) = quantized.run_flat(), program.run_flat()
    assert out.shape == reference.shape and torch.isfinite(out).all()
