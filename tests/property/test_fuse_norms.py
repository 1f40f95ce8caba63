"""``fuse-norms`` on random spelled-out RMSNorm and LayerNorm: widths, shapes, spellings, weights.

Bound (float32): max |fused - original| <= 1e-4 * max|original| + 1e-5, the default tolerance.
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

from fxopt import PassManager, capture
from tests.passes.test_fuse_norms import LayerNorm, RMSNorm

aten = torch.ops.aten


@st.composite
def norms(draw):
    width = draw(st.integers(1, 48))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    if draw(st.booleans()):
        model = RMSNorm(
            width,
            upcast=draw(st.booleans()),
            weight=draw(st.booleans()),
            spelling=draw(st.sampled_from(["rsqrt", "sqrt", "square"])),
        )
        op = aten.rms_norm.default
    else:
        model = LayerNorm(width, affine=draw(st.booleans()), use_var=draw(st.booleans()))
        op = aten.layer_norm.default
    shape = draw(st.lists(st.integers(1, 4), min_size=0, max_size=2)) + [width]
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale
    return model.eval(), x, op


@given(norms())
def test_random_norm_spellings_fuse_and_match(case):
    model, x, op = case
    fused, _ = PassManager("fuse-norms,dce", verify="off").run(capture(model, (x,)))
    assert [n.target for n in fused.graph.nodes if n.op == "call_function"] == [op]
    with torch.no_grad():
        expected = model(x)
        assert (fused(x) - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5


@given(norms(), st.integers(1, 8))
def test_absorbing_a_norm_affine_into_the_next_linear_keeps_outputs(case, out_features):
    norm, x, op = case
    model = torch.nn.Sequential(norm, torch.nn.Linear(x.shape[-1], out_features)).eval()
    absorbed, _ = PassManager("fuse-norms{absorb=true},dce", verify="off").run(capture(model, (x,)))
    fused = [n for n in absorbed.graph.nodes if n.target is op]
    assert len(fused) == 1 and fused[0].args[2] is None  # the weight now lives in the linear
    with torch.no_grad():
        expected = model(x)
        assert (absorbed(x) - expected).abs().max() <= 1e-4 * expected.abs().max() + 1e-5
