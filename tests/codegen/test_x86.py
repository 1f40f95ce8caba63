"""The hand kernels per ISA. The float32 GEMM's register tile: run and compared with PyTorch where the host has the
ISA, built for a CPU that has it elsewhere (its code must then use that ISA's registers). The attention kernel's
schedule at every ISA's lanes, run on this host (LLVM splits wider vectors), and its AVX-512 build's registers."""

import re

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from fxopt.codegen import x86
from fxopt.codegen.isa import Isa
from fxopt.codegen.runtime import to_tvm
from fxopt.targets import host_cpu, parse_target

CPU = parse_target("cpu")

# (tile, the CPU flag it needs, an LLVM CPU that has it, the registers its vectors live in)
ISAS = [
    pytest.param(x86.AVX2_TILE, "avx2", "znver3", "%ymm", id="avx2"),
    pytest.param(x86.AVX512_TILE, "avx512f", "znver4", "%zmm", id="avx512"),
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
    panels = x86.default_panels_per_task(in_features, tile, 256 << 10)
    kernel = tvm.IRModule({"main": x86.dense_f32(rows, in_features, out_features, tile, panels, epilogue)})
    if flag not in host_cpu().features:
        library = tvm.compile(kernel, target=tvm.target.Target({"kind": "llvm", "mcpu": mcpu}))
        assert registers in library.mod.inspect_source("asm")
        return
    x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    scale, out = torch.randn(out_features), torch.empty(rows, out_features)
    library = tvm.compile(kernel, target=parse_target("cpu").tvm())
    args = [x, x86.pack_dense_weight(weight, tile.panel), bias, *([scale] if epilogue else []), out]
    library["main"](*map(to_tvm, args))
    expected = F.linear(x, weight, bias)
    torch.testing.assert_close(out, torch.relu(expected) * scale if epilogue else expected, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not Isa.of(CPU).avx2, reason="the float32 GEMM tiles are for x86 CPUs with AVX2")
def test_the_host_gets_the_tile_of_its_widest_vectors():
    tile = x86.dense_tile(Isa.of(CPU))
    assert tile.lanes * 32 == min(host_cpu().vector_bits, 512)
    assert tile.panel == tile.vectors * tile.lanes


@pytest.mark.parametrize(
    "spec, tile", [("cpu:avx2", x86.AVX2_TILE), ("x86_64:znver4", x86.AVX512_TILE), ("aarch64", x86.NEON_TILE)]
)
def test_a_named_isa_gets_its_tile_whatever_the_host(spec, tile):
    assert x86.dense_tile(Isa.named(spec)) == tile


@pytest.mark.parametrize("l2_bytes", [256 << 10, 512 << 10, 1 << 20, 2 << 20])
@pytest.mark.parametrize("tile", [x86.AVX2_TILE, x86.AVX512_TILE], ids=["avx2", "avx512"])
def test_a_task_runs_as_many_panels_as_half_the_l2_holds(l2_bytes, tile):
    for in_features in (16, 384, 768, 1024, 3072, 4096, 16384):
        panels = x86.default_panels_per_task(in_features, tile, l2_bytes)
        panel_bytes = in_features * tile.panel * 4
        assert 1 <= panels <= 3
        assert panels == 1 or panels * panel_bytes <= l2_bytes // 2  # the group fits
        assert panels == 3 or (panels + 1) * panel_bytes > l2_bytes // 2  # and is no smaller than it must be


# Each ISA's attention schedule, built for this host's CPU: a wider ISA's vectors are split by LLVM, so the
# schedule's logic (tiles, lanes of each row's max and sum, partial tiles and panels) is checked on every host.
ATTENTION_ISAS = [pytest.param("cpu:avx2", id="8 lanes"), pytest.param("cpu:avx512", id="16 lanes")]


@pytest.mark.parametrize("spec", ATTENTION_ISAS)
@settings(max_examples=6, deadline=None)
@given(
    st.tuples(
        st.integers(1, 2),
        st.integers(1, 3),
        st.integers(1, 13),
        # Rows in lanes from 64 keys that are whole vectors of the ISA's lanes; fewer or a partial vector: serial.
        st.one_of(st.integers(1, 19), st.sampled_from([64, 72, 80, 128])),
        st.integers(1, 40),
    ),
    st.sampled_from([(1, 1), (2, 1), (2, 3)]),  # the mask's own batch and head dims
    st.integers(0, 2**16),
)
def test_attention_at_every_isas_lanes_matches_pytorch(spec, shape, mask_dims, seed):
    import tvm

    batch, heads, length, source, dim = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, length, dim, generator=generator)
    k, v = (torch.randn(batch, heads, source, dim, generator=generator) for _ in range(2))
    bias_shape = (min(mask_dims[0], batch), min(mask_dims[1], heads), length, source)
    bias = torch.randn(bias_shape, generator=generator).masked_fill(
        torch.rand(bias_shape, generator=generator) > 0.7, float("-inf")
    )
    bias[..., 0, :] = float("-inf")  # a row whose every key is masked out: zeros, as PyTorch's SDPA gives
    kernel = x86.attention_f32(batch, heads, length, source, dim, bias_shape, 0.3, Isa.named(spec))
    library = tvm.compile(tvm.IRModule({"main": kernel}), target=CPU.tvm())
    out = torch.full((batch, heads, length, dim), float("nan"))
    library["main"](*map(to_tvm, (q, k, v, bias, out)))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3).nan_to_num(0.0)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec", ["x86_64:sapphirerapids", "x86_64:znver4"])
def test_the_avx512_attention_computes_in_zmm_registers_with_each_row_max_in_lanes(spec):
    import tvm

    target = parse_target(spec)
    kernel = x86.attention_f32(1, 12, 128, 128, 64, (1, 1, 128, 128), 0.125, Isa.of(target))
    asm = tvm.compile(tvm.IRModule({"main": kernel}), target=target.tvm()).mod.inspect_source("asm")
    fma = [line for line in asm.splitlines() if re.match(r"\s+vfmadd\w+ps\s", line)]
    assert fma and all("zmm" in line for line in fma)  # scores and P·V: every FMA on 16 lanes
    # The row max: packed maxima over the row's vectors, no chain of scalar ones.
    assert not re.search(r"\s+vmaxss\s", asm) and re.search(r"\s+vmaxps\s.*zmm", asm)
