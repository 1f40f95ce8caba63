"""``fold-conv-bn`` on random conv/BatchNorm blocks: every fold happens and preserves outputs.

Bound (float32): max |folded - original| <= 1e-4 * max|original| + 1e-5. Folding
reorders one multiply per weight, so the error is a few float32 ulps of the
output scale even with tiny running variances (scales up to ~300).

Half precision: the folded fp16/bf16 model must be as close to the float32
model as the unfolded one is, up to 8 ulps of the output scale: folding in
float32 adds at most one rounding of each folded weight. Only for outputs well
inside the dtype's range: hypothesis found outputs of 59000 (float16 ends at
65504) that the folded conv, computing the same values in another order,
rounded to inf.
"""

import torch
import torch.nn as nn
from hypothesis import assume, given
from hypothesis import strategies as st

from fxopt import PassManager, capture

aten = torch.ops.aten
BATCH_NORM = aten._native_batch_norm_legit_no_training.default

_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_TRANSPOSED = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_NORM = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


@st.composite
def conv_bn_blocks(draw):
    """``(model, input, expected folds)``: a conv with a BatchNorm after it and possibly one before it."""
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 3]))
    cin = groups * draw(st.integers(1, 3))
    cout = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 3))
    stride = draw(st.integers(1, 2))
    dilation = draw(st.integers(1, 2))
    size = draw(st.integers(dilation * (kernel - 1) + 1, 7 if dims < 3 else 5))
    output_padding = draw(st.integers(0, max(stride, dilation) - 1)) if transposed else 0
    # A transposed conv's padding crops its output; keep at least one element.
    widest = ((size - 1) * stride + dilation * (kernel - 1) + output_padding) // 2 if transposed else 2
    padding = draw(st.integers(0, min(2, widest)))
    norm_before = draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if transposed:
        conv = _TRANSPOSED[dims](
            cin,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
            output_padding=output_padding,
        )
    else:
        conv = _CONV[dims](
            cin,
            cout,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=draw(st.booleans()),
        )
    layers = [_random_norm(_NORM[dims](cin), draw)] if norm_before else []
    layers += [conv, _random_norm(_NORM[dims](cout), draw)]
    model = nn.Sequential(*layers).eval()
    x = torch.randn(draw(st.integers(1, 2)), cin, *[size] * dims, generator=torch.Generator().manual_seed(seed))
    # A norm before a conv folds only when nothing pads (see the pass docstring).
    folds = 1 + (norm_before and padding == 0 and not transposed)
    return model, x, folds


def _random_norm(norm: nn.Module, draw) -> nn.Module:
    c = norm.num_features
    norm.running_mean.copy_(torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=c, max_size=c))))
    # Tiny variances make large scales: the hard case for float rounding.
    norm.running_var.copy_(
        torch.tensor(draw(st.lists(st.sampled_from([1e-6, 1e-3, 0.1, 1.0, 4.0]), min_size=c, max_size=c)))
    )
    norm.weight.data.copy_(torch.tensor(draw(st.lists(st.floats(-2, 2), min_size=c, max_size=c))))
    norm.bias.data.copy_(torch.tensor(draw(st.lists(st.floats(-1, 1), min_size=c, max_size=c))))
    return norm


def _fold(model, x):
    program = capture(model, (x,))
    folded, (record, _) = PassManager("fold-conv-bn,dce", verify="off").run(program)
    return folded, record


@given(conv_bn_blocks())
def test_every_foldable_batch_norm_folds_and_outputs_match(case):
    model, x, folds = case
    folded, record = _fold(model, x)
    remaining = [n for n in folded.graph.nodes if n.target is BATCH_NORM]
    assert len(remaining) == len(model) - 1 - folds
    assert sum(v for k, v in record.stats.items() if k.startswith("batch-norm-into")) == folds
    with torch.no_grad():
        expected, actual = model(x), folded(x)
    bound = 1e-4 * expected.abs().max() + 1e-5
    assert (actual - expected).abs().max() <= bound


@given(conv_bn_blocks(), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_folding_adds_no_more_than_rounding(case, dtype):
    model, x, folds = case
    with torch.no_grad():
        expected = model(x)
        assume(expected.abs().max() < torch.finfo(dtype).max / 8)
        low = model.to(dtype)
        folded, _ = _fold(low, x.to(dtype))
        error_folded = (folded(x.to(dtype)).float() - expected).abs().max()
        error_unfolded = (low(x.to(dtype)).float() - expected).abs().max()
    assert error_folded <= error_unfolded + 8 * torch.finfo(dtype).eps * expected.abs().max()
