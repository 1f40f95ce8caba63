"""float32 depthwise 2-D convolution (one filter per channel: MobileNet's, ConvNeXt's) in NCHW[x]c.

Each output channel reads its own input channel, so a vector of one pixel's ``x`` channels multiplies the same
pixel's input vector by the tap's weight vector: no broadcast, and each input vector is read once per tap. A
register tile holds ``rows`` output pixels of a row (the last tile of a row padded by recomputing its last pixel)
of one channel block, the ``KH x KW`` taps unrolled around it; tasks (image x channel block x group of output
rows, each padding the input rows it reads once, in cache; its tiles in turn) run on every core. The weight is
packed at build time into ``[C/x, KH, KW, x]``. The bias and the elementwise ops after it (ReLU6, a residual add)
are applied on the tile.

Workload: a :class:`~.conv2d_f32.ConvShape` with ``groups == out_channels == channels`` and one block for both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    KernelFamily,
    RegisterTile,
    Workload,
    accumulate_in_registers,
    epilogue_on_tile,
    padded_to,
    written_with_epilogue,
)
from fxopt.codegen.kernels.conv2d_f32 import ConvShape, padded_input

__all__ = ["DepthwiseF32Config", "DepthwiseF32", "DEPTHWISE_F32", "max_pool", "taps_reduced", "row_tiled"]


@dataclass(frozen=True)
class DepthwiseF32Config:
    """The register tile: ``rows`` output pixels of one block of channels (one vector); ``task_rows`` output rows
    per task."""

    rows: int
    task_rows: int = 1

    def __str__(self) -> str:
        return f"{self.rows}-pixel tile, {self.task_rows} rows per task"


#: Pixels per tile tuning times where the accumulators, the tap's weight and an input vector fit the registers; the
#: first that fits is the default.
ROWS = (14, 12, 8, 7, 6, 4, 16, 28)

#: Bytes of padded input rows a task may hold, tuned over; the first is the default. A task pads the rows it reads
#: once, so more output rows per task pad each input row fewer times (one row per task padded it KH times): on
#: MobileNetV2's layers here 96 KiB (L2) ran 1.3-2.3x faster than one row per task, 24 KiB (L1) 1.2-2x.
TASK_INPUT_BYTES = (96 * 1024, 24 * 1024)


def task_rows(shape: ConvShape, input_bytes: int, cores: int) -> int:
    """The most output rows per task that divide the output's rows, whose padded input rows fit ``input_bytes``,
    and that leave every core four tasks (one row at least)."""
    row_bytes = (shape.width + shape.pad_left + shape.pad_right) * shape.in_block * 4
    blocks = shape.batch * shape.channels // shape.in_block

    def fits(rows: int) -> bool:
        span = (rows - 1) * shape.stride_h + (shape.kernel_h - 1) * shape.dilation_h + 1
        return span * row_bytes <= input_bytes and blocks * (shape.out_height // rows) >= 4 * cores

    return max((r for r in range(1, shape.out_height + 1) if shape.out_height % r == 0 and fits(r)), default=1)


class DepthwiseF32(KernelFamily[DepthwiseF32Config]):
    """``out[n, c, p] = epilogue(sum_{kh, kw} x[n, c, p's tap] * w[c, kh, kw] + bias[c])`` in NCHW[x]c."""

    name = "depthwise_f32"
    config_type = DepthwiseF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 (and FMA), or AArch64 NEON; a group per channel, one block for the input and the output,
        dividing the channels."""
        shape = ConvShape(*workload)
        same = shape.groups == shape.channels == shape.out_channels and shape.in_block == shape.out_block
        fits = shape.channels % shape.in_block == 0 and shape.out_height > 0 and shape.out_width > 0
        return (isa.avx2 or isa.neon) and same and fits

    def space(self, workload: Workload, isa: Isa) -> list[DepthwiseF32Config]:
        """The tiles of :data:`ROWS` that fit, each with the rows per task of each of :data:`TASK_INPUT_BYTES` and
        with one."""
        shape = ConvShape(*workload)
        per_task = [task_rows(shape, size, isa.cores) for size in TASK_INPUT_BYTES] + [1]
        tiles = [
            DepthwiseF32Config(min(rows, shape.out_width), task)
            for rows in ROWS
            if RegisterTile(rows, 1, shape.out_block).fits(isa)
            for task in per_task
        ]
        return list(dict.fromkeys(tiles))

    def default(self, workload: Workload, isa: Isa) -> DepthwiseF32Config:
        """The tile that recomputes the fewest pixels past the end of a row, the widest of those; the rows per task
        of the first of :data:`TASK_INPUT_BYTES`."""
        width = ConvShape(*workload).out_width
        space = self.space(workload, isa)
        return min(
            (c for c in space if c.task_rows == space[0].task_rows),
            key=lambda c: (padded_to(width, c.rows) - width, -c.rows),
        )

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """The kernel's result: ``[N, C/x, OH, OW, x]``."""
        return (shape.batch, shape.channels // shape.out_block, shape.out_height, shape.out_width, shape.out_block)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """``[C, 1, KH, KW]`` → ``[C/x, KH, KW, x]``."""
        c, _, kh, kw = weight.shape
        x = shape.out_block
        return weight.float().reshape(c // x, x, kh, kw).permute(0, 2, 3, 1).contiguous()

    def build(self, workload: Workload, config: DepthwiseF32Config, variant=None):
        """Parameters, in order: ``x`` ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`); ``bias`` ``[C]``;
        the epilogue's operands (whole ones as ``[N, C/x, OH, OW, x]``); the result ``[N, C/x, OH, OW, x]``."""
        from tvm import te

        shape = ConvShape(*workload)
        block = shape.out_block
        x = te.placeholder((shape.batch, shape.channels // block, shape.height, shape.width, block), "float32", "x")
        packed = te.placeholder((shape.channels // block, shape.kernel_h, shape.kernel_w, block), "float32", "packed")
        bias = te.placeholder((shape.channels,), "float32", name="bias")

        def multiply_add(tap, c, kh, kw, lane):
            return te.sum(tap * packed[c, kh, kw, lane], axis=[kh, kw])

        acc = taps_reduced(shape, config, padded_input(shape, x), multiply_add)
        out_shape = self.result_shape(shape)
        conv = te.compute(
            out_shape, lambda n, c, h, w, lane: acc[n, c, h, w, lane] + bias[c * block + lane], name="conv"
        )
        operands, out = written_with_epilogue(conv, variant, out_shape)
        return self.tagged(row_tiled(te.create_prim_func([x, packed, bias, *operands, out]), shape, config), workload)


def max_pool(shape: ConvShape, config: DepthwiseF32Config):
    """A max pool in NCHW[x]c as the depthwise convolution's kernel (its taps' maximum, no weight), padding with
    -inf (``shape``'s bottom and right padding cover a ceil-mode output's last windows). Parameters: ``x``
    ``[N, C/x, H, W, x]``; the result ``[N, C/x, OH, OW, x]``."""
    from tvm import te, tirx

    block = shape.out_block
    x = te.placeholder((shape.batch, shape.channels // block, shape.height, shape.width, block), "float32", "x")

    def maximum(tap, c, kh, kw, lane):
        return te.max(tap, axis=[kh, kw])

    acc = taps_reduced(shape, config, padded_input(shape, x, tirx.min_value("float32")), maximum)
    _, out = written_with_epilogue(acc, None, DepthwiseF32.result_shape(shape))
    # Scheduled and opaque to fusion, as the families' kernels (KernelFamily.tagged): fused with a quantization
    # after it, TVM's FuseTIR failed on its buffers (32-bit shapes against the fused ops' 64-bit).
    func = row_tiled(te.create_prim_func([x, out]), shape, config)
    return func.with_attrs({"tir.is_scheduled": True, "op_pattern": 8})


def taps_reduced(shape: ConvShape, config: DepthwiseF32Config, source, reduce):
    """The ``acc`` stage: ``reduce(tap, c, kh, kw, lane)`` over the ``KH x KW`` taps of each output pixel, the
    output's rows padded to whole tiles."""
    from tvm import te

    width = shape.out_width
    rows = min(config.rows, width)
    kh = te.reduce_axis((0, shape.kernel_h), "kh")
    kw = te.reduce_axis((0, shape.kernel_w), "kw")

    def tap(n, c, h, w, lane):  # past the end of a row, the last tile recomputes the row's last pixel
        w = te.min(w, width - 1) * shape.stride_w + kw * shape.dilation_w
        return source[n, c, h * shape.stride_h + kh * shape.dilation_h, w, lane]

    return te.compute(
        (shape.batch, shape.channels // shape.out_block, shape.out_height, padded_to(width, rows), shape.out_block),
        lambda n, c, h, w, lane: reduce(tap(n, c, h, w, lane), c, kh, kw, lane),
        name="acc",
    )


def row_tiled(func, shape: ConvShape, config: DepthwiseF32Config, writers: tuple[str, ...] = ("out",)):
    """``func`` (an ``acc`` stage of :func:`taps_reduced`, written by ``writers``) scheduled: tiles of ``rows``
    pixels of a row in registers, the taps unrolled around them, tasks of ``task_rows`` output rows on every
    core."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    stage = sch.get_sblock("acc")
    n, c, h, w, lane, kh_loop, kw_loop = sch.get_loops(stage)
    row_group, row = sch.split(h, [None, config.task_rows])
    pixel_tile, pixel = sch.split(w, [None, min(config.rows, shape.out_width)])
    sch.reorder(n, c, row_group, row, pixel_tile, kh_loop, kw_loop, pixel, lane)
    task = sch.fuse(n, c, row_group)
    epilogue_on_tile(sch, pixel_tile, writers=writers)
    accumulate_in_registers(sch, stage, task, (kw_loop, pixel), lane, kh_loop)
    if shape.padded:  # the rows a task reads, padded in its cache (one parallel loop per kernel, not two)
        padding = sch.get_sblock("pad")
        sch.compute_at(padding, task)
        sch.vectorize(sch.get_loops(padding)[-1])
    return sch.mod["main"]


DEPTHWISE_F32 = DepthwiseF32()
