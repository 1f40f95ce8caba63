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
zero point, scales and bias are applied on the tile. Plain convolutions (one group); the activation quantized per
tensor, the weight per output channel or per tensor.

Workload: :class:`~.conv2d_f32.ConvShape`'s, ``y`` the instruction's lanes; the result is ``[N, O/y, OH * OW, y]``
float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.codegen.intrinsics.x86 import dot_int16_pairs, dot_u8s8_quads
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    KernelFamily,
    RegisterTile,
    Workload,
    epilogue_on_tile,
    padded_to,
    wide_indexed_prim_func,
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
from fxopt.codegen.kernels.gemm_int8 import UNSIGNED_SHIFT, dot_instruction

__all__ = ["Conv2dInt8", "CONV2D_INT8", "Conv2dInt8Config", "input_block"]


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
        return str(Conv2dF32Config(self.rows, self.vectors, self.order)) + (" of vpdpbusd" if self.depth == 4 else "")


def input_block(channels: int, isa: Isa) -> tuple[int, int] | None:
    """The input block of ``channels`` for ``isa``'s dot instruction and the channels it blocks: the largest of
    16, 8, 4 (and 2 for ``vpmaddwd``'s pairs) dividing them that holds whole groups of its depth; fewer than 4
    channels (an RGB image) padded to 4 (zero weights read them); None for others no block divides."""
    depth = dot_instruction(isa)[1]
    if channels < 4:
        return 4, 4
    block = next((block for block in (16, 8, 4, 2) if block % depth == 0 and channels % block == 0), None)
    return None if block is None else (block, channels)


class Conv2dInt8(KernelFamily[Conv2dInt8Config]):
    """``out[n, o, p] = (sum_{c, kh, kw} (xq - zp)[n, c, p's tap] * w[o, c, kh, kw]) * x_scale * w_scale[o]
    + bias[o]``, the sums exact in int32, in NCHW[x]c."""

    name = "conv2d_int8"
    config_type = Conv2dInt8Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """AVX2 (VNNI or not); one group; input blocks of whole groups of the instruction's depth, output blocks of
        its lanes."""
        shape = ConvShape(*workload)
        lanes, depth = dot_instruction(isa)
        return (
            isa.avx2
            and shape.groups == 1
            and shape.in_block % depth == 0
            and shape.out_block == lanes
            and shape.whole_blocks
            and shape.out_height > 0
            and shape.out_width > 0
        )

    def space(self, workload: Workload, isa: Isa) -> list[Conv2dInt8Config]:
        """The float32 direct convolution's tiles (:data:`~.conv2d_f32.TILES`) that fit the registers at the
        instruction's lanes and divide the output blocks, at most as many pixels as the output has, either loop
        order."""
        shape = ConvShape(*workload)
        depth = dot_instruction(isa)[1]
        tiles = [
            Conv2dInt8Config(min(rows, shape.pixels), vectors, order, depth)
            for rows, vectors in TILES
            if shape.group_out_blocks % vectors == 0 and RegisterTile(rows, vectors, shape.out_block).fits(isa)
            for order in (CHANNELS_OUTER, PIXELS_OUTER)
        ]
        return list(dict.fromkeys(tiles))

    def default(self, workload: Workload, isa: Isa) -> Conv2dInt8Config:
        """The tile with the most accumulators, the first in :data:`~.conv2d_f32.TILES` order of those, output
        blocks outermost."""
        space = [config for config in self.space(workload, isa) if config.order == CHANNELS_OUTER]
        return max(space, key=lambda config: config.rows * config.vectors)

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """``[N, O/y, OH * OW, y]``, the pixels flattened."""
        return (shape.batch, shape.out_channels // shape.out_block, shape.pixels, shape.out_block)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape, depth: int) -> torch.Tensor:
        """int8 ``[O, C, KH, KW]`` → ``[O/y, C/x, KH, KW, x/depth, y, depth]``: int16 pairs (``depth`` 2) or int8
        quads (4)."""
        o, c, kh, kw = weight.shape
        x, y = shape.in_block, shape.out_block
        blocked = weight.to(torch.int16 if depth == 2 else torch.int8)
        blocked = blocked.reshape(o // y, y, c // x, x // depth, depth, kh, kw)
        return blocked.permute(0, 2, 5, 6, 3, 1, 4).contiguous()

    def build(self, workload: Workload, config: Conv2dInt8Config, variant=None):
        """Parameters, in order: ``xq`` int8 ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`); ``colsum``
        int32 ``[O]`` (each output channel's weight sum); ``zero_point`` int32 and ``x_scale`` float32, ``[1]``;
        ``w_scale`` float32 ``[O]``; ``bias`` float32 ``[O]``; the result, float32 ``[N, O/y, OH * OW, y]``.
        ``variant``: None (the epilogue on the tile is the dequantization)."""
        from tvm import s_tir, te

        shape = ConvShape(*workload)
        depth = config.depth
        x_block, y_block = shape.in_block, shape.out_block
        in_blocks, out_blocks = shape.channels // x_block, shape.out_channels // y_block
        rows = min(config.rows, shape.pixels)
        padded_pixels = padded_to(shape.pixels, rows)
        xq = te.placeholder((shape.batch, in_blocks, shape.height, shape.width, x_block), "int8", name="xq")
        packed = te.placeholder(
            (out_blocks, in_blocks, shape.kernel_h, shape.kernel_w, x_block // depth, y_block, depth),
            "int16" if depth == 2 else "int8",
            name="packed",
        )
        colsum = te.placeholder((shape.out_channels,), "int32", name="colsum")
        zero_point = te.placeholder((1,), "int32", name="zero_point")
        x_scale = te.placeholder((1,), "float32", name="x_scale")
        w_scale = te.placeholder((shape.out_channels,), "float32", name="w_scale")
        bias = te.placeholder((shape.out_channels,), "float32", name="bias")
        shift = 0 if depth == 2 else UNSIGNED_SHIFT
        wide_type = "int16" if depth == 2 else "uint8"
        # Padded with the zero point (inlined into the widening), widened or shifted as the instruction reads it.
        padded = padded_input(shape, xq, zero_point[0].astype("int8"))
        source = te.compute(
            padded.shape, lambda *i: (padded(*i).astype("int32") + shift).astype(wide_type), name="wide"
        )
        c = te.reduce_axis((0, in_blocks), "c")
        kh = te.reduce_axis((0, shape.kernel_h), "kh")
        kw = te.reduce_axis((0, shape.kernel_w), "kw")
        step = te.reduce_axis((0, x_block // depth), "step")
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

        def dequantized(n, o, p, lane):
            channel = o * y_block + lane
            centered = acc[n, o, p, lane] - (zero_point[0] + shift) * colsum[channel]
            return centered.astype("float32") * (x_scale[0] * w_scale[channel]) + bias[channel]

        out = te.compute(out_shape, dequantized, name="out")
        func = wide_indexed_prim_func([xq, packed, colsum, zero_point, x_scale, w_scale, bias, out])

        sch = s_tir.Schedule(func)
        block = sch.get_sblock("acc")
        n, o, p, lane, c_loop, kh_loop, kw_loop, step_loop, within_loop = sch.get_loops(block)
        group, vector = sch.split(o, [None, config.vectors])
        pixel_tile, pixel = sch.split(p, [None, rows])
        outer = (pixel_tile, group) if config.order == PIXELS_OUTER else (group, pixel_tile)
        sch.reorder(n, *outer, c_loop, kh_loop, kw_loop, step_loop, pixel, vector, lane, within_loop)
        task = sch.fuse(n, *outer)
        epilogue_on_tile(sch, task, before=("wide",))
        sch.set_scope(block, 0, "local")
        sch.parallel(task)
        init = sch.decompose_reduction(block, c_loop)
        sch.tensorize(lane, dot_int16_pairs() if depth == 2 else dot_u8s8_quads(y_block))
        sch.unroll(pixel)
        sch.unroll(vector)
        sch.vectorize(sch.get_loops(init)[-1])
        loops = sch.get_loops(sch.get_sblock("wide"))
        sch.parallel(sch.fuse(*loops[:3]))
        sch.vectorize(loops[-1])
        return self.tagged(sch.mod["main"], workload)


CONV2D_INT8 = Conv2dInt8()
