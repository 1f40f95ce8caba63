"""int8 3x3 stride-1 convolution by Winograd's F(2x2, 3x3) on AVX2's ``vpmaddwd``, exact, in NCHW[x]c.

AVX2's int8 dot product (:mod:`.conv2d_int8`) sign-extends the activations to int16 and multiplies int16 pairs;
F(2x2, 3x3) keeps every value an integer that int16 holds, so the same instruction runs the transformed
convolution with 16 multiplies per 2x2 output tile and input channel instead of 36 (2.25x fewer), and the result
is the direct convolution's exactly. Each 2x2 tile of output pixels is computed from the 4x4 input patch around
it (padded with the zero point, as the direct kernel pads): ``V = Bᵀ d B`` (entries 0 and ±1: ``|V| <= 4 * 128``,
int16), times the filter transformed with twice Lavin's ``G`` (``U' = (2G) g (2G)ᵀ = 4U``, integers up to
``9 * 128``, int16), summed over the input channels in int32 (16 GEMMs of ``vpmaddwd`` on register tiles), then
``Y' = Aᵀ M A = 4y`` (entries 0 and ±1), shifted back by 2 bits. No sum exceeds ``C * 4 * 128 * 128 * 64`` (the
rows of ``2G`` weighted by those of ``Aᵀ`` sum to 8 each way), so up to :data:`MAX_CHANNELS` input channels every
sum is exact in int32 whatever the weights; :meth:`WinogradInt8.exact` bounds it by a layer's own weights
(ResNet-50's 512-channel layers pass). The zero point, the scales, the bias, the float ops after the layer and the
next layer's quantization are :mod:`.conv2d_int8`'s tail (:class:`~.conv2d_int8.Conv2dInt8Variant`), per output
pixel row. Where VNNI's ``vpdpbusd`` (uint8 x int8) is the dot product the transformed values do not fit its
bytes: VNNI hosts keep the direct kernel.

On Zen 4's AVX2 path, ResNet-50's stride-1 3x3 layers alone: 64 channels on 56 x 56 0.42 ms against the direct
kernel's 0.67, 128 on 28 x 28 0.37 against 0.68, 256 on 14 x 14 0.32 against 0.70, 512 on 7 x 7 0.42 against 0.69.

Workload: a :class:`~.conv2d_f32.ConvShape` with a 3x3 kernel, stride and dilation 1, one group, 8-lane output
blocks; the results are ``[N, O/y, OH, OW, y]``, float32 or int8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fxopt.codegen.intrinsics.x86 import DOT_INT16_LANES, dot_int16_pairs
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, RegisterTile, Workload, accumulate_in_registers, padded_to
from fxopt.codegen.kernels.conv2d_f32 import ConvShape, padded_input, schedule_padding
from fxopt.codegen.kernels.conv2d_int8 import Conv2dInt8Variant, dequantize_parameters, dequantized
from fxopt.codegen.kernels.gemm_int8 import dot_instruction
from fxopt.codegen.kernels.winograd_f32 import (
    WinogradF32,
    gemm_task,
    inline_tail,
    input_transform,
    output_tiles,
    output_transform,
    schedule_input_transform,
    schedule_output_transform,
)

__all__ = ["WinogradInt8Config", "WinogradInt8", "WINOGRAD_INT8", "MAX_CHANNELS"]

# F(2x2, 3x3) with the points 0, ±1, ∞; G doubled so that the transformed filter is integer.
B_T = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
G_TWICE = ((2, 0, 0), (1, 1, 1), (1, -1, 1), (0, 0, 2))
A_T = ((1, 1, 1, 0), (0, 1, -1, -1))
TILE, PATCH = 2, 4

#: The most input channels whose sums int32 holds exactly for any int8 weights: ``C * 2**22 < 2**31``.
MAX_CHANNELS = 511
#: The largest a value of ``V`` can be (``Bᵀ``'s rows have two entries of 1: ``2 * 2 * 128``).
V_LARGEST = 512


@dataclass(frozen=True)
class WinogradInt8Config:
    """The GEMMs' register tile: ``rows`` output tiles x ``vectors`` output blocks."""

    rows: int
    vectors: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.vectors} tile"


#: GEMM tiles tuning times where they fit the registers and the output blocks divide (AVX2: 16 registers).
TILES = ((4, 2), (6, 2), (4, 3), (5, 2), (8, 1), (4, 1))


class WinogradInt8(KernelFamily[WinogradInt8Config]):
    """A 3x3 stride-1 int8 convolution in NCHW[x]c by F(2x2, 3x3), the sums exact in int32."""

    name = "winograd_int8"
    config_type = WinogradInt8Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 whose int8 dot product is ``vpmaddwd`` (AVX2, AVX-512 without VNNI); a 3x3 kernel at stride and
        dilation 1, one group, input blocks of whole pairs, 8-lane output blocks. Exact for the layer's weights
        where :meth:`exact` says so (always up to :data:`MAX_CHANNELS` input channels)."""
        if not isa.avx2 or dot_instruction(isa)[1] != 2:
            return False
        shape = ConvShape(*workload)
        three = (shape.kernel_h, shape.kernel_w, shape.stride_h, shape.stride_w) == (3, 3, 1, 1)
        plain = shape.dilation_h == shape.dilation_w == 1 and shape.groups == 1 and shape.whole_blocks
        blocks = shape.in_block % 2 == 0 and shape.out_block == DOT_INT16_LANES
        return three and plain and blocks and shape.pixels > 0

    @staticmethod
    def exact(weight: torch.Tensor) -> bool:
        """Whether every sum of the convolution by int8 ``weight`` (``[O, C, 3, 3]``) is exact in int32 for any
        int8 input: for each output channel and pixel of a tile, ``|Y'| <= V_LARGEST * sum |A| |U'|`` over the
        patch positions and input channels (the partial sums too: no term is larger than its absolute value)."""
        g, a = torch.tensor(G_TWICE, dtype=torch.int64), torch.tensor(A_T, dtype=torch.int64).abs()
        magnitudes = torch.einsum("ak,ockl,bl->abco", g, weight.to(torch.int64), g).abs().sum(2)  # [4, 4, O]
        largest = torch.einsum("pa,qb,abo->pqo", a, a, magnitudes).max()
        return int(largest) * V_LARGEST < 2**31

    def space(self, workload: Workload, isa: Isa) -> list[WinogradInt8Config]:
        shape = ConvShape(*workload)
        tiles_h, tiles_w = self.tiles(shape)
        configs = [
            WinogradInt8Config(min(rows, shape.batch * tiles_h * tiles_w), vectors)
            for rows, vectors in TILES
            if shape.group_out_blocks % vectors == 0 and RegisterTile(rows, vectors, shape.out_block).fits(isa)
        ]
        return list(dict.fromkeys(configs))

    def default(self, workload: Workload, isa: Isa) -> WinogradInt8Config:
        """6, 5 or 4 tiles x 2 blocks: the most tiles whose last task recomputes at most a sixteenth of them past the
        end, else the fewest recomputed. On Zen 4's AVX2 path (ResNet-50's layers): 64 channels on 56 x 56 in 6 x 2
        tiles 0.42 ms against 0.52 in 4 x 2, 256 on 14 x 14 (49 tiles) 5 x 2 the best, 512 on 7 x 7 (16 tiles)
        4 x 2 the best, 21% faster than 5 x 2. Where 2 blocks do not divide the output's, the first tile that fits."""
        space = self.space(workload, isa)
        shape = ConvShape(*workload)
        tiles = shape.batch * math.prod(self.tiles(shape))
        pairs = [c for c in space if c.vectors == 2 and c.rows in (4, 5, 6)]
        if not pairs:
            return space[0]
        few = [c for c in pairs if (padded_to(tiles, c.rows) - tiles) * 16 <= tiles]
        if few:
            return max(few, key=lambda config: config.rows)
        return min(pairs, key=lambda config: (padded_to(tiles, config.rows), config.rows))

    @staticmethod
    def tiles(shape: ConvShape) -> tuple[int, int]:
        """Output tiles down and across."""
        return output_tiles(shape, TILE)

    def worthwhile(self, shape: ConvShape) -> bool:
        """Whether it beats the direct convolution: 16 tiles or more."""
        tiles_h, tiles_w = self.tiles(shape)
        return shape.batch * tiles_h * tiles_w >= 16

    #: ``[N, O/y, OH, OW, y]``, as the float Winograd kernel's.
    result_shape = staticmethod(WinogradF32.result_shape)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """int8 ``[O, C, 3, 3]`` → ``U' = (2G) g (2G)ᵀ`` per filter as int16 pairs of input channels,
        ``[16, O/y, C/2, y, 2]`` (patch position, output block, pair, output channel in the block, channel in the
        pair)."""
        g = torch.tensor(G_TWICE, dtype=torch.int64)
        out_channels, channels = weight.shape[:2]
        transformed = torch.einsum("ak,ockl,bl->abco", g, weight.to(torch.int64), g)
        y = shape.out_block
        blocked = transformed.reshape(PATCH * PATCH, channels // 2, 2, out_channels // y, y)
        return blocked.permute(0, 3, 1, 4, 2).to(torch.int16).contiguous()

    def build(self, workload: Workload, config: WinogradInt8Config, variant: Conv2dInt8Variant | None = None):
        """Parameters as :meth:`.conv2d_int8.Conv2dInt8.build`'s, the weight packed by :meth:`pack`: ``xq`` int8
        ``[N, C/x, H, W, x]``; the packed weight; ``colsum`` int32 ``[O]``; ``zero_point`` int32 and ``x_scale``
        float32, ``[1]``; ``w_scale`` and ``bias`` float32 ``[O]``; the epilogue's operands; requantized, the
        output's ``scale`` and ``zero_point``; the results ``[N, O/y, OH, OW, y]``, float32 and/or int8."""
        from tvm import s_tir, te, tirx

        shape = ConvShape(*workload)
        adds = variant or Conv2dInt8Variant()
        x_block, y_block = shape.in_block, shape.out_block
        in_blocks, out_blocks = shape.channels // x_block, shape.out_channels // y_block
        tiles_h, tiles_w = self.tiles(shape)
        tiles = shape.batch * tiles_h * tiles_w
        padded_tiles = padded_to(tiles, min(config.rows, tiles))
        # Padded for whole patches (every tile's 4x4 window inside) with the zero point.
        extended = shape._replace(
            pad_bottom=tiles_h * TILE + 2 - shape.height - shape.pad_top,
            pad_right=tiles_w * TILE + 2 - shape.width - shape.pad_left,
        )
        xq = te.placeholder((shape.batch, in_blocks, shape.height, shape.width, x_block), "int8", name="xq")
        u = te.placeholder((PATCH * PATCH, out_blocks, shape.channels // 2, y_block, 2), "int16", name="u")
        dequantize = dequantize_parameters(shape.out_channels)
        zero_point = dequantize[1]
        source = padded_input(extended, xq, zero_point[0].astype("int8"))
        transformed = input_transform(source, shape, B_T, padded_tiles, "int16")
        step, within = te.reduce_axis((0, shape.channels // 2), "step"), te.reduce_axis((0, 2), "within")
        acc = te.compute(
            (PATCH * PATCH, out_blocks, padded_tiles, y_block),
            lambda e, o, t, lane: te.sum(
                transformed[e, t, step * 2 + within].astype("int32") * u[e, o, step, lane, within].astype("int32"),
                axis=[step, within],
            ),
            name="acc",
        )
        output = output_transform(acc, shape, A_T, "int32")
        out_shape = self.result_shape(shape)

        conv = te.compute(
            out_shape,
            lambda n, o, h, w, lane: dequantized(
                tirx.shift_right(output(n, o, h, w, lane), 2),  # Y' = 4y exactly
                o * y_block + lane,
                dequantize,
            ),
            name="conv",
        )
        operands, requantize, results, writers = adds.written(conv, out_shape)
        func = te.create_prim_func([xq, u, *dequantize, *operands, *requantize, *results])

        sch = s_tir.Schedule(func)
        kept = inline_tail(sch, writers)
        schedule_padding(sch, extended)
        schedule_input_transform(sch, x_block)
        block = sch.get_sblock("acc")
        task, row, vector, lane, step_loop = gemm_task(sch, block, config.rows, config.vectors, tiles)
        accumulate_in_registers(sch, block, task, (row, vector), lane, step_loop, dot_int16_pairs())
        schedule_output_transform(sch, writers, kept)
        return self.tagged(sch.mod["main"], workload)


WINOGRAD_INT8 = WinogradInt8()
