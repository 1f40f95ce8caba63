"""Convolution times per (input block, output block): what ``convert-layout`` chooses each convolution's block by.

The block of a convolution's output is the largest power of two up to the vector's lanes dividing its channels
unless measured otherwise: tuning (:func:`fxopt.codegen.tune.tune`) times each convolution the model has at the
blocks of a vector's lanes and of half a vector, for its input and its output (a depthwise convolution's are one),
each pair with its family's default config, so that pairs compare like for like. The times go to ``blocks.json`` in
the target's database directory, keyed as :func:`fxopt.ir.block_costs.conv_geometry_key` names
convolutions; a build hands that file to ``convert-layout`` (``block-costs``), which searches the blocks of the
whole network with them and the cost of re-blocking where two blocks meet (NeoCPU's global layout search). The
search therefore applies from the build after the one that tuned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.conv2d_f32 import ConvShape
from fxopt.codegen.tuning_database import BLOCKS_FILE
from fxopt.ir.block_costs import BlockCosts, conv_geometry_key, read_block_costs, write_block_costs

__all__ = ["geometry_key", "block_pairs", "time_block_pairs", "load", "save"]

logger = logging.getLogger("fxopt.codegen.tune")


def geometry_key(shape: ConvShape) -> str:
    """``shape`` as ``convert-layout`` names a convolution (its blocks left out)."""
    return conv_geometry_key(
        shape.batch,
        shape.channels,
        shape.height,
        shape.width,
        shape.out_channels,
        (shape.kernel_h, shape.kernel_w),
        (shape.stride_h, shape.stride_w),
        (shape.pad_top, shape.pad_left, shape.pad_bottom, shape.pad_right),
        (shape.dilation_h, shape.dilation_w),
        shape.groups,
    )


def block_pairs(shape: ConvShape, isa: Isa) -> list[tuple[int, int]]:
    """The ``(input block, output block)`` pairs to time ``shape`` at: its own and those of ``isa``'s lanes and half
    of them that divide the channels (an input in blocks under 4, an RGB image's, keeps its block)."""
    lanes = isa.lanes()

    def blocks(channels: int, own: int) -> list[int]:
        if own < 4:
            return [own]
        return sorted({own} | {b for b in (lanes // 2, lanes) if b >= 4 and channels % b == 0})

    if shape.groups == shape.channels == shape.out_channels > 1:
        return [(b, b) for b in blocks(shape.channels, shape.out_block)]
    return [(x, y) for x in blocks(shape.channels, shape.in_block) for y in blocks(shape.out_channels, shape.out_block)]


def time_block_pairs(
    shape: ConvShape, isa: Isa, costs: BlockCosts, measure: Callable[[list[ConvShape]], list[float | None]]
) -> int:
    """Time ``shape`` at its :func:`block_pairs` ``costs`` lacks, into ``costs`` (``measure``: microseconds per
    shape, None where no kernel computes one); how many were timed."""
    pairs = costs.setdefault(geometry_key(shape), {})
    missing = [pair for pair in block_pairs(shape, isa) if pair not in pairs]
    times = measure([shape._replace(in_block=x, out_block=y) for x, y in missing]) if missing else []
    timed = {pair: us for pair, us in zip(missing, times) if us is not None}
    pairs.update(timed)
    return len(timed)


def load(database_dir: Path) -> BlockCosts:
    """The block costs stored in ``database_dir``: none if it holds no file, or (with a warning) one this module did
    not write."""
    file = Path(database_dir) / BLOCKS_FILE
    if not file.exists():
        return {}
    try:
        return read_block_costs(file)
    except ValueError as exc:
        logger.warning("fxopt: warning: %s; timing the blocks again", exc)
        return {}


def save(database_dir: Path, costs: BlockCosts) -> None:
    write_block_costs(Path(database_dir) / BLOCKS_FILE, costs)
