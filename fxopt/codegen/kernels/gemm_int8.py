"""int8 GEMM (``linear_q``) on x86, exact: AVX2's ``vpmaddwd`` on int16 pairs, or VNNI's ``vpdpbusd`` on u8 x s8 quads.

TVM's x86 int8 intrinsics need VNNI or AVX-512; on an AVX2 CPU an untuned int8 matmul runs as scalar-ish loops,
30x slower than PyTorch's float GEMM. The fast AVX2 instruction, ``vpmaddubsw``, saturates its int16 pair sums
on full-range int8 data (the reason PyTorch's x86 backends quantize activations to 7 bits), so this kernel uses
``vpmaddwd`` (:func:`fxopt.codegen.intrinsics.x86.dot_int16_pairs`): weights are packed at build time as int16
pairs ``[N/8, K/2, 8, 2]``, each step multiplies one broadcast pair of sign-extended activations by 8 output
channels' pairs and adds exactly into int32 (activations are sign-extended once per call: widening inside the
tiles cost 40%). Measured here (2-core Zen 3, MiniLM's 128x384x1536, 128x1536x384, 128x384x1152) it runs
1.2-1.7x faster than PyTorch's MKL float GEMM; BERT-base's four GEMMs run at 270-295 GOP/s, ~70% of the
cores' ``vpmaddwd`` peak. A tile (4 rows x 2 blocks of 8 outputs by default) keeps its accumulators in
registers; the epilogue (zero-point correction, scales, bias, then the float ops after the layer: a GELU, a
residual add) runs on the tile while it is hot, so the int32 result never reaches memory, and where the next
quantized layer reads the result, its quantization too: the kernel writes int8. On AVX2 that measured neither
faster nor slower end to end (MiniLM, A/B within noise; benchmarks/README): the tail's arithmetic costs the
same on the tile as in a kernel of its own, and the float tensor between them sat in L2.

On a CPU with VNNI (AVX-512 VNNI: Zen 4/5, Sapphire/Emerald Rapids; AVX-VNNI) one ``vpdpbusd``
(:func:`fxopt.codegen.intrinsics.x86.dot_u8s8_quads`) multiplies a broadcast quad of unsigned activations by
16 (or 8) channels' quads of signed weights and adds exactly into int32: four multiply-adds a lane where
``vpmaddwd`` and its ``vpaddd`` give two. Weights are packed as int8 quads ``[N/16, K/4, 16, 4]``; activations
are shifted into uint8 once per call (``xq + 128``) and the shift is taken back with the zero point
(``acc - (zp + 128) * colsum``), so the result is the same integer as the AVX2 kernel's.

Weights within +-64 (``quantize{weight-bits=7}``) on an AVX2 CPU without VNNI take :class:`GemmInt8SevenBit`:
VNNI's packing, shift and tiles, each quad product by ``vpmaddubsw`` (bytes by bytes, pairs summed into int16,
exact for such weights), ``vpmaddwd`` by ones and ``vpaddd``: 1.4-1.6x the ``vpmaddwd`` kernel on BERT's shapes.

With AMX (Sapphire/Emerald Rapids) a config may be ``amx``: each task of 16-32 rows by 32-48 outputs keeps its
accumulators in tile registers over the whole reduction (:func:`fxopt.codegen.intrinsics.x86.amx_dot`:
``tdpbusd``, 16 x 16 x 64 exact multiply-adds, on the same packing and shifted activations), then stores them
for the tail; the default where the rows are whole tiles (16) and the inputs whole tile rows (64).

Workload: ``(rows, in_features, out_features)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fxopt.codegen.intrinsics.x86 import (
    AMX_ROWS,
    DOT_INT16_LANES,
    SEVEN_BIT_WEIGHT,
    amx_dot,
    dot_int16_pairs,
    dot_u8s7_quads,
    dot_u8s8_quads,
)
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    AMX_LANES,
    KernelFamily,
    Workload,
    amx_tasks,
    dot_product_tiles,
    dot_tile_default,
    dot_tiles,
)

if TYPE_CHECKING:
    from fxopt.codegen.epilogue import Epilogue

__all__ = [
    "GemmInt8Config",
    "GemmInt8Variant",
    "GemmInt8",
    "GEMM_INT8",
    "GemmInt8SevenBit",
    "GEMM_INT8_7BIT",
    "Int8Dot",
    "SevenBitDot",
    "dot_instruction",
    "seven_bit",
    "UNSIGNED_SHIFT",
    "requantize_parameters",
    "requantized",
]

#: VNNI's ``vpdpbusd`` multiplies unsigned activations: the kernel reads ``xq + 128`` and subtracts it back.
UNSIGNED_SHIFT = 128


@dataclass(frozen=True)
class GemmInt8Config:
    """The register tile: ``rows`` activation rows x ``blocks`` blocks of ``lanes`` output channels; ``depth``:
    the input channels one dot instruction sums per output channel (2: ``vpmaddwd``'s int16 pairs; 4: VNNI's
    ``vpdpbusd`` u8 x s8 quads). ``lanes`` and ``depth`` are the ISA's (:func:`dot_instruction`), not tuned."""

    rows: int
    blocks: int
    lanes: int = DOT_INT16_LANES
    depth: int = 2
    #: AMX: ``rows`` (a multiple of 16) x ``blocks`` blocks of 16 are tile registers, the reduction in them.
    amx: bool = False

    def __str__(self) -> str:
        if self.amx:
            return f"{self.rows}x{self.blocks} AMX tile"
        return f"{self.rows}x{self.blocks} tile" + (f" of {self.lanes}-lane byte quads" if self.depth == 4 else "")


def dot_instruction(isa: Isa) -> tuple[int, int]:
    """``(lanes, depth)`` of the int8 dot product ``isa``'s kernels use: VNNI's ``vpdpbusd`` at the vector width
    (16 lanes on AVX-512, 8 on AVX-VNNI), else AVX2's ``vpmaddwd`` at 8 lanes."""
    return (isa.lanes(), 4) if isa.vnni else (DOT_INT16_LANES, 2)


@dataclass(frozen=True)
class GemmInt8Variant:
    """What a call site adds to the kernel: whether the activation's zero point and scale are per row (else one)
    and the weight's scale per output channel (else one); the float ops after the layer computed on the tile
    (an :class:`fxopt.codegen.epilogue.Epilogue`: a GELU, a residual add); and whether the result is requantized
    to int8 there (per tensor: the next quantized layer's input), so no float tensor leaves the kernel."""

    per_row_activation: bool = False
    per_channel_weight: bool = True
    epilogue: Epilogue | None = None
    requantized: bool = False


class Int8Dot:
    """The dot instruction of an int8 family's kernels: :func:`dot_instruction`'s, on AVX2 CPUs."""

    @staticmethod
    def runs_on(isa: Isa) -> bool:
        return isa.avx2

    @staticmethod
    def instruction(isa: Isa) -> tuple[int, int]:
        """``(lanes, depth)`` of the dot instruction on ``isa``."""
        return dot_instruction(isa)

    @staticmethod
    def dot_intrinsic(depth: int, lanes: int) -> str:
        """The tensor intrinsic of the dot instruction summing ``depth`` inputs into each of ``lanes`` outputs."""
        return dot_int16_pairs() if depth == 2 else dot_u8s8_quads(lanes)


class SevenBitDot(Int8Dot):
    """The dot instruction of the seven-bit families (weights within
    :data:`~fxopt.codegen.intrinsics.x86.SEVEN_BIT_WEIGHT`), on AVX2 CPUs without VNNI (with it, the full-range
    families are as fast): VNNI's quads of 8 lanes by :func:`~fxopt.codegen.intrinsics.x86.dot_u8s7_quads`."""

    @staticmethod
    def runs_on(isa: Isa) -> bool:
        return isa.avx2 and not isa.vnni

    @staticmethod
    def instruction(isa: Isa) -> tuple[int, int]:
        return DOT_INT16_LANES, 4

    @staticmethod
    def dot_intrinsic(depth: int, lanes: int) -> str:
        return dot_u8s7_quads()


class GemmInt8(Int8Dot, KernelFamily[GemmInt8Config]):
    """``y[m, n] = (acc[m, n] - zp * colsum[n]) * (x_scale * w_scale) + bias[n]``, ``acc`` the exact int32 sums
    of int8 activations by int8 weights; ``out`` is ``y`` or, per the variant, the epilogue of ``y``, quantized
    to int8 or not."""

    name = "gemm_int8"
    config_type = GemmInt8Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """AVX2 (VNNI or not); whole blocks of the instruction's lanes of output channels, and of its depth of
        input channels."""
        _, in_features, out_features = workload
        lanes, depth = self.instruction(isa)
        return self.runs_on(isa) and out_features % lanes == 0 and in_features % depth == 0

    def space(self, workload: Workload, isa: Isa) -> list[GemmInt8Config]:
        """The AMX tasks (:data:`~.base.AMX_TASKS`) where the ISA has AMX, the dot-product tiles
        (:func:`~.base.dot_tiles`: 1-8 rows by 1-4 blocks that fit the registers and divide the workload), and the
        default."""
        rows, _, out_features = workload
        lanes, depth = self.instruction(isa)
        tiles = [GemmInt8Config(r, b, lanes, depth) for r, b in dot_tiles(rows, out_features // lanes, lanes, isa)]
        tiles = self._amx_tasks(workload, isa) + tiles
        default = self.default(workload, isa)
        return tiles if default in tiles else [default, *tiles]

    def default(self, workload: Workload, isa: Isa) -> GemmInt8Config:
        """AMX (Sapphire Rapids and later) where the rows are a multiple of 16 and the inputs of 64: the first
        task of :data:`~.base.AMX_TASKS` that divides the workload. AVX2: 4 rows x 2 blocks (8 accumulators).
        VNNI: 8 rows x 3 blocks on AVX-512's 32 registers (24 accumulators: ``vpdpbusd``'s latency x its two a
        cycle needs 10 in flight), 4 x 2 on AVX-VNNI's 16. Fewer rows and blocks where they do not divide the
        workload."""
        amx = self._amx_tasks(workload, isa)
        if amx:
            return amx[0]
        rows, _, out_features = workload
        lanes, depth = self.instruction(isa)
        wide = depth == 4 and isa.vector_registers >= 32
        return GemmInt8Config(*dot_tile_default(rows, out_features // lanes, lanes, isa, wide), lanes, depth)

    @staticmethod
    def _amx_tasks(workload: Workload, isa: Isa) -> list[GemmInt8Config]:
        return [GemmInt8Config(r, c, AMX_LANES, 4, amx=True) for r, c in amx_tasks(workload, 4)] if isa.amx_int8 else []

    @staticmethod
    def pack(weight: torch.Tensor, config: GemmInt8Config) -> torch.Tensor:
        """``[N, K]`` int8 → ``[N/lanes, K/depth, lanes, depth]``: for each block of output channels, their groups
        of ``depth`` inputs side by side; int16 pairs for ``vpmaddwd``, int8 quads for ``vpdpbusd``."""
        out_features, in_features = weight.shape
        lanes, depth = config.lanes, config.depth
        groups = weight.to(torch.int16 if depth == 2 else torch.int8)
        groups = groups.reshape(out_features // lanes, lanes, in_features // depth, depth)
        return groups.permute(0, 2, 1, 3).contiguous()

    def build(self, workload: Workload, config: GemmInt8Config, variant: GemmInt8Variant | None = None):
        """Parameters, in order: ``xq`` int8 ``[rows, in]``; the packed weight (:meth:`pack`); ``colsum`` int32
        ``[out]`` (each output channel's weight sum); ``zero_point`` int32 and ``x_scale`` float32, ``[rows]`` or
        ``[1]``; ``w_scale`` float32 ``[out]`` or ``[1]``; ``bias`` float32 ``[out]``; the epilogue's operands;
        requantized, the output's ``scale`` float32 and ``zero_point`` int32, ``[1]`` each; the result
        ``[rows, out]``, float32 or (requantized) int8."""
        from tvm import te

        rows, in_features, out_features = workload
        lanes, depth = config.lanes, config.depth
        scales = variant or GemmInt8Variant()
        activations = rows if scales.per_row_activation else 1
        xq = te.placeholder((rows, in_features), "int8", name="xq")
        packed = te.placeholder(
            (out_features // lanes, in_features // depth, lanes, depth),
            "int16" if depth == 2 else "int8",
            name="packed",
        )
        colsum = te.placeholder((out_features,), "int32", name="colsum")
        zero_point = te.placeholder((activations,), "int32", name="zero_point")
        x_scale = te.placeholder((activations,), "float32", name="x_scale")
        w_scale = te.placeholder((out_features if scales.per_channel_weight else 1,), "float32", name="w_scale")
        bias = te.placeholder((out_features,), "float32", name="bias")
        # The activations as the instruction reads them, once per call (the tiles read each row N/16 times;
        # widening there cost 40%): sign-extended to int16, or shifted into uint8.
        shift = 0 if depth == 2 else UNSIGNED_SHIFT
        wide = te.compute(
            xq.shape,
            lambda m, k: xq[m, k].astype("int16") if depth == 2 else (xq[m, k].astype("int16") + shift).astype("uint8"),
            name="wide",
        )
        step = te.reduce_axis((0, in_features // depth), "step")
        within = te.reduce_axis((0, depth), "within")
        acc = te.compute(
            (rows, out_features // lanes, lanes),
            lambda m, block, lane: te.sum(
                wide[m, step * depth + within].astype("int32") * packed[block, step, lane, within].astype("int32"),
                axis=[step, within],
            ),
            name="acc",
        )

        def row(m):
            return m if scales.per_row_activation else 0

        linear = te.compute(
            (rows, out_features),
            lambda m, n: (
                (acc[m, n // lanes, n % lanes] - (zero_point[row(m)] + shift) * colsum[n]).astype("float32")
                * (x_scale[row(m)] * w_scale[n if scales.per_channel_weight else 0])
                + bias[n]
            ),
            name="linear",
        )
        epilogue = scales.epilogue
        shapes = epilogue.operand_shapes if epilogue else []
        operands = [te.placeholder(shape, "float32", name=f"operand_{i}") for i, shape in enumerate(shapes)]
        result: Any = epilogue(linear, operands) if epilogue else linear  # a TE tensor
        requantize = requantize_parameters() if scales.requantized else []
        if requantize:
            out = requantized(result, *requantize)
        else:
            out = te.compute(linear.shape, lambda m, n: result[m, n], name="out")
        func = te.create_prim_func(
            [xq, packed, colsum, zero_point, x_scale, w_scale, bias, *operands, *requantize, out]
        )

        if config.amx:
            intrinsic = amx_dot("u8s8", config.rows // AMX_ROWS, config.blocks, in_features // depth)
        else:
            intrinsic = self.dot_intrinsic(depth, lanes)
        sch, _ = dot_product_tiles(func, config.rows, config.blocks, intrinsic, whole_reduction=config.amx)
        return self.tagged(sch.mod["main"], workload)


GEMM_INT8 = GemmInt8()


class GemmInt8SevenBit(SevenBitDot, GemmInt8):
    """:class:`GemmInt8` for weights of at most :data:`~fxopt.codegen.intrinsics.x86.SEVEN_BIT_WEIGHT` in
    magnitude (``quantize{weight-bits=7}``) on AVX2 CPUs without VNNI (:class:`SevenBitDot`): VNNI's packing,
    shifted activations and tiles, each quad product a ``vpmaddubsw``, a ``vpmaddwd`` by ones and a ``vpaddd``:
    four multiply-adds a lane in three instructions where ``vpmaddwd`` pairs take two and a half for two (with
    their share of broadcasts). On Zen 4 running AVX2 code, 1.4-1.6x the ``vpmaddwd`` kernel on BERT's shapes. The
    lowering picks it where the layer's weights fit (:func:`seven_bit`)."""

    name = "gemm_int8_7bit"


GEMM_INT8_7BIT = GemmInt8SevenBit()


def seven_bit(weight: torch.Tensor) -> bool:
    """Whether int8 ``weight``'s values all lie within :data:`~fxopt.codegen.intrinsics.x86.SEVEN_BIT_WEIGHT` in
    magnitude: what the seven-bit families multiply exactly."""
    return not weight.numel() or -SEVEN_BIT_WEIGHT <= int(weight.min()) and int(weight.max()) <= SEVEN_BIT_WEIGHT


def requantize_parameters() -> list:
    """The output quantization's ``scale`` (float32) and ``zero_point`` (int32), ``[1]`` each, as TE placeholders:
    the parameters a requantizing kernel takes before its result."""
    from tvm import te

    return [te.placeholder((1,), "float32", name="out_scale"), te.placeholder((1,), "int32", name="out_zp")]


def requantized(result, out_scale, out_zero_point, name: str = "out") -> Any:
    """``result`` (a float32 TE tensor) quantized to int8 per tensor as ``fxopt::quantize`` rounds
    (:func:`fxopt.quant.formats.quantize_tensor`: ``floor(y / scale + 0.5) + zp``, clamped), a stage ``name``."""
    from tvm import te, tirx

    def quantized(*index):
        level = tirx.floor(result(*index) / out_scale[0] + 0.5) + out_zero_point[0].astype("float32")
        return tirx.max(tirx.min(level, 127.0), -128.0).astype("int8")

    return te.compute(result.shape, quantized, name=name)
