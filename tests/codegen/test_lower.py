"""Every lowering override against PyTorch, and the checks that stop a wrong lowering from running.

Bound: fxopt's default Tolerance (1e-5 + 1e-4 * max|reference|, float32); integer results must match exactly.
"""

import contextlib
import functools
import math
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt import PassManager, capture
from fxopt.codegen import build
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32, ConvShape
from fxopt.codegen.kernels.conv2d_int8 import CONV2D_INT8, CONV2D_INT8_7BIT
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32
from fxopt.codegen.kernels.depthwise_int8 import DEPTHWISE_INT8
from fxopt.codegen.kernels.gemm_bf16 import GEMM_BF16
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32, default_tile
from fxopt.codegen.kernels.gemm_int8 import GEMM_INT8, GEMM_INT8_7BIT, dot_instruction
from fxopt.codegen.kernels.gemm_wq import GEMM_WQ
from fxopt.codegen.kernels.winograd_f32 import WINOGRAD_F32
from fxopt.codegen.kernels.winograd_int8 import WINOGRAD_INT8, WinogradInt8Config
from fxopt.codegen.lower import OVERRIDES, is_lowerable, lower_graph, register_lowering
from fxopt.codegen.lower_conv import block_diagonal, conv_shapes, merged_groups
from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.targets import parse_target

CPU = parse_target("cpu")
HOST = Isa.of(CPU)
TILE = default_tile(HOST)  # the GEMM's register tile for this host's vectors


class Fn(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *args):
        return self.fn(*args)


def tvm_build(fn, *inputs):
    program = capture(Fn(fn), inputs)
    return program, build(program, CPU, dispatch="tvm")


def assert_matches_torch(fn, *inputs):
    program, executable = tvm_build(fn, *inputs)
    assert executable.segments and all(s.backend == "tvm" for s in executable.segments), executable.segments
    assert_built_matches(program, executable)


@contextlib.contextmanager
def spy_on(*families):
    """``(workload, config, variant)`` of every kernel of the ``families`` built inside the block, in order."""
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        for family in families:
            real = family.build
            spy = functools.partial(lambda real, *args: calls.append((*args, None)[:3]) or real(*args), real)
            patch.setattr(family, "build", spy)
        yield calls


def assert_built_matches(program, executable):
    worst, _, failing = compare_outputs(executable.module.run_flat(), program.run_flat(), Tolerance())
    assert failing is None, f"max abs error {worst}"


def test_every_override_is_tested_here():
    tested = {
        "aten::amax",
        "fxopt::crms_norm",
        "aten::cumsum",
        "aten::rms_norm",
        "aten::scaled_dot_product_attention",
        "fxopt::quantize",
        "fxopt::linear_q",
        "fxopt::conv_q",
        "fxopt::conv_q_blocked",
        "fxopt::linear_wq",
        "fxopt::linear_bf16",
        "fxopt::attention_q",
        "aten::gelu",
        "aten::linear",
        "aten::addmm",
        "aten::mm",
        "aten::matmul",
        "aten::layer_norm",
        "aten::tanh",
        "aten::exp",
        "aten::pow.Tensor_Scalar",
        "fxopt::to_blocked",
        "fxopt::from_blocked",
        "fxopt::conv2d_blocked",
        "fxopt::pool2d_blocked",
    }
    assert {op.name() for op in OVERRIDES} == tested


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32])
def test_cumsum_promotes_like_pytorch(dtype):
    x = (torch.rand(2, 7) > 0.5).to(dtype) if dtype != torch.float32 else torch.randn(2, 7)
    assert_matches_torch(lambda t: torch.cumsum(t, 1) * 2, x)


@pytest.mark.parametrize("with_weight, eps", [(True, 1e-6), (False, None), (True, None)])
def test_rms_norm(with_weight, eps):
    weight = torch.randn(16) if with_weight else None
    assert_matches_torch(lambda x: F.rms_norm(x * 3, (16,), weight, eps), torch.randn(2, 5, 16))


@pytest.mark.parametrize("affine", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("shape", [(2, 5, 16), (1, 1), (3, 1000), (7,)])
def test_layer_norm_with_and_without_its_affine(affine, shape):
    # Without a weight TVM's importer raised KeyError: None and the segment ran in PyTorch (found by
    # tests/property/test_random_dags.py on a LayerNorm(1, elementwise_affine=False)). Widths of whole 8-lane
    # chunks take the lane-sum kernel on CPUs, the others TOPI's.
    width = shape[-1]
    weight = torch.randn(width) if affine[0] else None
    bias = torch.randn(width) if affine[1] else None
    assert_matches_torch(lambda x: F.layer_norm(x * 3, (width,), weight, bias, 1e-5), torch.randn(*shape))


def test_crms_norm():
    import fxopt.ir.ops  # noqa: F401  (registers fxopt::crms_norm)

    assert_matches_torch(lambda x: torch.ops.fxopt.crms_norm(x * 3, 1e-5) + 1, torch.randn(2, 5, 15))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_has_no_scalar_erf_calls_on_cpu(approximate):
    fn = lambda x: F.gelu(x * 3, approximate=approximate)  # noqa: E731
    assert_matches_torch(fn, torch.randn(4, 64))
    assert "erff" not in tvm_build(fn, torch.randn(4, 64))[1].kernel_source("ll")


@pytest.mark.parametrize(
    "fn",
    [
        torch.tanh,
        torch.exp,
        lambda x: torch.pow(x, 3),
        lambda x: 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * torch.pow(x, 3)))),  # GPT-2's GELU
    ],
)
def test_transcendentals_have_no_scalar_libm_calls_on_cpu(fn):
    x = torch.randn(4, 64) * 3
    assert_matches_torch(lambda t: fn(t) * 2, x)
    assembly = tvm_build(lambda t: fn(t) * 2, x)[1].kernel_source("asm")
    assert not [call for call in ("expf@", "tanhf@", "powf@") if call in assembly]


@pytest.mark.parametrize("exponent", [2, 2.5, 0.5, -1])
def test_powers_other_than_small_whole_ones_are_tvm_power(exponent):
    assert_matches_torch(lambda x: torch.pow(x, exponent) + 1, torch.rand(3, 8) + 0.5)


@pytest.mark.parametrize("dims, keepdim", [([-1], True), ([1, 2], False)])
def test_amax(dims, keepdim):
    assert_matches_torch(lambda x: torch.amax(x * 2, dims, keepdim), torch.randn(2, 5, 6))


class QuantizedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, stride=2)
        self.grouped = torch.nn.Conv2d(8, 8, 3, padding=1, groups=4, bias=False)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.fc(x.mean((2, 3)) - 0.2)


@pytest.mark.parametrize("spec", ["quantize", "quantize{activations=symmetric}", "quantize{scheme=w8a8-dynamic}"])
def test_int8_quantized_graphs_lower_to_integer_kernels_with_the_reference_results(spec):
    from fxopt import PassManager

    program = capture(QuantizedNet(), (torch.randn(2, 3, 9, 9),))
    quantized, _ = PassManager(spec, verify="off", calibration=[torch.randn(2, 3, 9, 9)]).run(program)
    executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    source = executable.kernel_source("ll")
    assert "mul nsw <" in source and " i8>" in source  # vectorized integer arithmetic on int8 data
    assert_built_matches(quantized, executable)


class Int8ConvNet(torch.nn.Module):
    """Convolutions the int8 convolution family takes (16 or 32 outputs: whole blocks of 8 or 16 lanes): padded 3x3
    of an RGB image (its 3 channels re-blocked by the kernel), strided 1x1, dilated 3x3."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.strided = torch.nn.Conv2d(16, 16, 1, stride=2, bias=False)
        self.dilated = torch.nn.Conv2d(16, 32, 3, padding=(2, 1), dilation=(2, 1))

    def forward(self, x):
        return self.dilated(torch.relu(self.strided(torch.relu(self.first(x)))))


@pytest.mark.skipif(not HOST.avx2, reason="the int8 convolution kernel is for AVX2 CPUs")
def test_int8_convolutions_on_avx2_are_the_exact_hand_scheduled_kernel():
    from fxopt import PassManager

    x = torch.randn(2, 3, 9, 7)
    quantized, _ = PassManager("quantize", verify="off", calibration=[x]).run(capture(Int8ConvNet(), (x,)))
    with spy_on(CONV2D_INT8, WINOGRAD_INT8) as kernels:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    assert [ConvShape(*w)[:7] for w, _, _ in kernels] == [
        (2, 3, 9, 7, 16, 3, 3),
        (2, 16, 9, 7, 16, 1, 1),
        (2, 16, 5, 4, 32, 3, 3),
    ]
    assert_built_matches(quantized, executable)


@pytest.mark.skipif(not HOST.avx2, reason="the int8 convolution kernel is for AVX2 CPUs")
def test_blocked_int8_convolutions_run_on_their_blocked_values_without_layout_copies():
    from fxopt.passes import parse_pipeline
    from fxopt.passes.pipeline import with_pass

    x = torch.randn(2, 3, 9, 7)
    (quantize,) = parse_pipeline("quantize")
    transposes = {}
    for pipeline in ([quantize], with_pass(parse_pipeline("cpu"), quantize)):  # NCHW, then blocked
        quantized, _ = PassManager(pipeline, verify="off", calibration=[x]).run(capture(Int8ConvNet(), (x,)))
        blocked = [n for n in quantized.graph.nodes if n.target is torch.ops.fxopt.conv_q_blocked.default]
        with spy_on(CONV2D_INT8, WINOGRAD_INT8) as kernels:
            executable = build(quantized, CPU, dispatch="tvm")
        assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
        assert len(kernels) == 3  # each convolution the family's kernel, NCHW or blocked
        assert_built_matches(quantized, executable)
        transposes[len(blocked)] = len(re.findall(r"^define .*transpose", executable.kernel_source("ll"), re.M))
    # Blocked, the convolutions read the blocked quantizations and write blocked values (the RGB stem reads the
    # image in blocks of 1, NCHW itself): fewer layout copies than blocking and unblocking around every one.
    assert sorted(transposes) == [0, 3] and transposes[3] < transposes[0]


class Int8ResidualNet(torch.nn.Module):
    """A residual block of int8 convolutions: the inner one's ReLU and quantization on its tile (int8 written
    alone), the outer one's residual add, ReLU and quantization too, the stem's ReLU and quantization (the float
    written beside the int8 for both: the residual add and the head's read it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.inner = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.outer = torch.nn.Conv2d(16, 16, 1)
        self.head = torch.nn.Conv2d(16, 32, 1)

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = torch.relu(self.outer(torch.relu(self.inner(h))) + h)
        return self.head(h) + h.sum(1, keepdim=True)


@pytest.mark.skipif(not HOST.avx2, reason="the int8 convolution kernel is for AVX2 CPUs")
def test_blocked_int8_convolutions_requantize_on_their_tiles():
    from fxopt.passes import parse_pipeline
    from fxopt.passes.pipeline import with_pass

    x = torch.randn(2, 3, 9, 7)
    pipeline = with_pass(parse_pipeline("cpu"), parse_pipeline("quantize")[0])
    quantized, _ = PassManager(pipeline, verify="off", calibration=[x]).run(capture(Int8ResidualNet(), (x,)))
    with spy_on(CONV2D_INT8, WINOGRAD_INT8) as kernels:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    tails = [
        (variant.epilogue.ops if variant.epilogue else (), variant.requantized, variant.float_too)
        for _, _, variant in kernels
    ]
    # The head's result is the network's.
    assert tails == [
        (("relu",), True, True),
        (("relu",), True, False),
        (("add", "relu"), True, True),
        ((), False, False),
    ]
    assert_built_matches(quantized, executable)


@pytest.mark.skipif(not HOST.avx2, reason="the int8 convolution kernels are for AVX2 CPUs")
def test_int8_3x3_convolutions_for_avx2_are_winograds_with_their_tails_exactly():
    # For vpmaddwd (an AVX2 target, whatever the host): the residual block's inner 3x3 stride-1 convolution (40
    # tiles of 2x2) is F(2x2, 3x3) on int16 values, its ReLU and quantization on its output rows; the RGB stem (3
    # channels: no whole pairs) and the 1x1 ones stay direct. The same outputs as the reference.
    from fxopt.passes import parse_pipeline

    x = torch.randn(2, 3, 9, 7)
    pipeline = [*parse_pipeline("quantize"), *parse_pipeline("convert-layout{lanes=8}")]
    quantized, _ = PassManager(pipeline, verify="off", calibration=[x]).run(capture(Int8ResidualNet(), (x,)))
    with spy_on(CONV2D_INT8, WINOGRAD_INT8) as kernels:
        executable = build(quantized, parse_target("cpu:avx2"), dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    winograd = [
        (ConvShape(*w)[:7], v.epilogue.ops, v.requantized) for w, c, v in kernels if isinstance(c, WinogradInt8Config)
    ]
    assert winograd == [((2, 16, 9, 7, 16, 3, 3), ("relu",), True)]
    assert len(kernels) == 4
    assert_built_matches(quantized, executable)


@pytest.mark.skipif(not HOST.avx2, reason="the int8 convolution kernels are for AVX2 CPUs")
def test_a_quantized_inverted_residual_runs_on_the_int8_kernels_blocked():
    from fxopt.passes import parse_pipeline
    from fxopt.passes.pipeline import with_pass
    from tests.passes.test_convert_layout import QuantizedInvertedResidual

    lanes = HOST.lanes()
    if dot_instruction(HOST)[0] != lanes:
        pytest.skip("AVX-512 without VNNI: int8 dot products of 8 lanes, float blocks of 16")
    x = torch.randn(2, 3, 10, 9)
    pipeline = with_pass(parse_pipeline("cpu"), parse_pipeline("quantize")[0])
    model = QuantizedInvertedResidual()
    quantized, _ = PassManager(pipeline, verify="off", calibration=[x]).run(capture(model, (x,)))
    with spy_on(CONV2D_INT8, WINOGRAD_INT8) as convs, spy_on(DEPTHWISE_INT8) as depthwise:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    # The projection to 24 channels in blocks of 8 (VNNI's 256-bit form on AVX-512), the depthwise layer on its
    # own family, with its ReLU6 and the next quantization on its tile.
    assert [ConvShape(*w).out_block for w, _, _ in convs] == [lanes, lanes, 8, lanes]
    ((workload, _, variant),) = depthwise
    assert ConvShape(*workload)[4:7] == (48, 3, 3) and variant.requantized and variant.epilogue.ops == ("hardtanh",)
    assert_built_matches(quantized, executable)


def test_blocked_int8_convolutions_the_kernel_does_not_take_run_between_conversions():
    # Blocked by 16 channels for an AVX2 target, whose int8 kernel writes blocks of 8: Relax's int32 convolutions
    # between conversions, the same integers.
    from fxopt.passes import parse_pipeline

    x = torch.randn(2, 3, 9, 7)
    pipeline = [*parse_pipeline("quantize"), *parse_pipeline("convert-layout{lanes=16}")]
    quantized, _ = PassManager(pipeline, verify="off", calibration=[x]).run(capture(Int8ConvNet(), (x,)))
    assert [n.target for n in quantized.graph.nodes].count(torch.ops.fxopt.conv_q_blocked.default) == 3
    with spy_on(CONV2D_INT8, WINOGRAD_INT8) as kernels:
        executable = build(quantized, parse_target("cpu:avx2"), dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    assert not kernels
    assert_built_matches(quantized, executable)


class Int8MLP(torch.nn.Module):
    def __init__(self, bias: bool):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(24, 48, bias=bias)
        self.down = torch.nn.Linear(48, 16, bias=bias)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)) - 0.1)


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled int8 kernel is for AVX2 CPUs")
@pytest.mark.parametrize(
    "spec, rows, bias",
    [
        ("quantize", (2, 4), True),
        ("quantize{activations=symmetric}", (5,), False),
        ("quantize{scheme=w8a8-dynamic}", (3, 2), True),
    ],
)
def test_int8_linear_on_avx2_is_the_exact_hand_scheduled_kernel(spec, rows, bias):
    # Which instruction LLVM picks for the intrinsic depends on the host (vpmaddwd on AVX2, vpdpwssd with
    # AVX-512 VNNI): what is tested is that both layers took the hand-scheduled kernel, and that it is exact.
    from fxopt import PassManager

    x = torch.randn(*rows, 24)
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(Int8MLP(bias), (x,)))
    with spy_on(GEMM_INT8) as kernels:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    # (in, out) features of up and down; up's ReLU and subtraction on its tile and, with static scales, the
    # quantization of down's input too: up writes int8.
    assert [(w[1:], v.epilogue.ops if v.epilogue else (), v.requantized) for w, _, v in kernels] == [
        ((24, 48), ("relu", "sub"), "dynamic" not in spec),
        ((48, 16), (), False),
    ]
    assert_built_matches(quantized, executable)


# Seven-bit weights for an AVX2 CPU without VNNI: the linears and the direct convolutions take the vpmaddubsw
# families (the 3x3 stride-1 one, Winograd, stays vpmaddwd's), exact; full-range weights keep the vpmaddwd ones.
@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled int8 kernels are for AVX2 CPUs")
@pytest.mark.parametrize("bits", [7, 8])
def test_seven_bit_weights_on_avx2_take_the_vpmaddubsw_kernels(bits):
    avx2 = parse_target("cpu:avx2")
    x = torch.randn(3, 24)
    spec = f"quantize{{weight-bits={bits}}}"
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(Int8MLP(True), (x,)))
    assert {int(c.abs().max()) for c in quantized.graph_module.state_dict().values() if c.dtype == torch.int8} == {
        2 ** (bits - 1) - 1
    }
    with spy_on(GEMM_INT8_7BIT) as seven, spy_on(GEMM_INT8) as full:
        executable = build(quantized, avx2, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    assert [w[1:] for w, _, _ in (seven if bits == 7 else full)] == [(24, 48), (48, 16)]
    assert not (full if bits == 7 else seven)
    assert_built_matches(quantized, executable)

    image = torch.randn(2, 3, 9, 7)
    quantized, _ = PassManager(spec, verify="off", calibration=[image]).run(capture(Int8ConvNet(), (image,)))
    with spy_on(CONV2D_INT8_7BIT) as seven, spy_on(CONV2D_INT8, WINOGRAD_INT8) as others:
        executable = build(quantized, avx2, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    assert len(seven) == (3 if bits == 7 else 0) and len(others) == 3 - len(seven)
    assert_built_matches(quantized, executable)


@pytest.mark.parametrize(
    "spec, family, instruction",
    [("quantize", GEMM_INT8, "tdpbusd"), ("quantize{scheme=bf16}", GEMM_BF16, "tdpbf16ps")],
)
def test_quantized_linears_built_for_sapphire_rapids_take_amx_tiles_where_they_are_whole(spec, family, instruction):
    # Cross-built (this host need not have AMX): the first layer's 32 rows x 64 inputs x 48 outputs are whole tiles
    # (one row tile by three column tiles), the second's 48 inputs are not (the VNNI / AVX-512 BF16 kernel); the
    # module builds for the CPU, AMX in its assembly.
    from fxopt.codegen.compile import compile_module, kernel_source

    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 64)).eval()
    x = torch.randn(32, 64)
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(model, (x,)))
    target = parse_target("x86_64:sapphirerapids")
    with spy_on(family) as kernels:
        mod = lower_graph(quantized.graph_module, "main", target)
    assert [(w, str(c)) for w, c, _ in kernels][0] == ((32, 64, 48), "16x3 AMX tile")
    assert [(w, c.amx) for w, c, _ in kernels][1:] == [((32, 48, 64), False)]
    asm = kernel_source(compile_module(mod, target), "asm")
    assert re.search(rf"^\s+{instruction}\s+%tmm6, %tmm3, %tmm2$", asm, re.MULTILINE)  # the third column's tile


@pytest.mark.skipif(not HOST.avx2, reason="the attention kernel is for x86 CPUs with AVX2")
def test_int8_attention_lowers_to_the_attention_kernel_on_integer_levels():
    # Q, K and V read through the fused projection's views, the heads merged by the kernel's layout; the outputs
    # those of the reference but where a weight rounds to a neighbouring level (the dispatcher's allowance).
    from fxopt.codegen.dispatch import rounding_allowance
    from tests.passes.test_quantize import SelfAttention, attention_batches

    calibration = attention_batches()
    program = capture(SelfAttention().eval(), calibration[0])
    quantized, _ = PassManager("quantize{attention=int8}", verify="off", calibration=calibration).run(program)
    with spy_on(ATTENTION_F32) as kernels:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    ((workload, _, inputs),) = kernels
    assert workload == (2, 4, 12, 12, 16) and inputs.quantized and inputs.heads_inside
    assert all(gather is not None for gather in inputs.gathers)
    expected = quantized.run_flat()
    allowance = rounding_allowance(quantized.graph_module, expected)
    worst, _, failing = compare_outputs(executable.module.run_flat(), expected, Tolerance(), allowance=allowance)
    assert failing is None, f"max abs error {worst}"


@pytest.mark.parametrize("spec", ["cpu", "cpu:avx2"])
def test_bf16_linears_lower_to_the_bf16_gemm_or_float32_sums_of_the_same_products(spec):
    # With AVX-512 BF16 the family's kernel, its epilogue on the tile; elsewhere the activations rounded to
    # bfloat16 as PyTorch rounds, times the widened weights: either way the reference's products, summed in
    # float32, so within the float tolerance of the reference (a rounding done otherwise would move the outputs
    # by up to 2^-8 of the activations).
    from fxopt import PassManager

    x = torch.randn(2, 6, 24) * 3
    quantized, _ = PassManager("quantize{scheme=bf16}", verify="off").run(capture(Int8MLP(True), (x,)))
    target = parse_target(spec)
    with spy_on(GEMM_BF16) as kernels:
        executable = build(quantized, target, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    if GEMM_BF16.applies((12, 24, 48), Isa.of(target)):
        assert [(w, v.ops if v else ()) for w, _, v in kernels] == [((12, 24, 48), ("relu", "sub")), ((12, 48, 16), ())]
    else:
        assert not kernels
    assert_built_matches(quantized, executable)


def gemm_calls(kernels) -> list[tuple]:
    """The float32 GEMM's kernels as (rows, in, out, the epilogue's ops, tile); untuned, so each with the default
    config."""
    assert all(config == GEMM_F32.default(workload, HOST) for workload, config, _ in kernels)
    return [(*workload, epilogue.ops if epilogue else (), config.tile) for workload, config, epilogue in kernels]


def new_gelu(y):  # GPT-2's NewGELUActivation, spelled out in seven ops
    return 0.5 * y * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (y + 0.044715 * torch.pow(y, 3.0))))


# A GEMM's tail and the ops its kernel computes on the tile: ``tail(y, o)`` of the GEMM's result ``y`` and
# ``o = before(r)``, computed before the GEMM from an input ``r`` of ``y``'s shape.
TAILS = {
    "none": (None, lambda y, o: y, ()),
    "gelu": (None, lambda y, o: F.gelu(y), ("gelu",)),
    "gelu-tanh": (None, lambda y, o: F.gelu(y, approximate="tanh"), ("gelu",)),
    "gpt-2 gelu": (None, lambda y, o: new_gelu(y), ("mul", "pow", "mul", "add", "mul", "tanh", "add", "mul")),
    "gelu read twice": (None, lambda y, o: F.gelu(y) + y, ("gelu", "add")),
    "residual, scale, relu": (None, lambda y, o: torch.relu((y + o) * 0.5), ("add", "mul", "relu")),
    # Export spells SiLU as x * sigmoid(x).
    "silu by a column vector": (lambda r: r.flatten(0, -2)[0], lambda y, o: F.silu(y) * o, ("sigmoid", "mul", "mul")),
    "sigmoid minus one value": (lambda r: r.flatten()[:1], lambda y, o: torch.sigmoid(y) - o, ("sigmoid", "sub")),
    "result read outside the tail": (None, lambda y, o: (torch.relu(y), y), ()),
    "tail read outside": (None, lambda y, o: (lambda t: (t * 2, t))(torch.relu(y)), ("relu",)),
    "result read by two tails": (None, lambda y, o: (torch.relu(y) * 2, torch.tanh(y)), ()),
    "operand after the gemm": (None, lambda y, o: y + torch.exp(o), ()),
    "integer division": (None, lambda y, o: torch.div(y, o, rounding_mode="floor"), ()),
}


def build_gemm_with_tail(tail: str, rows: list[int], in_features: int, out_features: int, bias: bool = True):
    layer = torch.nn.Linear(in_features, out_features, bias=bias)
    before, fn, _ = TAILS[tail]
    with spy_on(GEMM_F32) as kernels:
        program, executable = tvm_build(
            lambda x, r: (lambda o: fn(layer(x), o))(before(r) if before else r),
            torch.randn(*rows, in_features),
            torch.randn(*rows, out_features),
        )
    assert executable.backend == "tvm"
    assert_built_matches(program, executable)
    return gemm_calls(kernels)


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
@pytest.mark.parametrize("tail", TAILS)
def test_elementwise_ops_after_the_gemm_are_computed_on_its_tile(tail):
    assert build_gemm_with_tail(tail, [2, 3], 20, 37) == [(6, 20, 37, TAILS[tail][2], TILE)]


# One step of a random tail: what it does to the running value ``v`` (reading the GEMM's result ``y``, a whole
# tensor ``r``, a column vector ``c`` and a one-element tensor ``s``, all computed before the GEMM), and the ops
# export spells it as.
TAIL_STEPS = {
    "add whole": (lambda v, y, r, c, s: v + r, ("add",)),
    "times column": (lambda v, y, r, c, s: v * c, ("mul",)),
    "minus one value": (lambda v, y, r, c, s: v - s, ("sub",)),
    "divide by a number": (lambda v, y, r, c, s: v / 3.0, ("div",)),
    "add the result again": (lambda v, y, r, c, s: v + y, ("add",)),
    "relu": (lambda v, y, r, c, s: torch.relu(v), ("relu",)),
    "tanh": (lambda v, y, r, c, s: torch.tanh(v), ("tanh",)),
    "sigmoid": (lambda v, y, r, c, s: torch.sigmoid(v), ("sigmoid",)),
    "silu": (lambda v, y, r, c, s: F.silu(v), ("sigmoid", "mul")),
    "gelu": (lambda v, y, r, c, s: F.gelu(v), ("gelu",)),
    "gelu-tanh": (lambda v, y, r, c, s: F.gelu(v, approximate="tanh"), ("gelu",)),
    "square": (lambda v, y, r, c, s: torch.pow(v, 2), ("pow",)),
    "negate": (lambda v, y, r, c, s: -v, ("neg",)),
    "view": (lambda v, y, r, c, s: v.reshape(-1, v.shape[-1]).view(v.shape), ()),
}


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
@settings(max_examples=8, deadline=None)
@given(st.lists(st.sampled_from(sorted(TAIL_STEPS)), min_size=1, max_size=6), st.integers(0, 2**16))
def test_random_elementwise_tails_are_computed_on_the_tile_and_match_pytorch(steps, seed):
    torch.manual_seed(seed)
    kernels = build_gemm_with_tail_steps(steps)
    ops = tuple(op for step in steps for op in TAIL_STEPS[step][1])
    assert gemm_calls(kernels) == [(6, 12, 20, ops, TILE)]


def build_gemm_with_tail_steps(steps: list[str]) -> list[tuple]:
    """Build a 12 -> 20 linear followed by ``steps`` of :data:`TAIL_STEPS` in TVM, check it against PyTorch, and
    return the float32 GEMM kernels built (``spy_on``)."""
    layer = torch.nn.Linear(12, 20)

    def model(x, r):
        c, s = r[0, 0], r.flatten()[:1]  # a column vector and one value, both before the GEMM
        y = value = layer(x)
        for step in steps:
            value = TAIL_STEPS[step][0](value, y, r, c, s)
        return value

    with spy_on(GEMM_F32) as kernels:
        program, executable = tvm_build(model, torch.randn(2, 3, 12), torch.randn(2, 3, 20))
    assert executable.backend == "tvm"
    assert_built_matches(program, executable)
    return kernels


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
def test_a_tail_whose_ops_read_their_input_again_computes_each_such_value_once_per_tile():
    # Found by the random tails above (CI seed 3752555853): inlined into each other, GELU-tanh, GELU, tanh and
    # SiLU (each reads its input several times) grew the tile's expression exponentially; TVM compiled that one
    # GEMM for over ten minutes. Each value read again is now computed once per tile.
    (args,) = build_gemm_with_tail_steps(["gelu-tanh", "gelu", "view", "tanh", "silu"])
    kept = re.findall(r'sblock\("(epilogue_kept_\w+)"', GEMM_F32.build(*args).script())
    assert len(kept) == 3  # GELU-tanh's, GELU's and tanh's results; SiLU's is the kernel's output


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
@settings(max_examples=16, deadline=None)
@given(
    st.lists(st.integers(1, 7), min_size=1, max_size=3),
    st.integers(1, 70),
    st.integers(1, 50),
    st.booleans(),
    st.sampled_from(sorted(TAILS)),
    st.integers(0, 2**16),
)
def test_float_linear_on_avx2_is_the_hand_scheduled_gemm(rows, in_features, out_features, bias, tail, seed):
    # Any leading dims (flattened into rows, a partial last row tile), any K, any outputs (a partial last panel),
    # with or without a tail.
    torch.manual_seed(seed)
    calls = build_gemm_with_tail(tail, rows, in_features, out_features, bias)
    assert calls == [(math.prod(rows), in_features, out_features, TAILS[tail][2], TILE)]


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled attention is for AVX2 CPUs")
@settings(max_examples=10, deadline=None)
@given(
    st.tuples(
        st.integers(1, 2),
        st.integers(1, 3),
        st.integers(1, 13),
        st.one_of(st.integers(1, 19), st.sampled_from([64, 72, 128])),  # from 64 keys, each row's sum in 8 lanes
        st.integers(1, 40),
    ),
    st.sampled_from(["none", "bool", "float", "causal", "causal+bool"]),
    st.sampled_from([(1, 1), (2, 1), (2, 3), (0, 0)]),  # the mask's own batch and head dims (0: a 2-D mask)
    st.booleans(),
    st.integers(0, 2**16),
)
def test_float_attention_on_avx2_is_the_hand_scheduled_kernel(shape, mask_kind, mask_dims, mask_is_input, seed):
    # Tiles of 6 query rows and 16 columns: partial tiles, one row (decoding), keys fewer than a panel; a row
    # whose keys are all masked out (the first, under a bool mask) gives zeros as in PyTorch. A constant mask
    # becomes the kernel's bias at lowering, one passed in is turned into it by Relax ops.
    batch, heads, length, source, dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k, v = (torch.randn(batch, heads, source, dim, generator=generator) for _ in range(2))
    mask_shape = [min(d, n) for d, n in zip(mask_dims, (batch, heads)) if d] + [length, source]
    kwargs = {"scale": 0.3, "is_causal": mask_kind.startswith("causal")}
    if "bool" in mask_kind:
        kwargs["attn_mask"] = torch.rand(mask_shape, generator=generator) > 0.3
        kwargs["attn_mask"][..., 0, :] = False
    elif mask_kind == "float":
        kwargs["attn_mask"] = torch.randn(mask_shape, generator=generator)
    mask = kwargs.pop("attn_mask", None) if mask_is_input else None
    with spy_on(ATTENTION_F32) as kernels:
        if mask is None:
            program, executable = tvm_build(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kwargs), q, k, v)
        else:
            attention = lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, attn_mask=m, **kwargs)  # noqa: E731
            program, executable = tvm_build(attention, q, k, v, mask)
    assert executable.backend == "tvm" and [workload for workload, *_ in kernels] == [
        (batch, heads, length, source, dim)
    ]
    assert_built_matches(program, executable)


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled attention is for AVX2 CPUs")
@pytest.mark.parametrize("parts", ["split", "slices"])
def test_attention_reads_q_k_v_where_their_layout_chains_start(parts):
    # GPT-2 splits its fused projection, fxopt's fuse-projections slices it; both then view and transpose each
    # part per head, and transpose the result back. The kernel reads the projection itself and writes the heads
    # merged: the copies the chains made are not built.
    heads, dim, length = 3, 8, 10
    projection = torch.nn.Linear(24, 3 * heads * dim)

    def attention(x):
        qkv = projection(x)
        if parts == "split":
            pieces = qkv.split(heads * dim, dim=-1)
        else:
            pieces = [qkv[..., i * heads * dim : (i + 1) * heads * dim] for i in range(3)]
        q, k, v = (piece.view(1, length, heads, dim).transpose(1, 2) for piece in pieces)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return out.transpose(1, 2).reshape(1, length, heads * dim)

    with spy_on(ATTENTION_F32) as kernels:
        program, executable = tvm_build(attention, torch.randn(1, length, 24))
    assert executable.backend == "tvm"
    ((_, _, inputs),) = kernels
    gathers = inputs.gathers
    assert inputs.heads_inside
    # One source, the projection's result (the segment's input: the linear is a segment of its own).
    assert len({g.source for g in gathers}) == 1 and gathers[0].shape == (1, length, 3 * heads * dim)
    assert_built_matches(program, executable)
    kernels_built = [line for line in executable.kernel_source("ll").splitlines() if line.startswith("define")]
    assert not [line for line in kernels_built if any(op in line for op in ("split", "slice", "transpose"))]


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
@pytest.mark.parametrize("shape", [(5, 24, 40), (1, 7, 3)])
def test_addmm_by_a_constant_weight_is_the_hand_scheduled_gemm(shape):
    # GPT-2's Conv1D: addmm(bias, x, weight) with the weight [in, out].
    rows, in_features, out_features = shape
    weight, bias = torch.randn(in_features, out_features), torch.randn(out_features)
    with spy_on(GEMM_F32) as kernels:
        assert_matches_torch(lambda x: torch.addmm(bias, x, weight), torch.randn(rows, in_features))
    assert gemm_calls(kernels) == [(rows, in_features, out_features, (), TILE)]


@pytest.mark.skipif(not HOST.avx2, reason="the hand-scheduled float GEMM is for AVX2 CPUs")
@pytest.mark.parametrize("x_shape", [(5, 24), (2, 3, 24), (24,)])
def test_a_matmul_by_a_constant_matrix_is_the_hand_scheduled_gemm(x_shape):
    weight = torch.randn(24, 40)
    with spy_on(GEMM_F32) as kernels:
        assert_matches_torch(lambda x: torch.relu(x @ weight), torch.randn(x_shape))
    assert gemm_calls(kernels) == [(math.prod(x_shape[:-1]), 24, 40, ("relu",), TILE)]


CONSTANT = torch.randn(16, 16)


@pytest.mark.parametrize(
    "fn",
    [
        pytest.param(lambda x, w: F.linear(x, w * 2), id="computed weight"),
        pytest.param(lambda x, w: torch.addmm(x[0], x, CONSTANT, beta=0.5), id="scaled addmm"),
        pytest.param(lambda x, w: x @ w, id="matmul of two inputs"),
        pytest.param(lambda x, w: CONSTANT @ x, id="constant on the left"),
    ],
)
def test_matmuls_the_gemm_does_not_take_are_lowered_as_tvm_does(fn):
    with spy_on(GEMM_F32) as kernels:
        assert_matches_torch(fn, torch.randn(16, 16), torch.randn(16, 16))
    assert kernels == []


def test_a_reduction_over_unit_loops_is_not_scheduled_as_elementwise():
    # Pinned from tests/property/test_equivalence.py: a 1x1 convolution of one input channel looked injective.
    conv = torch.nn.Conv2d(1, 6, 1)
    assert_matches_torch(lambda x: conv(x), torch.randn(1, 1, 6, 6))


def test_elementwise_kernels_get_parallel_vector_schedules_on_cpu():
    program, executable = tvm_build(lambda x: torch.relu(x * 2 + 1), torch.randn(64, 256))
    source = executable.kernel_source("ll")
    assert "__tvm_parallel_lambda" in source and ("<8 x float>" in source or "<16 x float>" in source)


def test_kernels_writing_several_outputs_get_parallel_vector_schedules_on_cpu():
    # A split (BERT's fused Q/K/V projection into three heads) is one kernel with an output per part: left
    # unscheduled it ran as one thread of scalar loops.
    program, executable = tvm_build(lambda x: (x * 2).split(64, -1), torch.randn(64, 192))
    source = executable.kernel_source("ll")
    assert "__tvm_parallel_lambda" in source and ("<8 x float>" in source or "<16 x float>" in source)


def test_fp8_layers_run_in_pytorch_and_are_named():
    from fxopt import PassManager

    program = capture(QuantizedNet(), (torch.randn(2, 3, 9, 9),))
    quantized, _ = PassManager("quantize{scheme=fp8}", verify="off", calibration=[torch.randn(2, 3, 9, 9)]).run(program)
    executable = build(quantized, CPU, dispatch="tvm")
    assert any("float8_e4m3fn has no TVM equivalent" in line for line in executable.fallbacks), executable.fallbacks
    torch.testing.assert_close(executable.module.run_flat(), quantized.run_flat())


class WeightOnlyNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up = torch.nn.Linear(64, 48)
        self.down = torch.nn.Linear(48, 32, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def relax_constants(mod) -> set[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every tensor constant the Relax functions of ``mod`` pass to their kernels."""
    import tvm
    from tvm import relax

    found = set()

    def visit(expr):
        if isinstance(expr, tvm.ir.expr.Constant) and isinstance(expr.value, tvm.runtime.Tensor):
            found.add((tuple(expr.value.shape), str(expr.value.dtype)))

    for function in mod.functions.values():
        if isinstance(function, relax.Function):
            relax.analysis.post_order_visit(function, visit)
    return found


@pytest.mark.parametrize(
    "spec",
    [
        "quantize{scheme=w8 group-size=0}",
        "quantize{scheme=w4 group-size=16}",
        "quantize{scheme=w4 group-size=16 weights=asymmetric}",
    ],
)
def test_weight_only_layers_dequantize_inside_one_matmul_kernel(spec):
    import tvm

    from fxopt import PassManager
    from fxopt.codegen.compile import fusion_passes

    x = torch.randn(2, 5, 64)
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(WeightOnlyNet(), (x,)))
    executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    assert_built_matches(quantized, executable)
    # After constant folding the kernels still read integer weights: no float weight was materialized.
    with tvm.target.Target({"kind": "llvm"}):
        fused = tvm.transform.Sequential(fusion_passes())(lower_graph(quantized.graph_module, "main"))
    packed = 2 if "w4" in spec else 1
    weight_shapes = {(48, 64 // packed), (32, 48 // packed)}
    assert {c for c in relax_constants(fused) if c[0] in weight_shapes} == {
        (shape, "uint8" if packed == 2 else "int8") for shape in weight_shapes
    }


@pytest.mark.skipif(not HOST.avx2, reason="the weight-only GEMM's x86 kernel is for AVX2 CPUs")
@pytest.mark.parametrize(
    "spec, group_size, bits",
    [
        ("quantize{scheme=w8 group-size=0}", (64, 48), 8),
        ("quantize{scheme=w4 group-size=16 weights=asymmetric}", (16, 16), 4),
    ],
)
@pytest.mark.parametrize("shape", [(1, 64), (2, 5, 64)])  # one row (decode), rows of a tile and a partial one
def test_weight_only_layers_run_the_weight_only_gemm_on_their_integer_weights(spec, group_size, bits, shape):
    import tvm

    from fxopt.codegen.compile import fusion_passes

    x = torch.randn(*shape)
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(WeightOnlyNet(), (x,)))
    with spy_on(GEMM_WQ) as kernels:
        executable = build(quantized, CPU, dispatch="tvm")
    assert executable.backend == "tvm", (executable.segments, executable.fallbacks)
    rows = x.numel() // 64
    assert [w for w, _, _ in kernels] == [(rows, 64, 48, group_size[0], bits), (rows, 48, 32, group_size[1], bits)]
    assert kernels[0][2].ops == ("relu",) and kernels[1][2] is None  # the ReLU on the first one's tile
    assert_built_matches(quantized, executable)
    # The kernels read integer weights (packed into panels), no float copy of them
    with CPU.tvm():
        fused = tvm.transform.Sequential(fusion_passes())(lower_graph(quantized.graph_module, "main", CPU))
    constants = relax_constants(fused)
    integer = "uint8" if bits == 4 else "int8"
    assert sorted(math.prod(s) * (2 if bits == 4 else 1) for s, t in constants if t == integer) >= [64 * 32, 64 * 48]
    assert not [s for s, t in constants if t == "float32" and math.prod(s) >= 32 * 48]


@pytest.mark.parametrize(
    "net, shape, spec, weight_type",
    [
        (Int8MLP(True), (2, 4, 24), "quantize", r"(signed char|int8_t)"),
        (QuantizedNet(), (2, 3, 9, 9), "quantize{scheme=w8a8-dynamic}", r"(signed char|int8_t)"),
        (WeightOnlyNet(), (2, 5, 64), "quantize{scheme=w4 group-size=16}", r"(unsigned char|uint8_t|uchar)"),
    ],
)
def test_quantized_graphs_build_cuda_kernels_reading_integer_buffers(net, shape, spec, weight_type):
    import re

    from fxopt import PassManager

    x = torch.randn(*shape)
    quantized, _ = PassManager(spec, verify="off", calibration=[x]).run(capture(net, (x,)))
    executable = build(quantized, parse_target("cuda:sm_90"))  # generated and compiled here; runs on a GPU
    assert not executable.fallbacks and all("built only" in s.reason for s in executable.segments)
    assert re.search(weight_type + r"\*\s*__restrict__", executable.kernel_source())


@pytest.mark.parametrize("case", ["none", "bool", "float", "causal", "scale", "gqa"])
def test_attention(case):
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8)
    kwargs = {}
    if case == "bool":
        kwargs["attn_mask"] = torch.rand(6, 5) > 0.3
        kwargs["attn_mask"][:, 0] = True  # no fully masked row: PyTorch gives NaN there
    elif case == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 6, 5)
    elif case == "causal":
        k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
        kwargs["is_causal"] = True
    elif case == "scale":
        kwargs["scale"] = 0.7
    elif case == "gqa":
        k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
        kwargs["enable_gqa"] = True
    assert_matches_torch(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, **kwargs) + 1, q, k, v)


def test_a_wrong_lowering_is_caught_and_runs_in_pytorch(monkeypatch):
    """An override that gives the wrong dtype is refused by the type check; the segment stays correct."""
    from tvm import relax

    monkeypatch.setitem(
        OVERRIDES,
        torch.ops.aten.cumsum.default,
        lambda node, imp: imp.block_builder.emit(relax.op.cumsum(imp.env[node.args[0]], axis=1)),
    )
    program, executable = tvm_build(lambda t: torch.cumsum(t, 1) + 1, torch.rand(2, 7) > 0.5)
    (segment,) = executable.segments
    assert segment.backend == "torch"
    assert "cumsum" in segment.reason and "dtype bool" in segment.reason and "int64" in segment.reason
    assert torch.equal(executable.module.run_flat()[0], program.run_flat()[0])


def test_numerically_wrong_kernels_are_not_dispatched(monkeypatch):
    """A lowering with the right type but wrong values is caught by the per-segment check."""
    from tvm import relax

    monkeypatch.setitem(
        OVERRIDES,
        torch.ops.aten.cumsum.default,
        lambda node, imp: imp.block_builder.emit(relax.op.cumsum(imp.env[node.args[0]], axis=0)),
    )
    program, executable = tvm_build(lambda t: torch.cumsum(t, 1) * 2, torch.randn(3, 7))
    (segment,) = executable.segments
    assert segment.backend == "torch" and "differs" in segment.reason
    assert torch.equal(executable.module.run_flat()[0], program.run_flat()[0])


def test_ops_without_lowering_run_in_pytorch_and_are_named():
    program, executable = tvm_build(lambda x: torch.special.erfinv(torch.tanh(x) * 0.5).relu() * 2, torch.randn(4, 8))
    erfinv = next(n for n in program.graph.nodes if "erfinv" in str(n.target))
    assert is_lowerable(erfinv) == "no lowering for 'erfinv.default'"
    assert any("erfinv" in line for line in executable.fallbacks)
    assert executable.backend == "tvm+torch"
    assert [s.backend for s in executable.segments] == ["tvm", "tvm"]  # tanh*0.5 before, relu*2 after
    assert_built_matches(program, executable)


def test_register_lowering_extends_the_table(monkeypatch):
    monkeypatch.delitem(OVERRIDES, torch.ops.aten.rms_norm.default)
    program = capture(Fn(lambda x: F.rms_norm(x, (4,))), (torch.randn(2, 4),))
    node = next(n for n in program.graph.nodes if n.op == "call_function")
    assert is_lowerable(node) == "no lowering for 'rms_norm.default'"
    calls = []

    @register_lowering(torch.ops.aten.rms_norm.default)
    def lowering(node, importer):
        calls.append(node.name)
        from tvm import relax

        x = importer.env[node.args[0]]
        return importer.block_builder.emit(
            relax.op.nn.rms_norm(
                x, relax.const([1.0] * 4, "float32"), axes=[-1], epsilon=torch.finfo(torch.float32).eps
            )
        )

    assert is_lowerable(node) is None
    executable = build(program, CPU, dispatch="tvm")
    assert calls and executable.segments[0].backend == "tvm"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_matmuls_and_convolutions_lower_and_accumulate_in_float32(dtype):
    # TVM's importer gives these ops float32 results and then added a half-precision bias to them, which Relax
    # refused: every half-precision linear, conv and addmm ran in PyTorch.
    g = torch.Generator().manual_seed(0)
    conv_w, conv_b, w, b, mm_w, mm_b = (
        torch.randn(*s, generator=g).to(dtype) for s in [(8, 3, 3, 3), (8,), (16, 8), (16,), (16, 4), (4,)]
    )

    def layers(x):
        h = F.linear(F.conv2d(x, conv_w, conv_b, padding=1).mean((2, 3)), w, b)
        q = h.reshape(2, 4, 4)
        return torch.addmm(mm_b, h, mm_w), torch.bmm(q, q.transpose(1, 2)), h @ mm_w

    assert_matches_torch(layers, torch.randn(2, 3, 8, 8, generator=g).to(dtype))


@pytest.mark.slow  # compiling the tensor-core kernel's CUDA C takes over a minute here
def test_float16_matmuls_run_on_tensor_cores_on_cuda():
    weight = torch.randn(512, 256, dtype=torch.float16)
    program = capture(Fn(lambda x: F.gelu(F.linear(x, weight))), (torch.randn(128, 256, dtype=torch.float16),))
    executable = build(program, parse_target("cuda:sm_90"), dispatch="tvm")  # built here, run where a GPU is
    assert "wmma" in executable.kernel_source()  # DLight's tensor-core rule took the matmul


class Bottleneck(torch.nn.Module):
    """ResNet's residual tail (conv, add, ReLU) and MobileNetV2's depthwise convolution with ReLU6, blocked."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(16, 16, 3, padding=1)
        self.depthwise = torch.nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False)

    def forward(self, x):
        y = torch.relu(self.conv(x) + x)
        return F.relu6(self.depthwise(F.max_pool2d(y, 3, 1, 1)))


@pytest.mark.skipif(not HOST.avx2, reason="the convolution kernels are for AVX2 CPUs")
@pytest.mark.parametrize("size, family", [(9, WINOGRAD_F32), (4, CONV2D_F32)])
def test_blocked_convolutions_are_the_families_kernels_with_their_tails_on_the_tile(size, family):
    # A 3x3 stride-1 convolution: Winograd's where it has enough 4x4 output tiles (2 images x 3 x 3), else direct.
    program = capture(Bottleneck().eval(), (torch.randn(2, 16, size, size),))
    program, _ = PassManager(f"convert-layout{{lanes={HOST.lanes()}}}", verify="off").run(program)
    with spy_on(family) as convs, spy_on(DEPTHWISE_F32) as depthwise:
        executable = build(program, CPU, dispatch="tvm")
    assert executable.backend == "tvm" and all(s.backend == "tvm" for s in executable.segments)
    assert_built_matches(program, executable)
    ((workload, _, tail),) = convs
    assert workload[:5] == (2, 16, size, size, 16) and tail.ops == ("add", "relu")
    ((workload, _, tail),) = depthwise
    assert workload[7:9] == (2, 2) and tail.ops == ("hardtanh",)


class ResNeXtBlock(torch.nn.Module):
    """ResNeXt's bottleneck: a 1x1, a grouped 3x3 of 4 channels a group (fewer than a block), a grouped 1x1 of 16
    channels a group, the residual."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.reduce = torch.nn.Conv2d(32, 32, 1)
        self.grouped = torch.nn.Conv2d(32, 32, 3, padding=1, groups=8)
        self.expand = torch.nn.Conv2d(32, 32, 1, groups=2)

    def forward(self, x):
        y = torch.relu(self.grouped(torch.relu(self.reduce(x))))
        return torch.relu(self.expand(y) + x)


@pytest.mark.skipif(not HOST.avx2, reason="the convolution kernels are for AVX2 CPUs")
def test_grouped_convolutions_are_the_direct_family_in_groups_merged_where_a_block_spans_several():
    program = capture(ResNeXtBlock().eval(), (torch.randn(2, 32, 6, 6),))
    program, _ = PassManager(f"convert-layout{{lanes={HOST.lanes()}}}", verify="off").run(program)
    with spy_on(CONV2D_F32) as convs, spy_on(WINOGRAD_F32) as winograd:
        executable = build(program, CPU, dispatch="tvm")
    assert executable.backend == "tvm" and all(s.backend == "tvm" for s in executable.segments)
    assert_built_matches(program, executable)
    assert sorted(ConvShape(*workload).groups for workload, _, _ in convs) == [1, 2]  # the 1x1s
    # The 3x3's 8 groups of 4 channels computed as 32 // lanes groups of a block's channels each (8 output tiles).
    assert [ConvShape(*workload).groups for workload, _, _ in winograd] == [32 // HOST.lanes()]


def test_convolution_kernels_name_their_own_shape_for_tuning_their_blocks_groups_unmerged():
    program = capture(ResNeXtBlock().eval(), (torch.randn(2, 32, 6, 6),))
    program, _ = PassManager("convert-layout{lanes=8}", verify="off").run(program)
    shapes = conv_shapes(lower_graph(program.graph_module, "main", target=parse_target("cpu:avx2")))
    assert sorted(shape.groups for shape in shapes) == [1, 2, 8]  # the 3x3's kernel computes 4 merged groups
    assert all(shape.in_block == shape.out_block == 8 for shape in shapes)


def test_a_block_wider_than_a_groups_channels_merges_groups_into_the_same_block_diagonal_convolution():
    shape = ConvShape(1, 32, 5, 5, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8, 16, 16)  # 2 channels in, 4 out a group
    assert merged_groups(shape) == 4  # 8 in, 16 out: whole blocks
    assert merged_groups(shape._replace(in_block=4, out_block=4)) == 8
    assert merged_groups(shape._replace(groups=1)) == 1
    weight, x = torch.randn(64, 2, 3, 3, dtype=torch.float64), torch.randn(1, 32, 5, 5, dtype=torch.float64)
    merged = block_diagonal(weight, 16, 4)
    assert merged.shape == (64, 8, 3, 3)
    assert torch.equal(merged[4:8, 2:4], weight[4:8]) and not merged[4:8, :2].any() and not merged[4:8, 4:].any()
    torch.testing.assert_close(F.conv2d(x, merged, padding=1, groups=4), F.conv2d(x, weight, padding=1, groups=16))


@pytest.mark.parametrize("kind", ["max", "avg"])
def test_blocked_pools_and_layout_conversions_lower_through_tvm(kind):
    def pooled(x):
        x = torch.ops.fxopt.to_blocked(x, 4)
        pool = torch.ops.fxopt.pool2d_blocked(x, kind, [3, 3], [2, 2], [1, 1], [1, 1], True, False)
        return torch.ops.fxopt.from_blocked(pool)

    assert_matches_torch(pooled, torch.randn(2, 8, 7, 6))


@pytest.mark.skipif(not HOST.avx2, reason="the depthwise kernel family is for AVX2 CPUs")
@pytest.mark.parametrize(
    "kernel, stride, padding, dilation, ceil_mode, size",
    [
        ([3, 3], [2, 2], [1, 1], [1, 1], False, (112, 112)),  # ResNet's
        ([3, 3], [2, 2], [0, 0], [1, 1], True, (13, 10)),  # the last windows past the input
        ([2, 3], [1, 2], [1, 0], [2, 1], True, (9, 8)),
        ([3, 3], [2, 2], [1, 1], [1, 1], False, (3, 2)),
    ],
)
def test_blocked_max_pools_are_the_depthwise_kernel_taking_the_maximum(
    monkeypatch, kernel, stride, padding, dilation, ceil_mode, size
):
    import fxopt.codegen.lower_conv as lower_conv

    def pooled(x):
        x = torch.ops.fxopt.to_blocked(x, 8)
        pool = torch.ops.fxopt.pool2d_blocked(x, "max", kernel, stride, padding, dilation, ceil_mode, False)
        return torch.ops.fxopt.from_blocked(pool)

    windows = []
    real = lower_conv.max_pool
    monkeypatch.setattr(lower_conv, "max_pool", lambda shape, config: windows.append(shape) or real(shape, config))
    assert_matches_torch(pooled, -torch.rand(1, 16, *size) - 1)  # all negative: a zero padding would show
    assert len(windows) == 1


def test_blocks_of_one_channel_are_nchw_itself_and_convert_without_a_copy():
    def rgb(x):  # an RGB image's 3 channels are blocks of one (convert-layout's channel_block)
        return torch.ops.fxopt.from_blocked(torch.relu(torch.ops.fxopt.to_blocked(x, 1)))

    x = torch.randn(1, 3, 5, 4)
    mod = lower_graph(capture(Fn(rgb), (x,)).graph_module, "main", target=None)
    assert "permute_dims" not in mod.script()
    assert_matches_torch(rgb, x)


def test_a_blocked_convolution_no_family_serves_converts_to_nchw_around_tvms():
    from fxopt.codegen.lower import lower_graph

    program = capture(Bottleneck().eval(), (torch.randn(1, 16, 6, 6),))
    program, _ = PassManager("convert-layout{lanes=8}", verify="off").run(program)
    with spy_on(CONV2D_F32) as convs:
        mod = lower_graph(program.graph_module, "main", target=None)  # no target: no ISA, no family
    assert not convs and "conv2d" in mod.script()
