"""float32 2-D convolution in the blocked layout NCHW[x]c (NeoCPU), on x86 with AVX2 or AVX-512 and AArch64 NEON.

Activations are ``[N, C/x, H, W, x]``: ``x`` channels (the layout's *block*, the ISA's float lanes where the
channels allow) side by side, so one vector holds one pixel's block of channels. The weight is packed at build time
into ``[O/y, C/x, KH, KW, x, y]`` (OIHW[x]i[y]o): for each input channel, tap and output block, ``y`` output
channels side by side. A register tile of ``rows`` output pixels x ``vectors`` output blocks accumulates
``input pixel (broadcast) x weight vector`` per input channel and tap, as the GEMM's micro-kernel
(:mod:`.gemm_f32`) does along K; 1x1 convolutions are that GEMM over pixels. The tile's pixels run along the
output's flattened ``OH x OW`` positions (a 7-wide output fills a 4-pixel tile as well as a 56-wide one), the last
tile padded by recomputing the last pixel, so no tile is predicated; the input is zero-padded once into a buffer
beside it when the convolution pads. Tasks (image x group of output blocks x pixel tile) run on every core, groups
of output blocks outermost, so a group's weights stay in L2 while its pixels stream past. The bias and the
elementwise ops after the convolution (ReLU, a residual add: :mod:`fxopt.codegen.epilogue`) are applied on the
tile.

A grouped convolution (ResNeXt's, RegNet's) is ``groups`` such convolutions side by side: output block ``o``
reduces over its group's ``C/groups/x`` input blocks only, the weight packed as ``[O/y, C/groups/x, KH, KW, x, y]``,
and a tile's output blocks lie in one group (they share its input pixels).

Workload: ``(N, C, H, W, O, KH, KW, stride_h, stride_w, pad_top, pad_left, pad_bottom, pad_right, dilation_h,
dilation_w, x, y[, groups])`` (:attr:`ConvShape.workload`); the result is ``[N, O/y, OH * OW, y]`` (a free reshape
of ``[N, O/y, OH, OW, y]``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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

__all__ = [
    "ConvShape",
    "Conv2dF32Config",
    "Conv2dF32",
    "CONV2D_F32",
    "padded_input",
    "tap",
    "schedule_padding",
]


class ConvShape(NamedTuple):
    """A convolution's workload, by name."""

    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_top: int
    pad_left: int
    pad_bottom: int
    pad_right: int
    dilation_h: int
    dilation_w: int
    in_block: int
    out_block: int
    #: Channels in ``groups`` independent convolutions (the depthwise family's: as many as channels).
    groups: int = 1

    @property
    def workload(self) -> Workload:
        """The kernel families' workload: the fields, ``groups`` only where there are several (so an ungrouped
        convolution keys its tuning records as before grouped ones were served)."""
        return tuple(self) if self.groups > 1 else tuple(self)[:-1]

    @property
    def whole_blocks(self) -> bool:
        """Whether the blocks divide each group's input and output channels."""
        inputs = self.channels % (self.groups * self.in_block) == 0
        return inputs and self.out_channels % (self.groups * self.out_block) == 0

    @property
    def group_in_blocks(self) -> int:
        """Input blocks one group reads."""
        return self.channels // self.groups // self.in_block

    @property
    def group_out_blocks(self) -> int:
        """Output blocks one group writes."""
        return self.out_channels // self.groups // self.out_block

    @property
    def out_height(self) -> int:
        span = self.height + self.pad_top + self.pad_bottom - self.dilation_h * (self.kernel_h - 1)
        return (span - 1) // self.stride_h + 1

    @property
    def out_width(self) -> int:
        span = self.width + self.pad_left + self.pad_right - self.dilation_w * (self.kernel_w - 1)
        return (span - 1) // self.stride_w + 1

    @property
    def pixels(self) -> int:
        return self.out_height * self.out_width

    @property
    def padded(self) -> bool:
        return bool(self.pad_top or self.pad_left or self.pad_bottom or self.pad_right)


def padded_input(shape: ConvShape, x, value=0.0):
    """``x`` (TE, ``[N, C/x, H, W, x]``) padded with ``value`` as ``shape`` pads it, as a stage named ``pad``; ``x``
    itself when it pads nothing."""
    from tvm import te, tirx

    top, left = shape.pad_top, shape.pad_left
    if not shape.padded:
        return x
    height, width = shape.height + top + shape.pad_bottom, shape.width + left + shape.pad_right

    def pad(n, c, h, w, i):
        inside = tirx.all(h >= top, h < shape.height + top, w >= left, w < shape.width + left)
        return tirx.if_then_else(inside, x[n, c, h - top, w - left, i], value)

    return te.compute((x.shape[0], x.shape[1], height, width, x.shape[4]), pad, name="pad")


def tap(shape: ConvShape, source, p, c, kh, kw, i):
    """``source[n=0.., c, h, w, i]``'s element that output pixel ``p`` (of the flattened ``OH x OW``; past the end:
    the last pixel, which a last partial tile recomputes) reads at tap ``(kh, kw)``, as a function of the batch."""
    from tvm import te

    p = te.min(p, shape.pixels - 1)
    h = p // shape.out_width * shape.stride_h + kh * shape.dilation_h
    w = p % shape.out_width * shape.stride_w + kw * shape.dilation_w
    return lambda n: source[n, c, h, w, i]


def schedule_padding(sch, shape: ConvShape) -> None:
    """The ``pad`` stage, where ``shape`` pads, parallel over its rows and vectorized along the block."""
    if not shape.padded:
        return
    loops = sch.get_loops(sch.get_sblock("pad"))
    sch.parallel(sch.fuse(*loops[:3]))
    sch.vectorize(loops[-1])


@dataclass(frozen=True)
class Conv2dF32Config:
    """The register tile: ``rows`` output pixels x ``vectors`` output blocks (one vector each: the workload's
    output block is the vector's lanes)."""

    rows: int
    vectors: int
    #: 1: groups of output blocks outermost; 2: pixel tiles outermost.
    order: int = 1

    def __str__(self) -> str:
        return f"{self.rows}x{self.vectors} tile" + (", pixels outermost" if self.order == PIXELS_OUTER else "")


CHANNELS_OUTER, PIXELS_OUTER = 1, 2

#: Tiles (pixels, output blocks) tuning times where they fit the registers and the output blocks divide (the
#: GEMM's 4 x 3 on AVX2 and 8 x 3 on AVX-512 where 3 divides them; 5 x 2 and 7 x 3 for 7 x 7 images).
TILES = ((8, 3), (4, 3), (6, 2), (12, 2), (6, 4), (7, 3), (5, 2), (4, 2), (7, 1), (4, 1), (2, 1))


class Conv2dF32(KernelFamily[Conv2dF32Config]):
    """``out[n, o, p] = epilogue(sum_{c, kh, kw} x[n, c, p's tap] * w[o, c, kh, kw] + bias[o])`` in NCHW[x]c."""

    name = "conv2d_f32"
    config_type = Conv2dF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 (and FMA), or AArch64 NEON, and blocks that divide a group's channels."""
        shape = ConvShape(*workload)
        return (isa.avx2 or isa.neon) and shape.whole_blocks and shape.out_height > 0 and shape.out_width > 0

    def space(self, workload: Workload, isa: Isa) -> list[Conv2dF32Config]:
        """The tiles of :data:`TILES` that fit ``isa``'s registers at the output block's lanes, output blocks
        dividing a group's output blocks, at most as many pixels as the output has; each with groups of output
        blocks outermost (their weights stay in cache while the pixels stream past) or pixel tiles outermost (a
        tile's input stays in L1 while every group's weights stream past)."""
        shape = ConvShape(*workload)
        tiles = [
            Conv2dF32Config(min(rows, shape.pixels), vectors, order)
            for rows, vectors in TILES
            if shape.group_out_blocks % vectors == 0 and RegisterTile(rows, vectors, shape.out_block).fits(isa)
            for order in (CHANNELS_OUTER, PIXELS_OUTER)
        ]
        return list(dict.fromkeys(tiles))

    def default(self, workload: Workload, isa: Isa) -> Conv2dF32Config:
        """The tile with the most accumulators (12 of AVX2's 16 registers, 24 of AVX-512's 32), the first in
        :data:`TILES` order of those; for 1x1 convolutions, of the tiles with at least 5/6 of the most, one
        recomputing at most 1/20 of the pixels past the end if any. ResNet-50's and MobileNetV2's 1x1 layers on
        7 x 7 images (49 pixels) ran 10-25% faster in 5 x 2 tiles (50 pixels) than in 6 x 2 (54) here; on larger
        images 6 x 2 and 4 x 3 won by as much, and ResNet-50's 3x3 layer on 7 x 7 ran 17% slower in 5 x 2."""
        shape = ConvShape(*workload)
        space = self.space(workload, isa)
        most = max(config.rows * config.vectors for config in space)
        pointwise = shape.kernel_h == shape.kernel_w == 1

        def recomputes_much(config: Conv2dF32Config) -> bool:
            padded = padded_to(shape.pixels, config.rows)
            return pointwise and (padded - shape.pixels) * 20 > shape.pixels

        many = [config for config in space if config.rows * config.vectors * 6 >= most * (5 if pointwise else 6)]
        return min(many, key=lambda config: (recomputes_much(config), -config.rows * config.vectors))

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """The kernel's result: ``[N, O/y, OH * OW, y]``, its pixels flattened (a free reshape of the layout's)."""
        return (shape.batch, shape.out_channels // shape.out_block, shape.pixels, shape.out_block)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """``[O, C/groups, KH, KW]`` → ``[O/y, C/groups/x, KH, KW, x, y]`` (OIHW[x]i[y]o)."""
        o, c, kh, kw = weight.shape
        x, y = shape.in_block, shape.out_block
        blocked = weight.float().reshape(o // y, y, c // x, x, kh, kw)
        return blocked.permute(0, 2, 4, 5, 3, 1).contiguous()

    def build(self, workload: Workload, config: Conv2dF32Config, variant=None):
        """Parameters, in order: ``x`` ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`); ``bias``
        ``[O]``; the epilogue's operands (whole ones as ``[N, O/y, OH * OW, y]``); the result
        ``[N, O/y, OH * OW, y]``. ``variant``: the epilogue (:class:`fxopt.codegen.epilogue.Epilogue`), or None."""
        from tvm import s_tir, te

        shape = ConvShape(*workload)
        epilogue = variant
        x_block, y_block = shape.in_block, shape.out_block
        in_blocks, out_blocks = shape.channels // x_block, shape.out_channels // y_block
        group_in_blocks = shape.group_in_blocks
        pixels = shape.pixels
        rows = min(config.rows, pixels)
        padded_pixels = padded_to(pixels, rows)
        x = te.placeholder((shape.batch, in_blocks, shape.height, shape.width, x_block), "float32", name="x")
        source = padded_input(shape, x)
        packed = te.placeholder(
            (out_blocks, group_in_blocks, shape.kernel_h, shape.kernel_w, x_block, y_block), "float32", name="packed"
        )
        bias = te.placeholder((shape.out_channels,), "float32", name="bias")
        c = te.reduce_axis((0, group_in_blocks), "c")
        kh = te.reduce_axis((0, shape.kernel_h), "kh")
        kw = te.reduce_axis((0, shape.kernel_w), "kw")
        i = te.reduce_axis((0, x_block), "i")

        acc = te.compute(
            (shape.batch, out_blocks, padded_pixels, y_block),
            lambda n, o, p, lane: te.sum(
                tap(shape, source, p, o // shape.group_out_blocks * group_in_blocks + c, kh, kw, i)(n)
                * packed[o, c, kh, kw, i, lane],
                axis=[c, kh, kw, i],
            ),
            name="acc",
        )
        out_shape = self.result_shape(shape)
        conv = te.compute(out_shape, lambda n, o, p, lane: acc[n, o, p, lane] + bias[o * y_block + lane], name="conv")
        operands, out = written_with_epilogue(conv, epilogue, out_shape)
        func = wide_indexed_prim_func([x, packed, bias, *operands, out])

        sch = s_tir.Schedule(func)
        block = sch.get_sblock("acc")
        n, o, p, lane, c_loop, kh_loop, kw_loop, i_loop = sch.get_loops(block)
        group, vector = sch.split(o, [None, config.vectors])
        pixel_tile, pixel = sch.split(p, [None, rows])
        outer = (pixel_tile, group) if config.order == PIXELS_OUTER else (group, pixel_tile)
        sch.reorder(n, *outer, c_loop, kh_loop, kw_loop, i_loop, pixel, vector, lane)
        task = sch.fuse(n, *outer)
        epilogue_on_tile(sch, task)
        accumulate_in_registers(sch, block, task, (pixel, vector), lane, c_loop)
        schedule_padding(sch, shape)
        return self.tagged(sch.mod["main"], workload)


CONV2D_F32 = Conv2dF32()
