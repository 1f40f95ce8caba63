"""int8 2-D convolution (``conv_q``) on x86 in the blocked layout NCHW[x]c, exact: the int8 GEMM's dot products.

The direct convolution of :mod:`.conv2d_f32` with :mod:`.gemm_int8`'s arithmetic: activations ``[N, C/x, H, W, x]``
int8, widened once per call as the dot instruction reads them (sign-extended to int16 for AVX2's ``vpmaddwd``,
shifted into uint8 for VNNI's ``vpdpbusd``; :func:`~.gemm_int8.dot_instruction`) and padded there with the
activation's zero point, the real value 0, so that every tap of every output pixel reads a value whose zero point
is the same: the zero point's contribution is then ``(zp + shift) * colsum[o]`` (``colsum``: the output channel's
weight sum over its input channels and taps), taken off every pixel alike, where padding with 0 would need a
border-dependent correction. The weight is packed at build time into ``[O/y, C/x, KH, KW, x/depth, y, depth]``:
for each input block, tap and output block, ``y`` output channels' groups of ``depth`` input channels side by
side (int16 pairs, or int8 quads). A register tile of ``rows`` output pixels x ``vectors`` output blocks of ``y``
lanes (the instruction's) accumulates one dot instruction per pixel, block and group of ``depth`` inputs; the
zero point, scales and bias are applied on the tile, then the float ops after the layer (ReLU, a residual add:
:mod:`fxopt.codegen.epilogue`) and, where the next convolution reads the result, its quantization to int8
(:class:`Conv2dInt8Variant`): a quantized CNN's blocks then pass int8 from kernel to kernel. Plain convolutions
(one group); the activation quantized per tensor, the weight per output channel or per tensor. Weights within
+-64 on an AVX2 CPU without VNNI: :class:`Conv2dInt8SevenBit`, VNNI's quads by ``vpmaddubsw``
(:class:`~.gemm_int8.GemmInt8SevenBit`).

Workload: :class:`~.conv2d_f32.ConvShape`'s, ``y`` the instruction's lanes (or 8: VNNI's 256-bit form); the
results are ``[N, O/y, OH * OW, y]``, float32 or int8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    KernelFamily,
    RegisterTile,
    Workload,
    accumulate_in_registers,
    epilogue_on_tile,
    padded_to,
    wide_indexed_prim_func,
    written_with_epilogue,
)
from fxopt.codegen.kernels.conv2d_f32 import (
    CHANNELS_OUTER,
    PIXELS_OUTER,
    TILES,
    Conv2dF32Config,
    ConvShape,
    padded_input,
    tap,
)
from fxopt.codegen.kernels.gemm_int8 import (
    UNSIGNED_SHIFT,
    Int8Dot,
    SevenBitDot,
    dot_instruction,
    requantize_parameters,
    requantized,
)

if TYPE_CHECKING:
    from fxopt.codegen.epilogue import Epilogue

__all__ = [
    "Conv2dInt8",
    "CONV2D_INT8",
    "Conv2dInt8SevenBit",
    "CONV2D_INT8_7BIT",
    "Conv2dInt8Config",
    "Conv2dInt8Variant",
    "dequantize_parameters",
    "dequantized",
    "input_block",
    "source_block",
]


@dataclass(frozen=True)
class Conv2dInt8Config:
    """The float32 direct convolution's knobs (:class:`~.conv2d_f32.Conv2dF32Config`: ``rows`` output pixels x
    ``vectors`` output blocks, the loop ``order``) and ``depth``, the input channels one dot instruction sums
    per output channel (2: ``vpmaddwd``; 4: ``vpdpbusd``): the ISA's, not tuned."""

    rows: int
    vectors: int
    order: int = CHANNELS_OUTER
    depth: int = 2

    def __str__(self) -> str:
        return str(Conv2dF32Config(self.rows, self.vectors, self.order)) + (" of byte quads" if self.depth == 4 else "")


@dataclass(frozen=True)
class Conv2dInt8Variant:
    """What a call site adds to the kernel: the float ops after the convolution computed on its tile (an
    :class:`~fxopt.codegen.epilogue.Epilogue`: ReLU, a residual add), and whether their result is quantized to
    int8 there (per tensor: the next convolution's input), written instead of the float result or, ``float_too``,
    beside it (a residual block's output, which the next block's residual add reads as well)."""

    epilogue: Epilogue | None = None
    requantized: bool = False
    float_too: bool = False

    @property
    def writes_float(self) -> bool:
        return not self.requantized or self.float_too

    def written(self, conv, out_shape: tuple[int, ...]) -> tuple[list, list, list, tuple[str, ...]]:
        """The tail on ``conv`` (the dequantized convolution, a float32 TE stage of ``out_shape``): the epilogue's
        operands and the requantization's parameters (TE placeholders), the results (the float ``out``, the int8
        ``out_int8``) and the names of their stages, the kernel's writers."""
        operands, out = written_with_epilogue(conv, self.epilogue, out_shape)
        requantize = requantize_parameters() if self.requantized else []
        results = [out] if self.writes_float else []
        if requantize:  # from the float tile just written, or (not written) inlined
            out_scale, out_zero_point = requantize
            results.append(requantized(out, out_scale, out_zero_point, "out_int8"))
        return operands, requantize, results, ("out",) * self.writes_float + ("out_int8",) * self.requantized


def dequantize_parameters(out_channels: int) -> list:
    """The TE placeholders an int8 convolution's sums are dequantized by, its parameters after the packed weight:
    ``colsum`` int32 ``[O]`` (each output channel's weight sum), ``zero_point`` int32 and ``x_scale`` float32
    ``[1]``, ``w_scale`` and ``bias`` float32 ``[O]``."""
    from tvm import te

    return [
        te.placeholder((out_channels,), "int32", name="colsum"),
        te.placeholder((1,), "int32", name="zero_point"),
        te.placeholder((1,), "float32", name="x_scale"),
        te.placeholder((out_channels,), "float32", name="w_scale"),
        te.placeholder((out_channels,), "float32", name="bias"),
    ]


def dequantized(total, channel, parameters: list, shift: int = 0):
    """``total``, output ``channel``'s int32 sum over the input padded with its zero point (each value ``shift``ed
    as the dot instruction reads it), as float32: the zero point's share taken off with the channel's weight sum,
    scaled, the bias added (``parameters``: :func:`dequantize_parameters`')."""
    colsum, zero_point, x_scale, w_scale, bias = parameters
    centered = total - (zero_point[0] + shift) * colsum[channel]
    return centered.astype("float32") * (x_scale[0] * w_scale[channel]) + bias[channel]


def input_block(channels: int, isa: Isa) -> int | None:
    """The input block of ``channels`` for ``isa``'s dot instruction: the largest of 16, 8, 4 (and 2 for
    ``vpmaddwd``'s pairs) dividing them that holds whole groups of its depth; 1 for fewer than 4 channels (an RGB
    image: NCHW itself, which the kernel re-blocks as it widens, :func:`source_block`); None for others no block
    divides."""
    depth = dot_instruction(isa)[1]
    if channels < 4:
        return 1
    return next((block for block in (16, 8, 4, 2) if block % depth == 0 and channels % block == 0), None)


def source_block(shape: ConvShape, depth: int) -> int:
    """The input block the kernel's dot instructions read: ``shape``'s, or, for fewer than 4 channels in blocks
    that do not hold whole groups of ``depth`` (an RGB image), all of them in one block padded to whole groups
    (the zero point past the real channels, read by zero weights)."""
    if shape.in_block % depth == 0:
        return shape.in_block
    return padded_to(shape.channels, depth)


class Conv2dInt8(Int8Dot, KernelFamily[Conv2dInt8Config]):
    """``out[n, o, p] = (sum_{c, kh, kw} (xq - zp)[n, c, p's tap] * w[o, c, kh, kw]) * x_scale * w_scale[o]
    + bias[o]``, the sums exact in int32, in NCHW[x]c."""

    name = "conv2d_int8"
    config_type = Conv2dInt8Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """AVX2 (VNNI or not); one group; input blocks of whole groups of the instruction's depth, or fewer than 4
        channels (:func:`source_block`); output blocks of its lanes, or of 8 (AVX-512 VNNI's 256-bit form, for
        channels that 16 do not divide)."""
        shape = ConvShape(*workload)
        lanes, depth = self.instruction(isa)
        return (
            self.runs_on(isa)
            and shape.groups == 1
            and (shape.in_block % depth == 0 or shape.channels < 4)
            and shape.out_block in (lanes, 8)
            and shape.whole_blocks
            and shape.out_height > 0
            and shape.out_width > 0
        )

    def space(self, workload: Workload, isa: Isa) -> list[Conv2dInt8Config]:
        """The float32 direct convolution's tiles (:data:`~.conv2d_f32.TILES`) that fit the registers at the
        instruction's lanes and divide the output blocks, at most as many pixels as the output has, either loop
        order."""
        shape = ConvShape(*workload)
        depth = self.instruction(isa)[1]
        tiles = [
            Conv2dInt8Config(min(rows, shape.pixels), vectors, order, depth)
            for rows, vectors in TILES
            if shape.group_out_blocks % vectors == 0 and RegisterTile(rows, vectors, shape.out_block).fits(isa)
            for order in (CHANNELS_OUTER, PIXELS_OUTER)
        ]
        return list(dict.fromkeys(tiles))

    def default(self, workload: Workload, isa: Isa) -> Conv2dInt8Config:
        """Pixel tiles outermost (a tile's input stays in L1 while every block's weights stream by), 2 output blocks
        and as many pixels as recompute fewest past the end: 5 or 6 with 32 registers (AVX-512 VNNI: 10-12
        accumulators, ``vpdpbusd``'s latency x its two a cycle on Sapphire Rapids), 4 or 5 with 16 (AVX2). On Zen 4
        ResNet-50's convolutions ran at 740-920 GOP/s so, 1-34% faster than in 12 x 2 tiles with output blocks
        outermost (1x1 on 56 x 56 images the most), and within 4% of the best tile each; on AVX2 (``vpmaddwd``, Zen
        4 running the AVX2 build) at 280-335 GOP/s, 1.2-1.4x the 6 x 2 tiles with output blocks outermost on images
        of 28 x 28 and more, within 5% of the best tile each. Where 2 blocks do not divide the output's, the tile
        with the most accumulators, the first in :data:`~.conv2d_f32.TILES` order of those, output blocks
        outermost."""
        space = self.space(workload, isa)
        pixels = ConvShape(*workload).pixels
        rows = (5, 6) if isa.vector_registers >= 32 else (4, 5)
        pairs = [c for c in space if c.order == PIXELS_OUTER and c.vectors == 2 and c.rows in rows]
        if pairs:
            return min(pairs, key=lambda config: (padded_to(pixels, config.rows), config.rows))
        outer = [config for config in space if config.order == CHANNELS_OUTER]
        return max(outer, key=lambda config: config.rows * config.vectors)

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """``[N, O/y, OH * OW, y]``, the pixels flattened."""
        return (shape.batch, shape.out_channels // shape.out_block, shape.pixels, shape.out_block)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape, depth: int) -> torch.Tensor:
        """int8 ``[O, C, KH, KW]`` → ``[O/y, C/x, KH, KW, x/depth, y, depth]``, ``x`` the :func:`source_block`
        (input channels past ``C`` zero): int16 pairs (``depth`` 2) or int8 quads (4)."""
        x, y = source_block(shape, depth), shape.out_block
        weight = torch.nn.functional.pad(weight, (0, 0, 0, 0, 0, padded_to(weight.shape[1], x) - weight.shape[1]))
        o, c, kh, kw = weight.shape
        blocked = weight.to(torch.int16 if depth == 2 else torch.int8)
        blocked = blocked.reshape(o // y, y, c // x, x // depth, depth, kh, kw)
        return blocked.permute(0, 2, 5, 6, 3, 1, 4).contiguous()

    def build(self, workload: Workload, config: Conv2dInt8Config, variant: Conv2dInt8Variant | None = None):
        """Parameters, in order: ``xq`` int8 ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`); ``colsum``
        int32 ``[O]`` (each output channel's weight sum); ``zero_point`` int32 and ``x_scale`` float32, ``[1]``;
        ``w_scale`` float32 ``[O]``; ``bias`` float32 ``[O]``; the epilogue's operands (whole ones as
        ``[N, O/y, OH * OW, y]``); requantized, the output's ``scale`` float32 and ``zero_point`` int32, ``[1]``
        each; the results ``[N, O/y, OH * OW, y]``: float32 (unless requantized alone), then int8 (requantized)."""
        from tvm import s_tir, te, tirx

        shape = ConvShape(*workload)
        adds = variant or Conv2dInt8Variant()
        depth = config.depth
        x_block, y_block, wide_block = shape.in_block, shape.out_block, source_block(shape, depth)
        in_blocks, out_blocks = shape.channels // x_block, shape.out_channels // y_block
        wide_blocks = padded_to(shape.channels, wide_block) // wide_block
        rows = min(config.rows, shape.pixels)
        padded_pixels = padded_to(shape.pixels, rows)
        xq = te.placeholder((shape.batch, in_blocks, shape.height, shape.width, x_block), "int8", name="xq")
        packed = te.placeholder(
            (out_blocks, wide_blocks, shape.kernel_h, shape.kernel_w, wide_block // depth, y_block, depth),
            "int16" if depth == 2 else "int8",
            name="packed",
        )
        dequantize = dequantize_parameters(shape.out_channels)
        zero_point = dequantize[1]
        shift = 0 if depth == 2 else UNSIGNED_SHIFT
        wide_type = "int16" if depth == 2 else "uint8"
        # Padded with the zero point (inlined into the widening), widened or shifted as the instruction reads it,
        # re-blocked by the source block (an RGB image's channels side by side, the zero point past them).
        padded = padded_input(shape, xq, zero_point[0].astype("int8"))

        def wide(n, c, h, w, i):
            if wide_block == x_block:
                value = padded(n, c, h, w, i)
            else:
                channel = c * wide_block + i
                real = padded(n, channel // x_block, h, w, channel % x_block)
                value = tirx.if_then_else(channel < shape.channels, real, zero_point[0].astype("int8"))
            return (value.astype("int32") + shift).astype(wide_type)

        _, _, padded_height, padded_width, _ = padded.shape
        source = te.compute((shape.batch, wide_blocks, padded_height, padded_width, wide_block), wide, name="wide")
        c = te.reduce_axis((0, wide_blocks), "c")
        kh = te.reduce_axis((0, shape.kernel_h), "kh")
        kw = te.reduce_axis((0, shape.kernel_w), "kw")
        step = te.reduce_axis((0, wide_block // depth), "step")
        within = te.reduce_axis((0, depth), "within")
        acc = te.compute(
            (shape.batch, out_blocks, padded_pixels, y_block),
            lambda n, o, p, lane: te.sum(
                tap(shape, source, p, c, kh, kw, step * depth + within)(n).astype("int32")
                * packed[o, c, kh, kw, step, lane, within].astype("int32"),
                axis=[c, kh, kw, step, within],
            ),
            name="acc",
        )
        out_shape = self.result_shape(shape)

        conv = te.compute(
            out_shape,
            lambda n, o, p, lane: dequantized(acc[n, o, p, lane], o * y_block + lane, dequantize, shift),
            name="conv",
        )
        operands, requantize, results, writers = adds.written(conv, out_shape)
        params = [xq, packed, *dequantize, *operands, *requantize, *results]
        func = wide_indexed_prim_func(params)

        sch = s_tir.Schedule(func)
        block = sch.get_sblock("acc")
        n, o, p, lane, c_loop, kh_loop, kw_loop, step_loop, within_loop = sch.get_loops(block)
        group, vector = sch.split(o, [None, config.vectors])
        pixel_tile, pixel = sch.split(p, [None, rows])
        outer = (pixel_tile, group) if config.order == PIXELS_OUTER else (group, pixel_tile)
        sch.reorder(n, *outer, c_loop, kh_loop, kw_loop, step_loop, pixel, vector, lane, within_loop)
        task = sch.fuse(n, *outer)
        epilogue_on_tile(sch, task, before=("wide",), writers=writers)
        intrinsic = self.dot_intrinsic(depth, y_block)
        accumulate_in_registers(sch, block, task, (pixel, vector), lane, c_loop, intrinsic)
        loops = sch.get_loops(sch.get_sblock("wide"))
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
        return self.tagged(sch.mod["main"], workload)


CONV2D_INT8 = Conv2dInt8()


class Conv2dInt8SevenBit(SevenBitDot, Conv2dInt8):
    """:class:`Conv2dInt8` for weights of at most :data:`~fxopt.codegen.intrinsics.x86.SEVEN_BIT_WEIGHT` in
    magnitude on AVX2 CPUs without VNNI: VNNI's quads by ``vpmaddubsw`` (:class:`~.gemm_int8.SevenBitDot`)."""

    name = "conv2d_int8_7bit"


CONV2D_INT8_7BIT = Conv2dInt8SevenBit()
