"""bfloat16 GEMM (``linear_bf16``) on x86 CPUs with AVX-512 BF16: ``vdpbf16ps``, float32 sums.

One ``vdpbf16ps`` (:func:`fxopt.codegen.intrinsics.x86.dot_bf16_pairs`) multiplies a broadcast pair of bfloat16
activations by 16 output channels' pairs of bfloat16 weights and adds both products into float32 accumulators:
two multiply-adds a lane where the float32 FMA does one. The schedule is the int8 GEMM's
(:func:`~fxopt.codegen.kernels.base.dot_product_tiles`): weights packed at build time as pairs
``[N/16, K/2, 16, 2]`` (their bits, uint16), activations rounded to bfloat16 once per call (to nearest, ties to
even, as PyTorch rounds), register tiles of 8 rows x 3 blocks on AVX-512's 32 registers, the bias and the float
ops after the layer (:mod:`fxopt.codegen.epilogue`) on the tile.

The result is ``linear_bf16``'s (:func:`fxopt.quant.ops.linear_bf16`) but for the order of the float32 additions
(and denormal products, which ``vdpbf16ps`` flushes to zero). With AMX-BF16 (Sapphire/Emerald Rapids) a config
may be ``amx``: the int8 GEMM's AMX tasks on the same pairs (``tdpbf16ps``, 16 x 16 x 32 multiply-adds into
float32 tiles), the default where the rows are whole tiles (16) and the inputs whole tile rows (32).

Workload: ``(rows, in_features, out_features)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fxopt.codegen.intrinsics.x86 import amx_dot, bf16_bits, bf16_dot_llvm, bf16_value, dot_bf16_pairs
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    KernelFamily,
    Workload,
    amx_tasks,
    dot_product_tiles,
    dot_tile_default,
    dot_tiles,
)
from fxopt.codegen.kernels.gemm_f32 import biased_with_epilogue

if TYPE_CHECKING:
    from fxopt.codegen.epilogue import Epilogue

__all__ = ["GemmBf16Config", "GemmBf16", "GEMM_BF16", "LANES"]

#: float32 lanes of a zmm register: the output channels one ``vdpbf16ps`` updates.
LANES = 16


@dataclass(frozen=True)
class GemmBf16Config:
    """The register tile: ``rows`` activation rows x ``blocks`` blocks of 16 output channels; ``amx``: tile
    registers instead (``rows`` a multiple of 16), the reduction in them."""

    rows: int
    blocks: int
    amx: bool = False

    def __str__(self) -> str:
        return f"{self.rows}x{self.blocks} " + ("AMX tile" if self.amx else "tile of vdpbf16ps")


class GemmBf16(KernelFamily[GemmBf16Config]):
    """``out[m, n] = epilogue(sum_k bf16(x[m, k]) * w[n, k] + bias[n])``, products of bfloat16 values summed in
    float32."""

    name = "gemm_bf16"
    config_type = GemmBf16Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """AVX-512 BF16 at 512 bits; whole blocks of 16 output channels and pairs of input channels."""
        _, in_features, out_features = workload
        return isa.avx512_bf16 and isa.lanes() == LANES and out_features % LANES == 0 and in_features % 2 == 0

    def space(self, workload: Workload, isa: Isa) -> list[GemmBf16Config]:
        """The AMX tasks (:data:`~.base.AMX_TASKS`) where the ISA has AMX-BF16, the dot-product tiles
        (:func:`~.base.dot_tiles`: 1-8 rows by 1-4 blocks that fit the registers and divide the workload), and the
        default."""
        rows, _, out_features = workload
        tiles = [GemmBf16Config(r, b) for r, b in dot_tiles(rows, out_features // LANES, LANES, isa)]
        tiles = self._amx_tasks(workload, isa) + tiles
        default = self.default(workload, isa)
        return tiles if default in tiles else [default, *tiles]

    def default(self, workload: Workload, isa: Isa) -> GemmBf16Config:
        """AMX-BF16 (Sapphire Rapids and later) where the rows are a multiple of 16 and the inputs of 32: the
        first task of :data:`~.base.AMX_TASKS` that divides the workload. Else 8 rows x 3 blocks (24
        accumulators, as the float32 GEMM's AVX-512 tile); fewer where they do not divide the workload."""
        amx = self._amx_tasks(workload, isa)
        if amx:
            return amx[0]
        rows, _, out_features = workload
        return GemmBf16Config(*dot_tile_default(rows, out_features // LANES, LANES, isa, wide=True))

    @staticmethod
    def _amx_tasks(workload: Workload, isa: Isa) -> list[GemmBf16Config]:
        return [GemmBf16Config(r, c, amx=True) for r, c in amx_tasks(workload, 2)] if isa.amx_bf16 else []

    @staticmethod
    def pack(weight: torch.Tensor, config: GemmBf16Config) -> torch.Tensor:
        """bfloat16 ``[N, K]`` → its bits ``[N/16, K/2, 16, 2]`` (uint16): for each block of output channels, their
        pairs of inputs side by side."""
        out_features, in_features = weight.shape
        pairs = weight.to(torch.bfloat16).view(torch.uint16).reshape(out_features // LANES, LANES, in_features // 2, 2)
        return pairs.permute(0, 2, 1, 3).contiguous()

    def build(self, workload: Workload, config: GemmBf16Config, variant: Epilogue | None = None):
        """Parameters, in order: ``x`` float32 ``[rows, in]``; the packed weight (:meth:`pack`); ``bias`` float32
        ``[out]``; the epilogue's operands (``variant``); the result, float32 ``[rows, out]``."""
        from tvm import te

        rows, in_features, out_features = workload
        x = te.placeholder((rows, in_features), "float32", name="x")
        packed = te.placeholder((out_features // LANES, in_features // 2, LANES, 2), "uint16", name="packed")
        bias = te.placeholder((out_features,), "float32", name="bias")
        wide = te.compute(x.shape, lambda m, k: bf16_bits(x[m, k]), name="wide")
        step = te.reduce_axis((0, in_features // 2), "step")
        within = te.reduce_axis((0, 2), "within")
        acc = te.compute(
            (rows, out_features // LANES, LANES),
            lambda m, block, lane: te.sum(
                bf16_value(wide[m, step * 2 + within]) * bf16_value(packed[block, step, lane, within]),
                axis=[step, within],
            ),
            name="acc",
        )
        operands, out = biased_with_epilogue(acc, bias, variant, (rows, out_features))
        func = te.create_prim_func([x, packed, bias, *operands, out])
        if config.amx:
            intrinsic = amx_dot("bf16", config.rows // 16, config.blocks, in_features // 2)
            sch, _ = dot_product_tiles(func, config.rows, config.blocks, intrinsic, whole_reduction=True)
        else:
            sch, tile = dot_product_tiles(func, config.rows, config.blocks, dot_bf16_pairs(LANES))
            sch.annotate(tile, "pragma_import_llvm", bf16_dot_llvm(LANES))
        return self.tagged(sch.mod["main"], workload)


GEMM_BF16 = GemmBf16()
