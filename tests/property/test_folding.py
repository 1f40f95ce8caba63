"""The fold arithmetic (``fxopt.ir.folding``) against the layers and affines applied one after the other, in
float64 so that equality is exact up to summation order: convs of 1 to 3 spatial dims, grouped, depthwise and
transposed, linears, with and without bias."""

import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from fxopt.ir.folding import absorb_input_affine, compose_layers, fold_input_affine, fold_output_affine

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


@st.composite
def layers(draw, transposed_too: bool):
    """``(layer(x, w, b), x, weight, bias, channels in, channels out, groups, transposed)`` of a random layer."""
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["linear", "conv"]))
    groups = draw(st.sampled_from([1, 2, 3])) if kind == "conv" else 1
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    transposed = kind == "conv" and transposed_too and draw(st.booleans())
    bias = torch.randn(c_out, generator=gen, dtype=torch.float64) if draw(st.booleans()) else None
    if kind == "linear":
        x = torch.randn(2, 3, c_in, generator=gen, dtype=torch.float64)
        w = torch.randn(c_out, c_in, generator=gen, dtype=torch.float64)
        return (lambda x, w, b: F.linear(x, w, b)), x, w, bias, c_in, c_out, 1, False, -1
    dims = draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 3)) for _ in range(dims)]
    stride = draw(st.integers(1, 2))
    x = torch.randn(2, c_in, *[5] * dims, generator=gen, dtype=torch.float64)
    if transposed:
        w = torch.randn(c_in, c_out // groups, *kernel, generator=gen, dtype=torch.float64)
        return (lambda x, w, b: CONV_T[dims](x, w, b, stride, groups=groups)), x, w, bias, c_in, c_out, groups, True, 1
    w = torch.randn(c_out, c_in // groups, *kernel, generator=gen, dtype=torch.float64)
    return (lambda x, w, b: CONV[dims](x, w, b, stride, groups=groups)), x, w, bias, c_in, c_out, groups, False, 1


def _per_channel(values: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    shape = [1] * rank
    shape[dim] = -1
    return values.reshape(shape)


@given(layers(transposed_too=True), st.integers(0, 2**16))
def test_an_affine_after_the_layer_folds_into_its_weight_and_bias(layer, seed):
    apply, x, w, b, _, c_out, groups, transposed, channel = layer
    gen = torch.Generator().manual_seed(seed)
    scale, shift = (
        torch.randn(c_out, generator=gen, dtype=torch.float64),
        torch.randn(c_out, generator=gen, dtype=torch.float64),
    )
    y = apply(x, w, b)
    expected = y * _per_channel(scale, channel, y.dim()) + _per_channel(shift, channel, y.dim())
    folded_w, folded_b = fold_output_affine(w.double(), b, scale, shift, transposed=transposed, groups=groups)
    torch.testing.assert_close(apply(x, folded_w.double(), folded_b.double()), expected, rtol=1e-5, atol=1e-5)


@given(layers(transposed_too=False), st.integers(0, 2**16))
def test_an_affine_before_an_unpadded_layer_folds_into_its_weight_and_bias(layer, seed):
    apply, x, w, b, c_in, _, groups, _, channel = layer
    gen = torch.Generator().manual_seed(seed)
    scale, shift = (
        torch.randn(c_in, generator=gen, dtype=torch.float64),
        torch.randn(c_in, generator=gen, dtype=torch.float64),
    )
    expected = apply(x * _per_channel(scale, channel, x.dim()) + _per_channel(shift, channel, x.dim()), w, b)
    folded_w, folded_b = fold_input_affine(w, b, scale, shift, groups=groups)
    torch.testing.assert_close(apply(x, folded_w.double(), folded_b.double()), expected, rtol=1e-5, atol=1e-5)


@given(st.integers(0, 2**16), st.integers(1, 6), st.integers(1, 6), st.booleans(), st.booleans())
def test_a_feature_affine_is_absorbed_by_the_linear_reading_it(seed, c_in, c_out, with_bias, with_shift):
    gen = torch.Generator().manual_seed(seed)
    x, w = torch.randn(4, c_in, generator=gen, dtype=torch.float64), torch.randn(c_out, c_in, generator=gen)
    bias = torch.randn(c_out, generator=gen) if with_bias else None
    scale = torch.randn(c_in, generator=gen)
    shift = torch.randn(c_in, generator=gen) if with_shift else None
    expected = F.linear(
        x * scale.double() + (0 if shift is None else shift.double()),
        w.double(),
        None if bias is None else bias.double(),
    )
    new_w, new_b = absorb_input_affine(w, bias, scale, shift, in_dim=1)
    torch.testing.assert_close(F.linear(x, new_w, new_b), expected)


@given(
    st.integers(0, 2**16),
    st.sampled_from(["linear", "pointwise-first", "pointwise-second"]),
    st.integers(1, 2),
    st.integers(1, 3),
    st.booleans(),
    st.booleans(),
)
def test_two_layers_in_a_row_compose_into_one(seed, kind, dims, kernel, bias1, bias2):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    c_in, c_mid, c_out = 3, 4, 5
    b1, b2 = (randn(c_mid) if bias1 else None), (randn(c_out) if bias2 else None)
    if kind == "linear":
        x, w1, w2 = randn(2, c_in), randn(c_mid, c_in), randn(c_out, c_mid)
        expected = F.linear(F.linear(x, w1, b1), w2, b2)
        weight, bias = compose_layers(w1, b1, w2, b2, kind)
        got = F.linear(x, weight.double(), None if bias is None else bias.double())
    else:
        conv = CONV[dims]
        x = randn(2, c_in, *[6] * dims)
        k1, k2 = (1, kernel) if kind == "pointwise-first" else (kernel, 1)
        w1, w2 = randn(c_mid, c_in, *[k1] * dims), randn(c_out, c_mid, *[k2] * dims)
        expected = conv(conv(x, w1, b1), w2, b2)
        weight, bias = compose_layers(w1, b1, w2, b2, kind)
        got = conv(x, weight.double(), None if bias is None else bias.double())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
