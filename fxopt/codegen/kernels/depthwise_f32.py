"""float32 depthwise 2-D convolution (one filter per channel: MobileNet's, ConvNeXt's) in NCHW[x]c.

Each output channel reads its own input channel, so a vector of one pixel's ``x`` channels multiplies the same
pixel's input vector by the tap's weight vector: no broadcast, and each input vector is read once per tap. A
register tile holds ``rows`` output pixels (along the flattened ``OH x OW``, the last tile padded as in
:mod:`.conv2d_f32`) of one channel block, the ``KH x KW`` taps unrolled around it; tasks (image x channel block x
pixel tile) run on every core. The weight is packed at build time into ``[C/x, KH, KW, x]``. The bias and the
elementwise ops after it (ReLU6, a residual add) are applied on the tile.

Workload: a :class:`~.conv2d_f32.ConvShape` with ``out_channels == channels`` and one block for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, RegisterTile, Workload, epilogue_on_tile
from fxopt.codegen.kernels.conv2d_f32 import Conv2dF32, ConvShape, padded_input, schedule_padding, tap

__all__ = ["DepthwiseF32Config", "DepthwiseF32", "DEPTHWISE_F32"]


@dataclass(frozen=True)
class DepthwiseF32Config:
    """The register tile: ``rows`` output pixels of one block of channels (one vector)."""

    rows: int

    def __str__(self) -> str:
        return f"{self.rows}-pixel tile"


#: Pixels per tile tuning times where the accumulators, the tap's weight and an input vector fit the registers; the
#: first that fits is the default.
ROWS = (12, 8, 6, 4, 14, 28)


class DepthwiseF32(KernelFamily[DepthwiseF32Config]):
    """``out[n, c, p] = epilogue(sum_{kh, kw} x[n, c, p's tap] * w[c, kh, kw] + bias[c])`` in NCHW[x]c."""

    name = "depthwise_f32"
    config_type = DepthwiseF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 (and FMA), or AArch64 NEON; one block for the input and the output, dividing the channels."""
        shape = ConvShape(*workload)
        same = shape.channels == shape.out_channels and shape.in_block == shape.out_block
        fits = shape.channels % shape.in_block == 0 and shape.out_height > 0 and shape.out_width > 0
        return (isa.avx2 or isa.neon) and same and fits

    def space(self, workload: Workload, isa: Isa) -> list[DepthwiseF32Config]:
        shape = ConvShape(*workload)
        tiles = [
            DepthwiseF32Config(min(rows, shape.pixels))
            for rows in ROWS
            if RegisterTile(rows, 1, shape.out_block).fits(isa)
        ]
        return list(dict.fromkeys(tiles))

    def default(self, workload: Workload, isa: Isa) -> DepthwiseF32Config:
        return self.space(workload, isa)[0]

    result_shape = staticmethod(Conv2dF32.result_shape)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """``[C, 1, KH, KW]`` → ``[C/x, KH, KW, x]``."""
        c, _, kh, kw = weight.shape
        x = shape.out_block
        return weight.float().reshape(c // x, x, kh, kw).permute(0, 2, 3, 1).contiguous()

    def build(self, workload: Workload, config: DepthwiseF32Config, variant=None):
        """Parameters, in order: ``x`` ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`); ``bias`` ``[C]``;
        the epilogue's operands (whole ones as ``[N, C/x, OH * OW, x]``); the result ``[N, C/x, OH * OW, x]``."""
        from tvm import s_tir, te

        shape = ConvShape(*workload)
        epilogue, block = variant, shape.out_block
        blocks, pixels = shape.channels // block, shape.pixels
        rows = min(config.rows, pixels)
        x = te.placeholder((shape.batch, blocks, shape.height, shape.width, block), "float32", name="x")
        source = padded_input(shape, x)
        packed = te.placeholder((blocks, shape.kernel_h, shape.kernel_w, block), "float32", name="packed")
        bias = te.placeholder((shape.channels,), "float32", name="bias")
        kh = te.reduce_axis((0, shape.kernel_h), "kh")
        kw = te.reduce_axis((0, shape.kernel_w), "kw")
        acc = te.compute(
            (shape.batch, blocks, -(-pixels // rows) * rows, block),
            lambda n, c, p, lane: te.sum(
                tap(shape, source, p, c, kh, kw, lane)(n) * packed[c, kh, kw, lane], axis=[kh, kw]
            ),
            name="acc",
        )
        out_shape = self.result_shape(shape)
        conv = te.compute(out_shape, lambda n, c, p, lane: acc[n, c, p, lane] + bias[c * block + lane], name="conv")
        operands = [
            te.placeholder(out_shape if len(s) == 2 else s, "float32", name=f"operand_{k}")
            for k, s in enumerate(epilogue.operand_shapes if epilogue else [])
        ]
        result = epilogue(conv, operands) if epilogue else conv
        out = te.compute(out_shape, lambda *index: result(*index), name="out")
        func = te.create_prim_func([x, packed, bias, *operands, out])

        sch = s_tir.Schedule(func)
        stage = sch.get_sblock("acc")
        n, c, p, lane, kh_loop, kw_loop = sch.get_loops(stage)
        pixel_tile, pixel = sch.split(p, [None, rows])
        sch.reorder(n, c, pixel_tile, kh_loop, kw_loop, pixel, lane)
        task = sch.fuse(n, c, pixel_tile)
        epilogue_on_tile(sch, task)
        sch.set_scope(stage, 0, "local")
        sch.parallel(task)
        sch.unroll(kw_loop)
        sch.unroll(pixel)
        sch.vectorize(lane)
        init = sch.decompose_reduction(stage, kh_loop)
        sch.vectorize(sch.get_loops(init)[-1])
        schedule_padding(sch, shape)
        return self.tagged(sch.mod["main"], workload)


DEPTHWISE_F32 = DepthwiseF32()
