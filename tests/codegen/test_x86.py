"""The float32 GEMM's register tile per ISA: run and compared with PyTorch where the host has the ISA, built for
a CPU that has it elsewhere (its code must then use that ISA's registers)."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from fxopt.codegen import x86
from fxopt.codegen.runtime import to_tvm
from fxopt.targets import host_cpu, parse_target

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
    kernel = tvm.IRModule({"main": x86.dense_f32(rows, in_features, out_features, epilogue, tile)})
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


@pytest.mark.skipif(not x86.has_avx2(parse_target("cpu")), reason="the float32 GEMM tiles are for x86 CPUs with AVX2")
def test_the_host_gets_the_tile_of_its_widest_vectors():
    tile = x86.dense_tile()
    assert tile.lanes * 32 == min(host_cpu().vector_bits, 512)
    assert tile.panel == tile.vectors * tile.lanes


@pytest.mark.parametrize("l2_bytes", [256 << 10, 512 << 10, 1 << 20, 2 << 20])
@pytest.mark.parametrize("tile", [x86.AVX2_TILE, x86.AVX512_TILE], ids=["avx2", "avx512"])
def test_a_task_runs_as_many_panels_as_half_the_l2_holds(monkeypatch, l2_bytes, tile):
    monkeypatch.setattr(x86, "host_cpu", lambda: dataclasses.replace(host_cpu(), l2_bytes=l2_bytes))
    for in_features in (16, 384, 768, 1024, 3072, 4096, 16384):
        panels = x86.default_panels_per_task(in_features, tile)
        panel_bytes = in_features * tile.panel * 4
        assert 1 <= panels <= 3
        assert panels == 1 or panels * panel_bytes <= l2_bytes // 2  # the group fits
        assert panels == 3 or (panels + 1) * panel_bytes > l2_bytes // 2  # and is no smaller than it must be
