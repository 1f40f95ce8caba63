"""The kernel families per ISA. The family protocol: every family registered, its default one of its space for every
ISA it applies to, its configs stored and read back. The float32 GEMM's register tile: run and compared with PyTorch
where the host has the ISA, built for a CPU that has it elsewhere (its code must then use that ISA's registers).
The attention kernel's schedule for every config of every ISA's space, run on this host (LLVM splits wider
vectors), and its AVX-512 build's registers. Every int8 GEMM config exact; every bfloat16 GEMM config the
reference's products summed in float32."""

import dataclasses
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt import capture
from fxopt.codegen.compile import STACK_SCRATCH_BYTES, compile_kernel
from fxopt.codegen.dispatch import ATTENTION_LEVEL_STEP
from fxopt.codegen.epilogue import find_epilogue
from fxopt.codegen.intrinsics.x86 import (
    SEVEN_BIT_WEIGHT,
    amx_dot,
    amx_tile_config,
    bf16_bits,
    dot_bf16_pairs,
    dot_u8s8_quads,
)
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels import FAMILIES, attention_f32, gemm_bf16, gemm_int8, template_workloads
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32, AttentionF32Config, AttentionInputs
from fxopt.codegen.kernels.base import AMX_TASKS
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32, ConvShape
from fxopt.codegen.kernels.conv2d_int8 import CONV2D_INT8, CONV2D_INT8_7BIT, Conv2dInt8Variant
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32, DepthwiseF32Config
from fxopt.codegen.kernels.depthwise_int8 import DEPTHWISE_INT8
from fxopt.codegen.kernels.gemm_bf16 import GEMM_BF16
from fxopt.codegen.kernels.gemm_f32 import (
    AVX2_TILE,
    AVX512_TILE,
    GEMM_F32,
    NEON_TILE,
    GemmF32Config,
    default_panels_per_task,
    default_tile,
)
from fxopt.codegen.kernels.gemm_int8 import (
    GEMM_INT8,
    GEMM_INT8_7BIT,
    GemmInt8Config,
    GemmInt8Variant,
    dot_instruction,
    seven_bit,
)
from fxopt.codegen.kernels.gemm_wq import GEMM_WQ
from fxopt.codegen.kernels.winograd_f32 import WINOGRAD_F32
from fxopt.codegen.kernels.winograd_int8 import MAX_CHANNELS, WINOGRAD_INT8
from fxopt.codegen.runtime import to_tvm
from fxopt.quant.formats import dequantize_groups
from fxopt.targets import host_cpu, parse_target

CPU = parse_target("cpu")
fxopt_ops = torch.ops.fxopt

# (tile, the CPU flag it needs, an LLVM CPU that has it, the registers its vectors live in)
ISAS = [
    pytest.param(AVX2_TILE, "avx2", "znver3", "%ymm", id="avx2"),
    pytest.param(AVX512_TILE, "avx512f", "znver4", "%zmm", id="avx512"),
]


class ScaledRelu:
    """An epilogue with an operand: ``relu(result) * scale`` with one scale per output column."""

    def __init__(self, columns: int):
        self.operand_shapes = [(columns,)]

    def __call__(self, result, operands):
        from tvm import topi

        return topi.multiply(topi.nn.relu(result), operands[0])


@pytest.mark.parametrize("tile, flag, mcpu, registers", ISAS)
@pytest.mark.parametrize(
    "shape, with_epilogue",
    # partial tiles and panels; several groups of panels per task, the last one partial; one row
    [((13, 37, 53), False), ((13, 37, 53), True), ((13, 37, 173), True), ((1, 64, 100), False)],
)
def test_dense_tile_matches_pytorch_or_builds_for_its_isa(tile, flag, mcpu, registers, shape, with_epilogue):
    import tvm

    rows, in_features, out_features = shape
    epilogue = ScaledRelu(out_features) if with_epilogue else None
    config = GemmF32Config(
        tile.rows, tile.vectors, tile.lanes, default_panels_per_task(in_features, out_features, tile, 256 << 10)
    )
    kernel = tvm.IRModule({"main": GEMM_F32.build((rows, in_features, out_features), config, epilogue)})
    if flag not in host_cpu().features:
        library = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
        assert registers in library.mod.inspect_source("asm")
        return
    x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    scale, out = torch.randn(out_features), torch.empty(rows, out_features)
    library = compile_kernel(kernel, parse_target("cpu").tvm())
    args = [x, GEMM_F32.pack(weight, config), bias, *([scale] if epilogue else []), out]
    library["main"](*map(to_tvm, args))
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(out, torch.relu(expected) * scale if epilogue else expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the float32 GEMM tiles are for x86 CPUs with AVX2")
def test_the_host_gets_the_tile_of_its_widest_vectors():
    tile = default_tile(Isa.of(CPU))
    assert tile.lanes * 32 == min(host_cpu().vector_bits, 512)
    assert tile.panel == tile.vectors * tile.lanes


@pytest.mark.parametrize(
    "spec, tile", [("cpu:avx2", AVX2_TILE), ("x86_64:znver4", AVX512_TILE), ("aarch64", NEON_TILE)]
)
def test_a_named_isa_gets_its_tile_whatever_the_host(spec, tile):
    assert default_tile(Isa.named(spec)) == tile


@pytest.mark.parametrize("l2_bytes", [256 << 10, 512 << 10, 1 << 20, 2 << 20])
@pytest.mark.parametrize("tile", [AVX2_TILE, AVX512_TILE], ids=["avx2", "avx512"])
def test_a_task_runs_as_many_panels_as_half_the_l2_holds_in_whole_groups(l2_bytes, tile):
    for in_features in (16, 384, 768, 1024, 3072, 4096, 16384):
        panel_bytes = in_features * tile.panel * 4
        fit = max(1, min(3, l2_bytes // 2 // panel_bytes))
        for out_features in (tile.panel * 16, tile.panel * 64, tile.panel * 5, 50257):
            per_task = default_panels_per_task(in_features, out_features, tile, l2_bytes)
            panels = -(-out_features // tile.panel)
            assert 1 <= per_task <= fit  # the group fits
            # the groups are whole, or so many that the last one's idle core costs little
            assert panels % per_task == 0 or panels >= 16 * per_task
            # and no larger count fitting would do as well
            assert not any(panels % n == 0 or panels >= 16 * n for n in range(per_task + 1, fit + 1))


# Each ISA's attention schedule, built for this host's CPU: a wider ISA's vectors are split by LLVM, so the
# schedule's logic (tiles, lanes of each row's max and sum, partial tiles and panels) is checked on every host.
ATTENTION_ISAS = [pytest.param("cpu:avx2", id="8 lanes"), pytest.param("cpu:avx512", id="16 lanes")]


#: Attention workloads ``(batch, heads, queries, keys, head size)``.
ATTENTION_SHAPES = st.tuples(
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 13),
    # Rows in lanes from 64 keys that are whole vectors of the ISA's lanes; fewer or a partial vector: serial.
    st.one_of(st.integers(1, 19), st.sampled_from([64, 72, 80, 128])),
    # Dims and keys that are whole vectors: K read in blocks transposed in registers.
    st.one_of(st.integers(1, 40), st.sampled_from([16, 32, 64])),
)
#: The mask's own batch and head dims.
MASK_DIMS = st.sampled_from([(1, 1), (2, 1), (2, 3)])


def _attention_case(shape, mask_dims, seed: int) -> tuple:
    """Random Q, K and V of attention workload ``shape`` and an additive mask of ``mask_dims`` (30% of it -inf,
    and a row whose every key is masked out: zeros, as PyTorch's SDPA gives), and the mask's shape."""
    batch, heads, length, source, dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k, v = (torch.randn(batch, heads, source, dim, generator=generator) for _ in range(2))
    bias_shape = (min(mask_dims[0], batch), min(mask_dims[1], heads), length, source)
    bias = torch.randn(bias_shape, generator=generator).masked_fill(
        torch.rand(bias_shape, generator=generator) > 0.7, float("-inf")
    )
    bias[..., 0, :] = float("-inf")
    return q, k, v, bias, bias_shape


@pytest.mark.parametrize("spec", ATTENTION_ISAS)
@settings(max_examples=6, deadline=None)
@given(ATTENTION_SHAPES, MASK_DIMS, st.integers(0, 2**16), st.integers(0, 99))
def test_every_attention_config_at_every_isas_lanes_matches_pytorch(spec, shape, mask_dims, seed, choice):
    import tvm

    q, k, v, bias, bias_shape = _attention_case(shape, mask_dims, seed)
    space = ATTENTION_F32.space(shape, Isa.named(spec))
    kernel = ATTENTION_F32.build(shape, space[choice % len(space)], AttentionInputs(bias_shape, 0.3))
    library = compile_kernel(tvm.IRModule({"main": kernel}), CPU.tvm())
    out = torch.full(q.shape, float("nan"))
    library["main"](*map(to_tvm, (q, k, v, bias, out)))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3).nan_to_num(0.0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


# int8 attention: the same schedules on int8 levels. Every sum is an integer float32 holds, so the kernel equals
# the reference but where TVM's exp and PyTorch's round a weight to neighbouring levels: at most one level's move
# (the dispatcher's allowance), and nearly every output exactly or within float32 rounding.
@pytest.mark.parametrize("spec", ATTENTION_ISAS)
@settings(max_examples=6, deadline=None)
@given(ATTENTION_SHAPES, MASK_DIMS, st.integers(0, 2**16), st.integers(0, 99), st.booleans())
def test_every_int8_attention_config_matches_the_reference(spec, shape, mask_dims, seed, choice, vnni):
    # vnni: Q·Kᵀ and P·V as vpdpbusd dot products where the tiles are whole (natively where the host has VNNI,
    # else by the instruction's definition); the float lanes' path otherwise.
    import tvm

    q, k, v, bias, bias_shape = _attention_case(shape, mask_dims, seed)
    q = q * 3
    # per-head scales a little short of each head's largest value: the extremes clamp to +-127
    scales = [t.abs().amax((0, 2, 3)) / 120 for t in (q, k, v)]
    space = ATTENTION_F32.space(shape, Isa.named(spec))
    variant = AttentionInputs(bias_shape, 0.3, quantized=True, vnni=vnni)
    with pytest.MonkeyPatch.context() as patch:
        if not Isa.of(CPU).vnni:
            patch.setattr(attention_f32, "dot_u8s8_quads", _vnni_by_its_definition)
        kernel = ATTENTION_F32.build(shape, space[choice % len(space)], variant)
        library = compile_kernel(tvm.IRModule({"main": kernel}), CPU.tvm())
    out = torch.full(q.shape, float("nan"))
    library["main"](*map(to_tvm, (q, k, v, bias, *scales, out)))
    expected = fxopt_ops.attention_q(q, k, v, bias, *scales, 0.3, False)
    difference = (out - expected).abs()
    assert float(difference.max()) <= ATTENTION_LEVEL_STEP * float(expected.abs().max()) + 1e-6
    assert float((difference <= 1e-5 * (1 + expected.abs())).float().mean()) >= 0.95


# int8 attention on VNNI: whole tiles of query rows and key panels take vpdpbusd for Q·Kᵀ, and for P·V where the
# head's columns are whole panels too (16 lanes on AVX-512, the VEX form's 8 on AVX-VNNI), exactly the reference's
# integers.
@pytest.mark.parametrize(
    "mcpu, instruction, lanes", [("znver4", "vpdpbusd", 16), ("alderlake", r"\{vex\}\s+vpdpbusd", 8)]
)
def test_int8_attention_takes_vnni_dot_products_for_whole_tiles(mcpu, instruction, lanes, monkeypatch):
    import tvm

    isa = Isa.named(f"x86_64:{mcpu}")
    shape = batch, heads, length, source, dim = (1, 2, 32, 64, 64)
    config = AttentionF32Config(8, 2, isa.lanes())
    variant = AttentionInputs((1, 1, length, source), 0.125, quantized=True, vnni=True)
    kernel = ATTENTION_F32.build(shape, config, variant)
    # two dot-product stages tensorized: Q·Kᵀ and P·V (the head's 64 columns are whole panels of 2 vectors)
    assert kernel.script().count("vpdpbusd") == 2
    # a head of 40 columns is not: P·V in float lanes
    assert ATTENTION_F32.build((*shape[:4], 40), config, variant).script().count("vpdpbusd") == 1
    asm = compile_kernel(tvm.IRModule({"main": kernel}), tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    assert (
        len(re.findall(instruction + r"\s[^\n]*%" + ("zmm" if lanes == 16 else "ymm"), asm.mod.inspect_source("asm")))
        >= 8
    )
    if not Isa.of(CPU).avx2:
        return
    if not Isa.of(CPU).vnni:
        monkeypatch.setattr(attention_f32, "dot_u8s8_quads", _vnni_by_its_definition)
    library = compile_kernel(tvm.IRModule({"main": ATTENTION_F32.build(shape, config, variant)}), CPU.tvm())
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, dim, generator=generator) * 2 for n in (length, source, source))
    scales = [t.abs().amax((0, 2, 3)) / 127 for t in (q, k, v)]
    bias = torch.zeros(1, 1, length, source)
    out = torch.full((batch, heads, length, dim), float("nan"))
    library["main"](*map(to_tvm, (q, k, v, bias, *scales, out)))
    expected = fxopt_ops.attention_q(q, k, v, bias, *scales, 0.125, False)
    assert float((out - expected).abs().max()) <= ATTENTION_LEVEL_STEP * float(expected.abs().max()) + 1e-6


def test_the_vnni_intrinsic_is_one_whatever_spelling_asks_for_it_first():
    # The int8 GEMM asks for dot_u8s8_quads(16), attention's Q·Kᵀ for dot_u8s8_quads(16, "global"): one intrinsic,
    # which the cache keys apart. Registering it twice raised, and BERT's int8 attention fell back to PyTorch.
    from tvm.s_tir import TensorIntrin

    assert dot_u8s8_quads(16, "global") == dot_u8s8_quads(16) == dot_u8s8_quads(16, "global")
    assert dot_u8s8_quads(16, "local") != dot_u8s8_quads(16)
    local_a = 'a: T.Buffer((4,), "uint8", scope="local"'
    assert local_a in TensorIntrin.get(dot_u8s8_quads(16, "local")).desc.script()
    assert local_a not in TensorIntrin.get(dot_u8s8_quads(16)).desc.script()


@pytest.mark.parametrize("spec", ATTENTION_ISAS)
def test_attention_transposes_k_in_registers_on_avx512_where_its_rows_are_whole_vectors(spec):
    import tvm

    isa = Isa.named(spec)
    workload = (1, 2, 5, 48, 32)  # keys and dims whole vectors of 8 and of 16 lanes
    kernel = ATTENTION_F32.build(workload, ATTENTION_F32.default(workload, isa))
    # The intrinsic's shuffles at 16 lanes, not a loop of single-float reads; AVX2 keeps the loop.
    assert ("T.Shuffle" in kernel.script()) == (isa.lanes() == 16)
    q, k, v = (torch.randn(1, 2, n, 32) for n in (5, 48, 48))
    out = torch.full((1, 2, 5, 32), float("nan"))
    library = compile_kernel(tvm.IRModule({"main": kernel}), CPU.tvm())
    library["main"](*map(to_tvm, (q, k, v, torch.zeros(1, 1, 5, 48), out)))
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["x86_64:sapphirerapids", "x86_64:znver4"])
def test_the_avx512_attention_computes_in_zmm_registers_with_each_row_max_in_lanes(spec):
    import tvm

    target = parse_target(spec)
    workload = (1, 12, 128, 128, 64)
    kernel = ATTENTION_F32.build(workload, ATTENTION_F32.default(workload, Isa.of(target)))
    asm = compile_kernel(tvm.IRModule({"main": kernel}), target.tvm()).mod.inspect_source("asm")
    fma = [line for line in asm.splitlines() if re.match(r"\s+vfmadd\w+ps\s", line)]
    assert fma and all("zmm" in line for line in fma)  # scores and P·V: every FMA on 16 lanes
    # The row max: packed maxima over the row's vectors, no chain of scalar ones.
    assert not re.search(r"\s+vmaxss\s", asm) and re.search(r"\s+vmaxps\s.*zmm", asm)


# --- the family protocol ---------------------------------------------------------------------------------------

FAMILY_ISAS = ["cpu:avx2", "cpu:avx512", "x86_64:sapphirerapids", "x86_64:znver3", "aarch64"]
WORKLOADS = {
    "gemm_f32": [(128, 768, 3072), (128, 3072, 768), (1, 64, 100), (13, 37, 53)],
    "gemm_int8": [(128, 384, 1536), (1, 64, 48), (24, 38, 48), (7, 16, 8)],
    "gemm_int8_7bit": [(128, 384, 1536), (1, 64, 48), (24, 40, 48), (7, 16, 8)],
    "gemm_bf16": [(128, 768, 3072), (1, 64, 48), (24, 38, 48), (7, 16, 16)],
    # rows, in, out, the group along K, bits
    "gemm_wq": [(128, 384, 1536, 128, 4), (1, 64, 48, 64, 8), (13, 32, 53, 16, 4)],
    # the output block is the dot instruction's lanes (8 for vpmaddwd: _applicable gives each ISA its own)
    "conv2d_int8": [
        (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 8),
        (2, 4, 5, 6, 8, 3, 3, 2, 1, 0, 2, 1, 0, 1, 2, 4, 8),
    ],
    "conv2d_int8_7bit": [
        (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 8),
        (2, 4, 5, 6, 8, 3, 3, 2, 1, 0, 2, 1, 0, 1, 2, 4, 8),
    ],
    "attention_f32": [(1, 12, 128, 128, 64), (2, 3, 5, 7, 9)],
    # N, C, H, W, O, KH, KW, strides, padding (top, left, bottom, right), dilations, input and output blocks
    "conv2d_f32": [
        (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 16),
        (1, 3, 9, 9, 24, 7, 7, 2, 2, 3, 3, 3, 3, 1, 1, 3, 8),
    ],
    "winograd_f32": [
        (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 16),
        (2, 3, 5, 6, 8, 3, 3, 1, 1, 0, 2, 1, 0, 1, 1, 3, 8),
    ],
    # 8-lane output blocks (vpmaddwd's), input blocks of whole pairs
    "winograd_int8": [
        (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 8),
        (2, 4, 5, 6, 24, 3, 3, 1, 1, 0, 2, 1, 0, 1, 1, 2, 8),
    ],
    "depthwise_f32": [
        (1, 96, 56, 56, 96, 3, 3, 2, 2, 0, 0, 1, 1, 1, 1, 16, 16, 96),
        (2, 8, 3, 3, 8, 5, 5, 1, 1, 2, 2, 2, 2, 1, 1, 4, 4, 8),
    ],
    "depthwise_int8": [
        (1, 96, 56, 56, 96, 3, 3, 2, 2, 0, 0, 1, 1, 1, 1, 16, 16, 96),
        (2, 8, 3, 3, 8, 5, 5, 1, 1, 2, 2, 2, 2, 1, 1, 4, 4, 8),
    ],
}


def _applicable(name: str, workload: tuple, isa: Isa) -> tuple:
    """``workload``, for the int8 convolution with the output block of ``isa``'s dot instruction."""
    if name != "conv2d_int8":
        return workload
    return ConvShape(*workload)._replace(out_block=dot_instruction(isa)[0]).workload


def test_every_family_is_registered_under_its_name():
    assert sorted(FAMILIES) == sorted(WORKLOADS)
    assert all(family.name == name for name, family in FAMILIES.items())


@pytest.mark.parametrize("spec", FAMILY_ISAS)
@pytest.mark.parametrize("name", sorted(WORKLOADS))
def test_a_familys_default_is_one_of_its_space_and_its_configs_are_stored_as_they_are(name, spec):
    family, isa = FAMILIES[name], Isa.named(spec)
    for workload in (_applicable(name, w, isa) for w in WORKLOADS[name]):
        if not family.applies(workload, isa):
            continue
        space = family.space(workload, isa)
        assert family.default(workload, isa) in space and len(set(space)) == len(space)
        for config in space:
            assert family.config_from(family.config_entry(config)) == config
            # the ISA's own vectors (int8: its dot instruction's, 8 lanes of vpmaddwd or vpmaddubsw without VNNI)
            lanes = family.instruction(isa)[0] if family in (GEMM_INT8, GEMM_INT8_7BIT) else isa.lanes()
            assert getattr(config, "lanes", lanes) == lanes
            if not getattr(config, "amx", False):  # AMX's accumulators are tiles, not vector registers
                assert getattr(config, "rows", 1) * getattr(config, "vectors", 1) <= isa.vector_registers


def test_which_isas_each_family_applies_to():
    applies = {
        spec: {
            name
            for name, family in FAMILIES.items()
            if family.applies(_applicable(name, WORKLOADS[name][0], Isa.named(spec)), Isa.named(spec))
        }
        for spec in FAMILY_ISAS
    }
    assert applies["aarch64"] == {
        "gemm_f32",
        "gemm_wq",
        "conv2d_f32",
        "depthwise_f32",
        "winograd_f32",
    }  # NEON: no attention, no int8 so far
    for spec in FAMILY_ISAS:  # x86: every family; the bfloat16 GEMM where there is AVX-512 BF16, the int8
        # Winograd convolution and the seven-bit families where the int8 dot product is vpmaddwd's int16 pairs (no
        # VNNI)
        bf16 = {"gemm_bf16"} if Isa.named(spec).avx512_bf16 else set()
        no_vnni = {"winograd_int8", "gemm_int8_7bit", "conv2d_int8_7bit"}
        pairs = set() if Isa.named(spec).vnni else no_vnni
        assert spec == "aarch64" or applies[spec] == set(WORKLOADS) - {"gemm_bf16", *no_vnni} | bf16 | pairs
    assert "winograd_int8" in applies["x86_64:znver3"] and "winograd_int8" not in applies["x86_64:sapphirerapids"]
    assert "gemm_bf16" in applies["x86_64:sapphirerapids"] and "gemm_bf16" not in applies["cpu:avx2"]
    assert not GEMM_INT8.applies((4, 15, 48), Isa.named("cpu:avx2"))  # odd input features: no int16 pairs


@pytest.mark.parametrize(
    "entry, error",
    [
        ({"rows": 4, "vectors": 3, "lanes": 8}, KeyError),
        ({"rows": 0, "vectors": 3, "lanes": 8, "panels_per_task": 1}, ValueError),
    ],
)
def test_a_config_entry_this_module_did_not_write_is_refused(entry, error):
    with pytest.raises(error):
        GEMM_F32.config_from(entry)


def test_a_config_entry_written_before_a_knob_existed_takes_its_default():
    # Depthwise records from before rows per task were measured with one row per task: the default of the knob.
    assert DEPTHWISE_F32.config_from({"rows": 14, "us": 3.0}) == DepthwiseF32Config(14, task_rows=1)


def test_tuning_finds_each_familys_kernels_in_a_module_the_most_work_first():
    import tvm

    isa = Isa.named("cpu:avx2")
    kernels = [
        (GEMM_F32, (8, 16, 24)),
        (ATTENTION_F32, (1, 2, 8, 8, 16)),
        (GEMM_INT8, (8, 16, 24)),
        (GEMM_F32, (8, 16, 24)),
    ]
    mod = tvm.IRModule(
        {f"k{i}": family.build(workload, family.default(workload, isa)) for i, (family, workload) in enumerate(kernels)}
    )
    assert template_workloads(mod) == [
        (GEMM_F32, (8, 16, 24)),
        (GEMM_INT8, (8, 16, 24)),
        (ATTENTION_F32, (1, 2, 8, 8, 16)),
    ]


def _by_definition(intrinsic):
    """``intrinsic`` (a function naming a tensor intrinsic) with its instructions replaced by the loop it is the
    tensor intrinsic of, for a host without them to run the kernel's schedule (tiles, packing, the unsigned shift
    taken back)."""

    @functools.cache
    def named(*args) -> str:
        from tvm.s_tir import TensorIntrin

        name = intrinsic(*args)
        definition = TensorIntrin.get(name).desc
        # override: one intrinsic may be named by several spellings of its arguments (default or given)
        TensorIntrin.register(f"{name}_by_definition", definition, definition, override=True)
        return f"{name}_by_definition"

    return named


_vnni_by_its_definition = _by_definition(dot_u8s8_quads)
_amx_by_its_definition = _by_definition(amx_dot)
_bf16_dot_by_its_definition = _by_definition(dot_bf16_pairs)


# The host's own int8 instruction, and VNNI's at 16 lanes (AVX-512) and 8 (AVX-VNNI): natively where the host has
# VNNI, else by its definition. Full-range int8 operands: no saturation anywhere; the seven-bit family's
# vpmaddubsw (any AVX2 host) on full-range activations and weights within +-64, the extremes included.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 GEMM is for x86 CPUs with AVX2")
@pytest.mark.parametrize(
    "family, spec",
    [(GEMM_INT8, "cpu"), (GEMM_INT8, "x86_64:znver4"), (GEMM_INT8, "x86_64:alderlake"), (GEMM_INT8_7BIT, "cpu:avx2")],
)
@pytest.mark.parametrize(
    "scales", [GemmInt8Variant(), GemmInt8Variant(per_row_activation=True, per_channel_weight=False)]
)
def test_every_int8_gemm_config_is_exact(scales, family, spec, monkeypatch):
    import tvm

    isa = Isa.named(spec)
    if isa.vnni and not Isa.of(CPU).vnni:
        monkeypatch.setattr(gemm_int8, "dot_u8s8_quads", _vnni_by_its_definition)
    # tiles of 1-8 rows by 1-3 blocks of 8 or 16 channels; 38 input channels are 19 pairs, not whole quads
    lanes, depth = family.instruction(isa)
    workload = rows, in_features, out_features = 24, 38 if depth == 2 else 40, 48
    space = family.space(workload, isa)
    assert len(space) >= 6 and {(c.lanes, c.depth) for c in space} == {(lanes, depth)}
    mod = tvm.IRModule(
        {f"c{i}": family.build(workload, c, scales).with_attr("global_symbol", f"c{i}") for i, c in enumerate(space)}
    )
    library = compile_kernel(mod, CPU.tvm())
    largest = SEVEN_BIT_WEIGHT if family is GEMM_INT8_7BIT else 127
    xq = torch.randint(-128, 128, (rows, in_features), dtype=torch.int8)
    weight = torch.randint(-largest - 1 if largest == 127 else -largest, largest + 1, (out_features, in_features))
    xq[0], weight[0], weight[1] = 127, largest, -largest - (largest == 127)  # the largest sums of products
    weight = weight.to(torch.int8)
    assert seven_bit(weight) == (family is GEMM_INT8_7BIT)
    activations = rows if scales.per_row_activation else 1
    zero_point = torch.randint(-20, 20, (activations,), dtype=torch.int32)
    x_scale = torch.rand(activations) + 0.5
    w_scale = torch.rand(out_features if scales.per_channel_weight else 1) + 0.5
    bias = torch.randn(out_features)
    acc = (xq.long() - zero_point.long()[:, None]) @ weight.long().t()  # exact, in int64
    expected = acc.float() * (x_scale[:, None] * w_scale) + bias
    colsum = weight.to(torch.int32).sum(1, dtype=torch.int32)
    for i, config in enumerate(space):
        out = torch.full((rows, out_features), float("nan"))
        args = (xq, family.pack(weight, config), colsum, zero_point, x_scale, w_scale, bias, out)
        library[f"c{i}"](*map(to_tvm, args))
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-3, msg=str(config))


class _ReluShift(torch.nn.Module):
    """A linear layer and a float tail an int8 GEMM computes on its tile (captured for its epilogue)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.linear = torch.nn.Linear(in_features, out_features)

    def forward(self, x):
        return torch.relu(self.linear(x)) - 3.0


# Requantization on the tile is exact: with integer values and power-of-two scales every float step is exact, so
# the kernel's int8 must equal fxopt.quantize of the reference kernel's float (clamping at both ends included).
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 GEMM is for x86 CPUs with AVX2")
@settings(max_examples=8, deadline=None)
@given(
    st.integers(0, 2**16),
    st.sampled_from(["cpu", "x86_64:znver4"]),
    st.integers(1, 9),
    st.integers(1, 12).map(lambda n: 4 * n),
    st.integers(1, 4).map(lambda n: 16 * n),
    st.integers(-128, 127),
    st.integers(-128, 127),
    st.integers(-4, 12),
)
def test_the_int8_gemm_requantizes_its_tile_exactly(seed, spec, rows, in_features, out_features, zp, out_zp, shift):
    import tvm

    isa = Isa.named(spec)
    generator = torch.Generator().manual_seed(seed)
    module = _ReluShift(in_features, out_features)
    program = capture(module, (torch.randn(rows, in_features),))
    linear = next(n for n in program.graph.nodes if n.target is torch.ops.aten.linear.default)
    epilogue = find_epilogue(linear, lambda value: True)
    assert epilogue is not None and epilogue.ops == ("relu", "sub")
    workload = (rows, in_features, out_features)
    config = GEMM_INT8.default(workload, isa)
    variant = GemmInt8Variant(epilogue=epilogue, requantized=True)
    with pytest.MonkeyPatch.context() as patch:
        if isa.vnni and not Isa.of(CPU).vnni:
            patch.setattr(gemm_int8, "dot_u8s8_quads", _vnni_by_its_definition)
        library = compile_kernel(tvm.IRModule({"main": GEMM_INT8.build(workload, config, variant)}), CPU.tvm())
    xq = torch.randint(-128, 128, (rows, in_features), generator=generator, dtype=torch.int8)
    weight = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (out_features,), generator=generator).float()
    one, zero_point, out_scale = torch.ones(1), torch.tensor([zp], dtype=torch.int32), torch.tensor([2.0**shift])
    out_zero_point, out = torch.tensor([out_zp], dtype=torch.int32), torch.empty(rows, out_features, dtype=torch.int8)
    colsum = weight.to(torch.int32).sum(1, dtype=torch.int32)
    args = (xq, GEMM_INT8.pack(weight, config), colsum, zero_point, one, torch.ones(out_features), bias)
    library["main"](*map(to_tvm, (*args, out_scale, out_zero_point, out)))
    y = torch.relu(fxopt_ops.linear_q(xq, one, zero_point, weight, torch.ones(out_features), bias, torch.float32))
    expected = fxopt_ops.quantize(y - 3.0, out_scale, out_zero_point, "int8")
    assert torch.equal(out, expected)


@pytest.mark.parametrize(
    "mcpu, instruction, registers",
    [("znver3", "vpmaddwd", "ymm"), ("znver4", "vpdpbusd", "zmm"), ("sapphirerapids", "vpdpbusd", "zmm")]
    + [("alderlake", r"\{vex\}\s+vpdpbusd", "ymm")],  # AVX-VNNI: the VEX form, 8 lanes
)
def test_the_int8_kernels_build_with_each_cpus_dot_product(mcpu, instruction, registers):
    import tvm

    isa = Isa.named(f"x86_64:{mcpu}")
    conv = ConvShape(1, 64, 14, 14, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, dot_instruction(isa)[0]).workload
    # a GEMM of 24 rows: not whole AMX tiles, so Sapphire Rapids' too is a vector kernel
    for family, workload in [(GEMM_INT8, (24, 384, 1536)), (CONV2D_INT8, conv)]:
        kernel = tvm.IRModule({"main": family.build(workload, family.default(workload, isa))})
        asm = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).mod.inspect_source("asm")
        assert re.search(instruction + r"\s[^\n]*%" + registers, asm), family.name
        assert instruction == "vpmaddwd" or "vpmaddwd" not in asm  # VNNI needs no int16 pairs
        assert "tdpbusd" not in asm


# The seven-bit families on AVX2 CPUs: each quad product a vpmaddubsw and a vpmaddwd (by ones) on 8 lanes.
@pytest.mark.parametrize("mcpu", ["znver3", "haswell"])
def test_the_seven_bit_int8_kernels_build_with_vpmaddubsw(mcpu):
    import tvm

    isa = Isa.named(f"x86_64:{mcpu}")
    conv = ConvShape(1, 64, 14, 14, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8).workload
    for family, workload in [(GEMM_INT8_7BIT, (24, 384, 1536)), (CONV2D_INT8_7BIT, conv)]:
        kernel = tvm.IRModule({"main": family.build(workload, family.default(workload, isa))})
        asm = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).mod.inspect_source("asm")
        products = len(re.findall(r"\svpmaddubsw\s[^\n]*%ymm", asm))
        assert products and len(re.findall(r"\svpmaddwd\s[^\n]*%ymm", asm)) >= products, family.name


def test_seven_bit_weights_are_those_within_64():
    assert seven_bit(torch.tensor([[-64, 64], [0, 3]], dtype=torch.int8))
    assert not seven_bit(torch.tensor([[-65, 0]], dtype=torch.int8))
    assert not seven_bit(torch.tensor([[65, 0]], dtype=torch.int8))
    assert not seven_bit(torch.tensor([[-128, 0]], dtype=torch.int8))  # no int8 overflow in the test


# The int8 depthwise convolution: float FMAs on the centered values in each CPU's widest registers (MobileNetV2's
# 3x3 layer of 96 channels at stride 1, blocked by the ISA's lanes), no dot-product instruction, no gathers.
@pytest.mark.parametrize("mcpu, registers", [("znver3", "ymm"), ("znver4", "zmm"), ("sapphirerapids", "zmm")])
def test_the_int8_depthwise_convolution_builds_with_each_cpus_vectors(mcpu, registers):
    import tvm

    isa = Isa.named(f"x86_64:{mcpu}")
    lanes = isa.lanes()
    shape = ConvShape(1, 96, 28, 28, 96, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, lanes, lanes, 96)
    kernel = DEPTHWISE_INT8.build(shape.workload, DEPTHWISE_INT8.default(shape.workload, isa))
    asm = compile_kernel(tvm.IRModule({"main": kernel}), tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    source = asm.mod.inspect_source("asm")
    assert len(re.findall(r"vfmadd\d+ps\s[^\n]*%" + registers, source)) >= 9  # a 3x3 window's taps at least
    assert not re.search(r"vpdpbusd|vpmaddwd|gather", source)


# AMX: whole tiles of rows and inputs take tile registers on Sapphire Rapids; elsewhere there are none.
@pytest.mark.parametrize("mcpu", ["sapphirerapids", "emeraldrapids", "znver4"])
@pytest.mark.parametrize(
    "family, instruction, vector_instruction",
    [(GEMM_INT8, "tdpbusd", "vpdpbusd"), (GEMM_BF16, "tdpbf16ps", "vdpbf16ps")],
)
def test_the_gemms_build_with_amx_tiles_where_the_cpu_has_them(family, instruction, vector_instruction, mcpu):
    import tvm

    isa = Isa.named(f"x86_64:{mcpu}")
    workload = (128, 768, 3072)
    config = family.default(workload, isa)
    amx = isa.amx_int8 if family is GEMM_INT8 else isa.amx_bf16
    assert config.amx == amx and (str(config) == "32x2 AMX tile") == amx
    variant = GemmInt8Variant(requantized=True) if family is GEMM_INT8 else None
    kernel = tvm.IRModule({"main": family.build(workload, config, variant)})
    asm = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).mod.inspect_source("asm")
    if not amx:
        assert instruction not in asm and vector_instruction in asm
        return
    # One configuration, four accumulators loaded, a loop of two row tiles and two column tiles loaded and four
    # products, the accumulators stored, the tiles released; the tail in AVX-512 vectors.
    counts = {op: len(re.findall(rf"^\s+{op}\s", asm, re.MULTILINE)) for op in ("ldtilecfg", "tilerelease")}
    assert counts == {"ldtilecfg": 1, "tilerelease": 1}
    products = re.findall(rf"^\s+{instruction}\s+%tmm(\d), %tmm(\d), %tmm(\d)", asm, re.MULTILINE)
    assert products and len(products) % 4 == 0
    # tdpbusd dst, a, b in Intel's order; AT&T's reverses it: accumulators 0-3, a's tiles 4-5, b's 6-7
    assert {(dst, a, b) for b, a, dst in products} == {
        ("0", "4", "6"),
        ("1", "4", "7"),
        ("2", "5", "6"),
        ("3", "5", "7"),
    }
    assert len(re.findall(r"^\s+tilestored\s", asm, re.MULTILINE)) == 4
    assert vector_instruction not in asm and re.search(r"v(add|fmadd\d+)ps\s[^\n]*%zmm", asm)


def test_the_amx_tile_configuration_makes_tiles_of_16_rows_of_64_bytes():
    config = b"".join(word.to_bytes(8, "little") for word in amx_tile_config(6))
    assert len(config) == 64 and config[0] == 1 and config[1:16] == bytes(15)  # palette 1, from row 0
    assert [int.from_bytes(config[16 + 2 * t : 18 + 2 * t], "little") for t in range(16)] == [64] * 6 + [0] * 10
    assert list(config[48:64]) == [16] * 6 + [0] * 10
    with pytest.raises(ValueError, match="8 tiles"):
        amx_tile_config(9)
    with pytest.raises(ValueError, match="does not fit"):
        amx_dot("u8s8", 2, 3, 16)  # 6 accumulators + 2 + 3 tiles


# Each AMX task, its tile products natively where the host has AMX, else by their definition (the schedule: tasks,
# accumulators loaded and stored, the tail on them); full-range int8, with and without requantization.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 GEMM is for x86 CPUs with AVX2")
@pytest.mark.parametrize("requantized", [False, True])
def test_every_amx_int8_gemm_task_is_exact(requantized, monkeypatch):
    import tvm

    isa = Isa.named("x86_64:sapphirerapids")
    if not Isa.of(CPU).amx_int8:
        monkeypatch.setattr(gemm_int8, "amx_dot", _amx_by_its_definition)
    workload = rows, in_features, out_features = 96, 128, 96
    space = [c for c in GEMM_INT8.space(workload, isa) if c.amx]
    assert [(c.rows // 16, c.blocks) for c in space] == list(AMX_TASKS)
    assert GEMM_INT8.default(workload, isa) == space[0] == GemmInt8Config(32, 2, 16, 4, amx=True)
    variant = GemmInt8Variant(requantized=requantized)
    mod = tvm.IRModule(
        {
            f"c{i}": GEMM_INT8.build(workload, c, variant).with_attr("global_symbol", f"c{i}")
            for i, c in enumerate(space)
        }
    )
    library = compile_kernel(mod, CPU.tvm())
    xq = torch.randint(-128, 128, (rows, in_features), dtype=torch.int8)
    weight = torch.randint(-128, 128, (out_features, in_features), dtype=torch.int8)
    zero_point, x_scale = torch.tensor([-7], dtype=torch.int32), torch.tensor([0.5])
    w_scale, bias = torch.rand(out_features) + 0.5, torch.randn(out_features)
    expected = ((xq.long() + 7) @ weight.long().t()).float() * (0.5 * w_scale) + bias
    out_scale, out_zero_point = torch.tensor([512.0]), torch.tensor([3], dtype=torch.int32)
    if requantized:
        expected = fxopt_ops.quantize(expected, out_scale, out_zero_point, "int8")
    colsum = weight.to(torch.int32).sum(1, dtype=torch.int32)
    for i, config in enumerate(space):
        out = torch.zeros(rows, out_features, dtype=torch.int8 if requantized else torch.float32)
        requantize = (out_scale, out_zero_point) if requantized else ()
        args = (xq, GEMM_INT8.pack(weight, config), colsum, zero_point, x_scale, w_scale, bias, *requantize, out)
        library[f"c{i}"](*map(to_tvm, args))
        if requantized:  # one step where the float before rounding differs in its last bit
            assert (out.int() - expected.int()).abs().max() <= 1, str(config)
        else:
            torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-3, msg=str(config))


# The host's own int8 instruction, and VNNI's at 16 lanes (AVX-512) and 8 (AVX-VNNI), and the seven-bit family's
# vpmaddubsw on weights within +-64, as the GEMM's test runs them.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 convolution is for x86 CPUs with AVX2")
@settings(max_examples=8, deadline=None)
@given(
    st.sampled_from(
        [(CONV2D_INT8, "cpu"), (CONV2D_INT8, "x86_64:znver4"), (CONV2D_INT8, "x86_64:alderlake")]
        + [(CONV2D_INT8_7BIT, "cpu:avx2")]
    ),
    st.integers(1, 2),
    st.integers(1, 3),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([1, 3]),
    st.integers(1, 2),
    st.integers(0, 2),
    st.integers(1, 2),
    st.integers(-128, 127),
    st.integers(0, 2**16),
    st.sampled_from([0, 1, 2, 3]),
)
def test_every_int8_convolution_config_is_exact(
    family_spec, batch, blocks, height, width, k, stride, pad, dilation, zp, seed, tiny
):
    import tvm

    family, spec = family_spec
    isa = Isa.named(spec)
    lanes, depth = family.instruction(isa)
    x_block = 4 if depth == 4 else 2
    channels = blocks * x_block
    if tiny:  # an RGB image's few channels in blocks of 1 (NCHW itself), re-blocked by the kernel
        channels, x_block = tiny, 1
    shape = ConvShape(
        batch, channels, height, width, 2 * lanes, k, k, stride, stride, pad, pad, pad, pad,
        dilation, dilation, x_block, lanes,
    )  # fmt: skip
    if shape.out_height < 1 or shape.out_width < 1:
        shape = shape._replace(pad_top=k * dilation, pad_left=k * dilation)
    assert family.applies(shape.workload, isa)
    space = family.space(shape.workload, isa)
    with pytest.MonkeyPatch.context() as patch:
        if isa.vnni and not Isa.of(CPU).vnni:
            patch.setattr(gemm_int8, "dot_u8s8_quads", _vnni_by_its_definition)
        kernels = [family.build(shape.workload, config) for config in space]
        mod = tvm.IRModule({f"c{i}": kernel.with_attr("global_symbol", f"c{i}") for i, kernel in enumerate(kernels)})
        library = compile_kernel(mod, CPU.tvm())
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (batch, shape.channels, height, width), generator=generator, dtype=torch.int8)
    low, high = (-SEVEN_BIT_WEIGHT, SEVEN_BIT_WEIGHT + 1) if family is CONV2D_INT8_7BIT else (-128, 128)
    weight_shape = (shape.out_channels, shape.channels, k, k)
    weight = torch.randint(low, high, weight_shape, generator=generator, dtype=torch.int8)
    xq[0, :, 0, 0], weight[0], weight[1] = 127, high - 1, low  # the largest sums of products, at the first pixel
    zero_point = torch.tensor([zp], dtype=torch.int32)
    bias = torch.randint(-1000, 1000, (shape.out_channels,), generator=generator).float()
    # The reference: padding pads the real 0 (the zero point), the sums exact in int64; unit scales.
    centered = F.pad(xq.long() - zp, (shape.pad_left, shape.pad_right, shape.pad_top, shape.pad_bottom))
    acc = F.conv2d(centered.double(), weight.double(), None, stride, 0, dilation).long()
    expected = _blocked(acc.double() + bias.double()[:, None, None], lanes).reshape(CONV2D_INT8.result_shape(shape))
    colsum = weight.to(torch.int32).sum((1, 2, 3), dtype=torch.int32)
    ones = torch.ones(1), torch.ones(shape.out_channels)
    for i, config in enumerate(space):
        out = torch.full(CONV2D_INT8.result_shape(shape), float("nan"))
        args = (_blocked(xq, x_block), family.pack(weight, shape, depth), colsum, zero_point, ones[0], *ones[1:])
        library[f"c{i}"](*map(to_tvm, (*args, bias, out)))
        assert torch.equal(out.double(), expected), str(config)


# F(2x2, 3x3) on AVX2's vpmaddwd: every tile exact on full-range int8 (the direct convolution's integers), the
# padding the zero point, partial tiles at the bottom and right, the tail (requantization too) on the output rows.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 Winograd convolution is for x86 CPUs with AVX2")
@settings(max_examples=8, deadline=None)
@given(
    st.integers(1, 2),
    st.integers(1, 3),
    st.sampled_from([2, 8]),
    st.integers(1, 9),
    st.integers(1, 9),
    st.integers(0, 1),
    st.integers(1, 2),
    st.integers(-128, 127),
    st.integers(0, 2**16),
)
def test_every_int8_winograd_config_is_exact(batch, blocks, x_block, height, width, pad, out_blocks, zp, seed):
    import tvm

    isa = Isa.named("cpu:avx2")
    shape = ConvShape(
        batch, blocks * x_block, height + 2 - 2 * pad, width + 2 - 2 * pad, 8 * out_blocks, 3, 3, 1, 1,
        pad, pad, pad, pad, 1, 1, x_block, 8,
    )  # fmt: skip
    assert WINOGRAD_INT8.applies(shape.workload, isa)
    space = WINOGRAD_INT8.space(shape.workload, isa)
    variant = Conv2dInt8Variant(requantized=True, float_too=True)
    kernels = [WINOGRAD_INT8.build(shape.workload, config, variant) for config in space]
    mod = tvm.IRModule({f"c{i}": kernel.with_attr("global_symbol", f"c{i}") for i, kernel in enumerate(kernels)})
    library = compile_kernel(mod, CPU.tvm())
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (batch, shape.channels, shape.height, shape.width), generator=generator)
    weight = torch.randint(-128, 128, (shape.out_channels, shape.channels, 3, 3), generator=generator)
    xq, weight = xq.to(torch.int8), weight.to(torch.int8)
    zero_point = torch.tensor([zp], dtype=torch.int32)
    bias = torch.randint(-1000, 1000, (shape.out_channels,), generator=generator).float()
    # The reference: padding pads the real 0 (the zero point), the sums exact in int64; unit scales.
    centered = F.pad(xq.long() - zp, (pad, pad, pad, pad))
    acc = F.conv2d(centered.double(), weight.double()).long()
    expected = _blocked(acc.double() + bias.double()[:, None, None], 8)
    out_scale, out_zero_point = torch.tensor([512.0]), torch.tensor([-3], dtype=torch.int32)
    expected_int8 = fxopt_ops.quantize(expected.float(), out_scale, out_zero_point, "int8")
    colsum = weight.to(torch.int32).sum((1, 2, 3), dtype=torch.int32)
    packed = WINOGRAD_INT8.pack(weight, shape)
    for i, config in enumerate(space):
        out = torch.full(WINOGRAD_INT8.result_shape(shape), float("nan"))
        out_int8 = torch.zeros(out.shape, dtype=torch.int8)
        args = (_blocked(xq, x_block), packed, colsum, zero_point, torch.ones(1), torch.ones(shape.out_channels))
        library[f"c{i}"](*map(to_tvm, (*args, bias, out_scale, out_zero_point, out, out_int8)))
        assert torch.equal(out.double(), expected), str(config)
        assert torch.equal(out_int8, expected_int8), str(config)


def test_the_int8_winograd_convolution_is_exact_up_to_its_bound():
    # Any int8 weights up to MAX_CHANNELS input channels; past it, where the layer's own weights keep every sum in
    # int32 (ResNet-50's 512 channels of full-range weights); not for thousands of channels.
    assert MAX_CHANNELS * 4 * 128 * 128 * 64 < 2**31 <= (MAX_CHANNELS + 1) * 4 * 128 * 128 * 64
    extremes = torch.tensor([-128, 127], dtype=torch.int8)
    generator = torch.Generator().manual_seed(0)
    for channels in (MAX_CHANNELS, 512):
        signs = torch.randint(0, 2, (8, channels, 3, 3), generator=generator)
        assert WINOGRAD_INT8.exact(extremes[signs])
    assert not WINOGRAD_INT8.exact(extremes[torch.randint(0, 2, (8, 8192, 3, 3), generator=generator)])


@pytest.mark.parametrize("mcpu", ["znver3", "haswell"])
def test_the_int8_winograd_convolution_builds_its_gemms_on_vpmaddwd(mcpu):
    import tvm

    shape = ConvShape(1, 64, 14, 14, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8)
    config = WINOGRAD_INT8.default(shape.workload, Isa.named(f"x86_64:{mcpu}"))
    kernel = WINOGRAD_INT8.build(shape.workload, config)
    asm = compile_kernel(tvm.IRModule({"main": kernel}), tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    # a product per tile row and block: 5 x 2 on 49 tiles
    assert len(re.findall(r"vpmaddwd\s[^\n]*%ymm", asm.mod.inspect_source("asm"))) >= config.rows * config.vectors
    assert not WINOGRAD_INT8.applies(shape.workload, Isa.named("x86_64:znver4"))  # VNNI: the direct vpdpbusd


class _BlockedResidual(torch.nn.Module):
    """A blocked int8 convolution, a residual add and a ReLU: a residual block's last layer (captured for the
    epilogue the int8 convolution computes on its tile)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, pad: int, lanes: int):
        super().__init__()
        self.register_buffer("weight", weight)
        self.register_buffer("bias", bias)
        self.pad, self.lanes = pad, lanes

    def forward(self, xq, residual):
        one, zero_point = torch.ones(1), torch.zeros(1, dtype=torch.int32)
        y = fxopt_ops.conv_q_blocked(
            xq, one, zero_point, self.weight, torch.ones(self.weight.shape[0]), self.bias,
            [1, 1], [self.pad] * 4, [1, 1], 1, torch.float32, self.lanes,
        )  # fmt: skip
        return torch.relu(y + residual)


# Requantization on the convolution's tile is exact (integer values, power-of-two scales: every float step exact):
# its int8 equals fxopt.quantize of the reference's float, its float (written too: a residual block's output) the
# reference's, after a residual add and a ReLU on the tile.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 convolution is for x86 CPUs with AVX2")
@settings(max_examples=6, deadline=None)
@given(
    st.integers(0, 2**16),
    st.sampled_from(["cpu", "x86_64:znver4"]),
    st.integers(1, 7),
    st.sampled_from([1, 3]),
    st.integers(-128, 127),
    st.integers(-128, 127),
    st.integers(-4, 12),
    st.booleans(),
)
def test_the_int8_convolution_requantizes_its_tile_exactly(seed, spec, size, k, zp, out_zp, shift, float_too):
    import tvm

    isa = Isa.named(spec)
    lanes, depth = dot_instruction(isa)
    pad = k // 2
    shape = ConvShape(1, 2 * depth, size, size + 1, 2 * lanes, k, k, 1, 1, pad, pad, pad, pad, 1, 1, depth, lanes)
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (1, shape.channels, size, size + 1), generator=generator, dtype=torch.int8)
    weight = torch.randint(-127, 128, (shape.out_channels, shape.channels, k, k), generator=generator)
    weight = weight.to(torch.int8)
    bias = torch.randint(-1000, 1000, (shape.out_channels,), generator=generator).float()
    module = _BlockedResidual(weight, bias, pad, lanes)
    blocked = _blocked(xq, depth)
    zero_point = torch.tensor([zp], dtype=torch.int32)
    reference = fxopt_ops.conv_q_blocked(
        blocked, torch.ones(1), zero_point, weight, torch.ones(shape.out_channels), bias,
        [1, 1], [pad] * 4, [1, 1], 1, torch.float32, lanes,
    )  # fmt: skip
    residual = torch.randint(-2000, 2000, reference.shape, generator=generator).float()
    program = capture(module, (blocked, residual))
    conv = next(n for n in program.graph.nodes if n.target is fxopt_ops.conv_q_blocked.default)
    epilogue = find_epilogue(conv, lambda value: True)
    assert epilogue is not None and epilogue.ops == ("add", "relu")
    variant = Conv2dInt8Variant(epilogue, requantized=True, float_too=float_too)
    config = CONV2D_INT8.default(shape.workload, isa)
    with pytest.MonkeyPatch.context() as patch:
        if isa.vnni and not Isa.of(CPU).vnni:
            patch.setattr(gemm_int8, "dot_u8s8_quads", _vnni_by_its_definition)
        kernel = CONV2D_INT8.build(shape.workload, config, variant)
        library = compile_kernel(tvm.IRModule({"main": kernel}), CPU.tvm())
    flat = CONV2D_INT8.result_shape(shape)
    y = torch.relu(reference + residual)
    out_scale, out_zero_point = torch.tensor([2.0**shift]), torch.tensor([out_zp], dtype=torch.int32)
    float_out, int8_out = torch.full(flat, float("nan")), torch.empty(flat, dtype=torch.int8)
    colsum = weight.to(torch.int32).sum((1, 2, 3), dtype=torch.int32)
    args = (blocked, CONV2D_INT8.pack(weight, shape, depth), colsum, zero_point, torch.ones(1))
    args += (torch.ones(shape.out_channels), bias, residual.reshape(flat), out_scale, out_zero_point)
    library["main"](*map(to_tvm, (*args, *([float_out] if float_too else []), int8_out)))
    expected = fxopt_ops.quantize(y, out_scale, out_zero_point, "int8")
    assert torch.equal(int8_out.reshape(y.shape), expected)
    assert not float_too or torch.equal(float_out.reshape(y.shape), y)


# Every config of the int8 depthwise kernel exact: full-range int8 and zero points, the border padded with the
# zero point; requantized on the tile (power-of-two output scales: every float step exact) to fxopt.quantize's
# integers, the float written beside them the reference's.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the int8 depthwise convolution is for x86 CPUs with AVX2")
@settings(max_examples=6, deadline=None)
@given(
    st.sampled_from([4, 8, 16]),
    st.integers(1, 2),
    st.integers(1, 9),
    st.integers(1, 9),
    st.sampled_from([3, 5]),
    st.integers(1, 2),
    st.integers(0, 2),
    st.integers(1, 2),
    st.integers(-128, 127),
    st.integers(-128, 127),
    st.integers(-4, 12),
    st.integers(0, 2**16),
)
def test_every_int8_depthwise_config_is_exact(
    block, blocks, height, width, k, stride, pad, dilation, zp, out_zp, shift, seed
):
    import tvm

    channels = block * blocks
    shape = ConvShape(
        1, channels, height, width, channels, k, k, stride, stride, pad, pad, pad, pad, dilation, dilation,
        block, block, channels,
    )  # fmt: skip
    if shape.out_height < 1 or shape.out_width < 1:
        shape = shape._replace(pad_top=k * dilation, pad_left=k * dilation)
    isa = Isa.of(CPU)
    assert DEPTHWISE_INT8.applies(shape.workload, isa)
    space = DEPTHWISE_INT8.space(shape.workload, isa)
    requantized = Conv2dInt8Variant(requantized=True, float_too=True)
    variants = [None] * len(space) + [requantized]
    configs = [*space, DEPTHWISE_INT8.default(shape.workload, isa)]
    kernels = [DEPTHWISE_INT8.build(shape.workload, c, v) for c, v in zip(configs, variants)]
    mod = tvm.IRModule({f"c{i}": kernel.with_attr("global_symbol", f"c{i}") for i, kernel in enumerate(kernels)})
    library = compile_kernel(mod, CPU.tvm())
    generator = torch.Generator().manual_seed(seed)
    xq = torch.randint(-128, 128, (1, channels, height, width), generator=generator, dtype=torch.int8)
    weight = torch.randint(-128, 128, (channels, 1, k, k), generator=generator, dtype=torch.int8)
    bias = torch.randint(-1000, 1000, (channels,), generator=generator).float()
    centered = F.pad(xq.long() - zp, (shape.pad_left, shape.pad_right, shape.pad_top, shape.pad_bottom))
    acc = F.conv2d(centered.double(), weight.double(), None, stride, 0, dilation, channels).long()
    expected = _blocked(acc.double() + bias.double()[:, None, None], block)
    zero_point, one, ones = torch.tensor([zp], dtype=torch.int32), torch.ones(1), torch.ones(channels)
    args = (_blocked(xq, block), DEPTHWISE_INT8.pack(weight, shape), zero_point, one, ones, bias)
    for i, config in enumerate(space):
        out = torch.full(DEPTHWISE_INT8.result_shape(shape), float("nan"))
        library[f"c{i}"](*map(to_tvm, (*args, out)))
        assert torch.equal(out.double(), expected), str(config)
    out_scale, out_zero_point = torch.tensor([2.0**shift]), torch.tensor([out_zp], dtype=torch.int32)
    float_out = torch.full(DEPTHWISE_INT8.result_shape(shape), float("nan"))
    int8_out = torch.empty(DEPTHWISE_INT8.result_shape(shape), dtype=torch.int8)
    library[f"c{len(space)}"](*map(to_tvm, (*args, out_scale, out_zero_point, float_out, int8_out)))
    assert torch.equal(float_out.double(), expected)
    assert torch.equal(int8_out, fxopt_ops.quantize(expected.float(), out_scale, out_zero_point, "int8"))


# Every config of the weight-only GEMM at the host's lanes and AVX-512's 16 (LLVM splits them where the host has
# none): the linear layer of the reference's float weights, (q - zero point) x scale per group, within float32
# rounding (the kernel scales each group's sums; full-range zero points, so their correction is large).
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the x86 builds run on x86 CPUs with AVX2")
@pytest.mark.parametrize("spec", ["cpu", "cpu:avx512"])
@pytest.mark.parametrize("bits, group_size", [(8, 48), (4, 16)])
def test_every_weight_only_gemm_config_computes_the_reference_linear(spec, bits, group_size):
    import tvm

    isa = Isa.named(spec)
    workload = rows, in_features, out_features, _, _ = (9, 96, 40, group_size, bits)
    space = GEMM_WQ.space(workload, isa)
    mod = tvm.IRModule(
        {f"c{i}": GEMM_WQ.build(workload, c).with_attr("global_symbol", f"c{i}") for i, c in enumerate(space)}
    )
    library = compile_kernel(mod, CPU.tvm())
    generator = torch.Generator().manual_seed(bits)
    low, high = (0, 16) if bits == 4 else (-128, 128)
    q = torch.randint(low, high, (out_features, in_features), generator=generator)
    groups = in_features // group_size
    scale = torch.rand(out_features, groups, generator=generator) / 50 + 0.01
    zero_point = torch.randint(low, high, (out_features, groups), generator=generator).float()
    x, bias = torch.randn(rows, in_features, generator=generator), torch.randn(out_features, generator=generator)
    weight = dequantize_groups(q.to(torch.uint8 if bits == 4 else torch.int8), scale, zero_point)
    expected = F.linear(x, weight, bias)
    for i, config in enumerate(space):
        out = torch.full((rows, out_features), float("nan"))
        library[f"c{i}"](*map(to_tvm, (x, *GEMM_WQ.pack(q, scale, zero_point, config, bits), bias, out)))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=str(config))


@pytest.mark.parametrize("mcpu, registers", [("znver3", "ymm"), ("znver4", "zmm"), ("sapphirerapids", "zmm")])
@pytest.mark.parametrize("bits", [8, 4])
def test_the_weight_only_gemm_builds_with_each_cpus_vectors(mcpu, registers, bits):
    # Its float multiply-adds on the ISA's widest registers, its weights widened from bytes (never gathered).
    import tvm

    isa, workload = Isa.named(f"x86_64:{mcpu}"), (128, 768, 3072, 128, bits)
    kernel = tvm.IRModule({"main": GEMM_WQ.build(workload, GEMM_WQ.default(workload, isa))})
    asm = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).mod.inspect_source("asm")
    assert re.search(r"vfmadd\d+ps\s[^\n]*%" + registers, asm)
    assert "gather" not in asm


def _bf16_ties(shape, generator) -> torch.Tensor:
    """Random floats, half of them exactly halfway between two bfloat16 values (their low 16 bits 0x8000)."""
    x = torch.randn(shape, generator=generator) * 4
    bits = x.view(torch.int32)
    tie = torch.rand(shape, generator=generator) < 0.5
    return torch.where(tie, (bits & ~0xFFFF) | 0x8000, bits).view(torch.float32)


# Natively where the host has AVX-512 BF16 (AMX-BF16), else by the instruction's definition (16 lanes: LLVM
# splits them): every vector tile on Zen 4, every AMX task on Sapphire Rapids.
@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the bfloat16 GEMM is for x86 CPUs")
@pytest.mark.parametrize(
    "mcpu, workload",
    [("znver4", (24, 38, 48)), ("sapphirerapids", (96, 64, 96))],  # 19 pairs of inputs; whole AMX tiles
)
def test_every_bf16_gemm_config_sums_the_references_products_in_float32(mcpu, workload, monkeypatch):
    import tvm

    if not Isa.of(CPU).avx512_bf16:
        monkeypatch.setattr(gemm_bf16, "dot_bf16_pairs", _bf16_dot_by_its_definition)
    if not Isa.of(CPU).amx_bf16:
        monkeypatch.setattr(gemm_bf16, "amx_dot", _amx_by_its_definition)
    isa = Isa.named(f"x86_64:{mcpu}")
    rows, in_features, out_features = workload
    space = [c for c in GEMM_BF16.space(workload, isa) if c.amx == isa.amx_bf16]
    assert len(space) >= 6 if not isa.amx_bf16 else [(c.rows // 16, c.blocks) for c in space] == list(AMX_TASKS)
    assert GEMM_BF16.default(workload, isa) == space[0] or not isa.amx_bf16
    epilogue = ScaledRelu(out_features)
    kernels = [GEMM_BF16.build(workload, config, epilogue) for config in space]
    mod = tvm.IRModule({f"c{i}": kernel.with_attr("global_symbol", f"c{i}") for i, kernel in enumerate(kernels)})
    library = compile_kernel(mod, CPU.tvm())
    generator = torch.Generator().manual_seed(0)
    x = _bf16_ties((rows, in_features), generator)
    weight = torch.randn(out_features, in_features, generator=generator).bfloat16()
    bias, scale = torch.randn(out_features, generator=generator), torch.rand(out_features, generator=generator)
    expected = torch.relu(fxopt_ops.linear_bf16(x, weight, bias)) * scale
    for i, config in enumerate(space):
        out = torch.full((rows, out_features), float("nan"))
        library[f"c{i}"](*map(to_tvm, (x, GEMM_BF16.pack(weight, config), bias, scale, out)))
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5, msg=str(config))


def test_activations_round_to_bfloat16_as_pytorch_rounds_them():
    import tvm
    from tvm import te

    values = torch.tensor(
        [1.0, -0.0, float("inf"), -float("inf"), float("nan"), 3.4e38, 1e-40, -1e-45, 2.0**-126]
        + [float.fromhex("0x1.01p0"), float.fromhex("0x1.03p0"), float.fromhex("-0x1.0101p0")]  # ties, to even
    )
    x = torch.cat([values, _bf16_ties((1000,), torch.Generator().manual_seed(1))])
    placeholder = te.placeholder(x.shape, "float32", name="x")
    rounded = te.compute(x.shape, lambda i: bf16_bits(placeholder[i]), name="rounded")
    library = compile_kernel(tvm.IRModule({"main": te.create_prim_func([placeholder, rounded])}), CPU.tvm())
    out = torch.empty(x.shape, dtype=torch.uint16)
    library["main"](to_tvm(x), to_tvm(out))
    expected = x.bfloat16()
    got = out.view(torch.bfloat16)
    assert torch.equal(got.isnan(), expected.isnan())
    finite = ~expected.isnan()
    assert torch.equal(got[finite].view(torch.int16), expected[finite].view(torch.int16))


@pytest.mark.parametrize("mcpu", ["znver4", "sapphirerapids"])
def test_the_bf16_gemm_builds_with_the_bf16_dot_product_on_16_lanes(mcpu):
    import tvm

    isa, workload = Isa.named(f"x86_64:{mcpu}"), (24, 768, 3072)  # 24 rows: not whole AMX tiles
    kernel = tvm.IRModule({"main": GEMM_BF16.build(workload, GEMM_BF16.default(workload, isa))})
    asm = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu})).mod.inspect_source("asm")
    dots = [line for line in asm.splitlines() if re.match(r"\s+vdpbf16ps\s", line)]
    assert len(dots) >= 24 and all("zmm" in line for line in dots)  # the 8x3 tile's, unrolled


def _blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    return torch.ops.fxopt.to_blocked(x, block)


@st.composite
def conv_workloads(draw):
    """A convolution of the blocked layout at 8 or 16 lanes (a 16-lane schedule runs here too: LLVM splits its
    vectors), plain, grouped (blocks dividing a group's channels) or depthwise, blocks of the lanes or smaller,
    kernels 1/3/5/7, strides, one-sided padding, dilation, tiny images; and an index into its family's space."""
    lanes = draw(st.sampled_from([8, 16]))
    depthwise = draw(st.booleans())
    groups = 1 if depthwise else draw(st.sampled_from([1, 1, 2, 3]))
    in_block = draw(st.sampled_from([lanes, lanes // 2, 4, 3] if not depthwise else [lanes, 4]))
    out_block = in_block if depthwise else draw(st.sampled_from([lanes, lanes // 2]))
    channels = in_block * groups * draw(st.integers(1, 3))
    out_channels = channels if depthwise else out_block * groups * draw(st.integers(1, 4))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    shape = ConvShape(
        draw(st.integers(1, 2)), channels, draw(st.integers(1, 11)), draw(st.integers(1, 11)), out_channels,
        k, draw(st.sampled_from([k, 1])), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])),
        *(draw(st.integers(0, 3)) for _ in range(4)), draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2])),
        in_block, out_block, channels if depthwise else groups,
    )  # fmt: skip
    if shape.out_height < 1 or shape.out_width < 1:
        shape = shape._replace(pad_top=k * shape.dilation_h, pad_left=k * shape.dilation_w)
    return shape, depthwise, Isa.named("cpu:avx512" if lanes == 16 else "cpu:avx2"), draw(st.integers(0, 99))


@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the convolution kernels run on x86 CPUs with AVX2")
@settings(max_examples=40, deadline=None)
@given(conv_workloads(), st.integers(0, 2**16), st.booleans(), st.booleans())
def test_every_convolution_config_at_every_isas_lanes_matches_pytorch(case, seed, with_epilogue, winograd):
    import tvm

    shape, depthwise, isa, choice = case
    if winograd and not depthwise:  # the same convolution at 3x3, stride and dilation 1
        shape = shape._replace(kernel_h=3, kernel_w=3, stride_h=1, stride_w=1, dilation_h=1, dilation_w=1)
        shape = shape._replace(
            pad_top=max(shape.pad_top, 3 - shape.height - shape.pad_bottom),
            pad_left=max(shape.pad_left, 3 - shape.width - shape.pad_right),
        )
    family = DEPTHWISE_F32 if depthwise else WINOGRAD_F32 if winograd else CONV2D_F32
    assert family.applies(shape.workload, isa)
    space = family.space(shape.workload, isa)
    config = space[choice % len(space)]
    if depthwise:  # any rows per task dividing the output's (the space's are few at these sizes)
        divisors = [rows for rows in range(1, shape.out_height + 1) if shape.out_height % rows == 0]
        config = dataclasses.replace(config, task_rows=divisors[choice % len(divisors)])
    epilogue = ScaledRelu(shape.out_block) if with_epilogue else None
    library = compile_kernel(tvm.IRModule({"main": family.build(shape.workload, config, epilogue)}), CPU.tvm())
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape.batch, shape.channels, shape.height, shape.width, generator=generator)
    groups = shape.groups
    weight = torch.randn(
        shape.out_channels, shape.channels // groups, shape.kernel_h, shape.kernel_w, generator=generator
    )
    bias, scale = (
        torch.randn(shape.out_channels, generator=generator),
        torch.randn(shape.out_block, generator=generator),
    )
    out = torch.full(family.result_shape(shape), float("nan"))
    args = [_blocked(x, shape.in_block), family.pack(weight, shape), bias, *([scale] if epilogue else []), out]
    library["main"](*map(to_tvm, args))
    padded = F.pad(x, (shape.pad_left, shape.pad_right, shape.pad_top, shape.pad_bottom))
    strides, dilations = (shape.stride_h, shape.stride_w), (shape.dilation_h, shape.dilation_w)
    expected = _blocked(F.conv2d(padded, weight, bias, strides, 0, dilations, groups), shape.out_block)
    expected = torch.relu(expected) * scale if epilogue else expected
    # Winograd's transforms add roundings (coefficients up to 8): within fxopt's tolerance, 1e-4 of the largest.
    atol = 1e-4 * expected.abs().max().item() if winograd else 1e-4
    torch.testing.assert_close(out.reshape(expected.shape), expected, rtol=1e-4, atol=atol)


@pytest.mark.parametrize("family", [CONV2D_F32, DEPTHWISE_F32, WINOGRAD_F32])
@pytest.mark.parametrize("spec, mcpu, registers", [("cpu:avx2", "znver3", "%ymm"), ("cpu:avx512", "znver4", "%zmm")])
def test_convolutions_build_for_each_isa_in_its_registers_with_fused_multiply_adds(family, spec, mcpu, registers):
    import tvm

    isa = Isa.named(spec)
    groups = 32 if family is DEPTHWISE_F32 else 1
    workload = ConvShape(1, 32, 14, 14, 32, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, isa.lanes(), isa.lanes(), groups).workload
    kernel = family.build(workload, family.default(workload, isa))
    asm = compile_kernel(tvm.IRModule({"main": kernel}), tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
    source = asm.mod.inspect_source("asm")
    assert registers in source and re.search(r"vfmadd\d+ps\s+[^\n]*" + re.escape(registers), source)


@pytest.mark.parametrize("spec, mcpu", [("cpu:avx2", "znver3"), ("cpu:avx512", "znver4"), ("aarch64", "cortex-a76")])
@pytest.mark.parametrize("family", [GEMM_F32, CONV2D_F32])
def test_register_tiles_are_stack_slots_not_runtime_workspaces(family, spec, mcpu):
    """TVM would allocate each tile's accumulators with a runtime call per tile (AVX-512's 1.5 KiB tile too)."""
    import tvm

    isa = Isa.named(spec)
    lanes = isa.lanes()
    # unpadded, so the kernels allocate nothing but their tiles
    workload = (48, 64, 96) if family is GEMM_F32 else (1, 16, 14, 14, 96, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1, lanes, lanes)
    kernel = tvm.IRModule({"main": family.build(workload, family.default(workload, isa))})
    triple = {"mtriple": "aarch64-linux-gnu"} if spec == "aarch64" else {}
    library = compile_kernel(kernel, tvm.target.Target({"kind": "llvm", "mcpu": mcpu, **triple}))
    assert "TVMBackendAllocWorkspace" not in library.mod.inspect_source("ll")


# 100000 rows of 256 bytes: a slot per row, not one for the loop, would overflow the calling thread's stack
@pytest.mark.parametrize("rows, floats, on_stack", [(100_000, 64, True), (2, STACK_SCRATCH_BYTES // 4 + 1, False)])
def test_thread_private_buffers_up_to_the_bound_are_one_stack_slot(rows, floats, on_stack):
    from tvm import s_tir, te

    x = te.placeholder((rows, floats), "float32", name="x")
    doubled = te.compute((rows, floats), lambda i, j: x[i, j] * 2, name="doubled")
    out = te.compute((rows, floats), lambda i, j: doubled[i, j] + 1, name="out")
    sch = s_tir.Schedule(te.create_prim_func([x, out]))
    row, _ = sch.get_loops(sch.get_sblock("out"))
    sch.compute_at(sch.get_sblock("doubled"), row)
    sch.set_scope(sch.get_sblock("doubled"), 0, "local")
    library = compile_kernel(sch.mod, CPU.tvm())
    assert ("TVMBackendAllocWorkspace" not in library.mod.inspect_source("ll")) == on_stack
    values, result = torch.randn(rows, floats), torch.empty(rows, floats)
    library["main"](to_tvm(values), to_tvm(result))
    torch.testing.assert_close(result, values * 2 + 1)


def test_kernels_marked_wide_keep_64_bit_loops_through_the_lowering_and_others_are_narrowed():
    """TVM's lowering narrows indices that fit to 32 bits; the direct convolution's are kept 64-bit (see
    :func:`~fxopt.codegen.kernels.base.wide_indexed_prim_func`), without changing the lowering of other kernels."""
    import tvm
    import tvm_ffi
    from tvm import te, tirx
    from tvm.tirx import compilation_pipeline

    from fxopt.codegen.compile import keeping_wide_indices
    from fxopt.codegen.kernels.base import wide_indexed_prim_func

    x = te.placeholder((64, 32), "float32", name="x")
    doubled = te.compute((64, 32), lambda i, j: x[i, j] * 2, name="doubled")
    narrowed = te.create_prim_func([x, doubled], index_dtype_override="int64")
    funcs = {"wide": wide_indexed_prim_func([x, doubled]), "narrowed": narrowed}
    target = tvm.target.Target("llvm")
    mod = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in funcs.items()})
    mod = tirx.transform.BindTarget(target.with_host(target))(mod)
    lowering, _, _ = compilation_pipeline.get_tir_pipeline("s_tir")
    lowered = keeping_wide_indices(lowering)(mod)

    def loop_dtypes(func):
        dtypes = set()

        def on_loop(loop, visitor):
            dtypes.add(str(loop.loop_var.ty))
            visitor.default_visit(loop)

        tvm_ffi.structural_visit(func.body, [(tirx.For, on_loop)])
        return dtypes

    assert loop_dtypes(lowered["wide"]) == {"int64"}
    assert loop_dtypes(lowered["narrowed"]) == {"int32"}
