"""float32 3x3 stride-1 convolution by Winograd's F(4x4, 3x3) (Lavin & Gray 2016) in NCHW[x]c.

Each 4x4 tile of output pixels is computed from the 6x6 input patch around it: the patch transformed
(``V = Bᵀ d B``), multiplied elementwise by the transformed filter (``U = G g Gᵀ``, computed at build time) and
summed over the input channels, then transformed back (``Y = Aᵀ M A``). The sum over channels is 36 independent
GEMMs, one per patch position, of ``tiles x C`` by ``C x O``: 36 multiply-adds per 16 outputs and input channel
instead of 144, 4x fewer than the direct convolution (:mod:`.conv2d_f32`); the transforms cost a few adds per
value. The GEMMs run on the GEMM's register tile (``rows`` tiles x ``vectors`` output blocks, a broadcast value of
``V`` times vectors of ``U``); the transforms vectorize along the channel block and the inverse one applies the
bias and the elementwise ops after the convolution (:mod:`fxopt.codegen.epilogue`) as it writes. The error is a
few float32 roundings more than the direct form's (transform coefficients up to 8). A grouped convolution's GEMMs
sum over its group's input channels only (as :mod:`.conv2d_f32`'s).

Workload: a :class:`~.conv2d_f32.ConvShape` with a 3x3 kernel, stride and dilation 1; the result is
``[N, O/y, OH, OW, y]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fxopt.codegen.epilogue import KEPT
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import (
    KernelFamily,
    RegisterTile,
    Workload,
    accumulate_in_registers,
    padded_to,
    written_with_epilogue,
)
from fxopt.codegen.kernels.conv2d_f32 import ConvShape, padded_input, schedule_padding

__all__ = [
    "WinogradF32Config",
    "WinogradF32",
    "WINOGRAD_F32",
    "output_tiles",
    "input_transform",
    "output_transform",
    "inline_tail",
    "schedule_input_transform",
    "gemm_task",
    "schedule_output_transform",
]

# F(4x4, 3x3) with the points 0, ±1, ±2, ∞.
B_T = (
    (4, 0, -5, 0, 1, 0),
    (0, -4, -4, 1, 1, 0),
    (0, 4, -4, -1, 1, 0),
    (0, -2, -1, 2, 1, 0),
    (0, 2, -1, -2, 1, 0),
    (0, 4, 0, -5, 0, 1),
)
G = (
    (1 / 4, 0, 0),
    (-1 / 6, -1 / 6, -1 / 6),
    (-1 / 6, 1 / 6, -1 / 6),
    (1 / 24, 1 / 12, 1 / 6),
    (1 / 24, -1 / 12, 1 / 6),
    (0, 0, 1),
)
A_T = ((1, 1, 1, 1, 1, 0), (0, 1, -1, 2, -2, 0), (0, 1, 1, 4, 4, 0), (0, 1, -1, 8, -8, 1))
TILE, PATCH = 4, 6


@dataclass(frozen=True)
class WinogradF32Config:
    """The GEMMs' register tile: ``rows`` output tiles x ``vectors`` output blocks."""

    rows: int
    vectors: int

    def __str__(self) -> str:
        return f"{self.rows}x{self.vectors} tile"


#: GEMM tiles tuning times where they fit the registers and the output blocks divide.
TILES = ((8, 3), (6, 2), (4, 3), (12, 2), (6, 4), (4, 2), (4, 1))


def weighted_sum(coefficients, index, terms, dtype: str = "float32") -> object:
    """``sum_k coefficients[index][k] * terms(k)`` in ``dtype`` with ``index`` a loop variable the schedule unrolls:
    each row of coefficients a ``Select`` on ``index``, folded to constants once it is unrolled."""
    from tvm import tirx

    kind = float if dtype.startswith("float") else int
    total = None
    for k in range(len(coefficients[0])):
        weight = tirx.const(kind(coefficients[-1][k]), dtype)
        for row in range(len(coefficients) - 2, -1, -1):
            weight = tirx.Select(index == row, tirx.const(kind(coefficients[row][k]), dtype), weight)
        term = weight * terms(k)
        total = term if total is None else total + term
    return total


class WinogradF32(KernelFamily[WinogradF32Config]):
    """A 3x3 stride-1 convolution in NCHW[x]c by F(4x4, 3x3)."""

    name = "winograd_f32"
    config_type = WinogradF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 or AArch64 NEON; a 3x3 kernel at stride and dilation 1, blocks dividing a group's
        channels."""
        shape = ConvShape(*workload)
        three = (shape.kernel_h, shape.kernel_w, shape.stride_h, shape.stride_w) == (3, 3, 1, 1)
        undilated = shape.dilation_h == shape.dilation_w == 1
        return (isa.avx2 or isa.neon) and three and undilated and shape.whole_blocks and shape.pixels > 0

    def space(self, workload: Workload, isa: Isa) -> list[WinogradF32Config]:
        shape = ConvShape(*workload)
        tiles = self.tiles(shape)
        configs = [
            WinogradF32Config(min(rows, shape.batch * tiles[0] * tiles[1]), vectors)
            for rows, vectors in TILES
            if shape.group_out_blocks % vectors == 0 and RegisterTile(rows, vectors, shape.out_block).fits(isa)
        ]
        return list(dict.fromkeys(configs))

    def default(self, workload: Workload, isa: Isa) -> WinogradF32Config:
        """The tile with the most accumulators (12 of AVX2's 16 registers, 24 of AVX-512's 32), the first in
        :data:`TILES` order of those."""
        return max(self.space(workload, isa), key=lambda config: config.rows * config.vectors)

    @staticmethod
    def tiles(shape: ConvShape) -> tuple[int, int]:
        """Output tiles down and across."""
        return output_tiles(shape, TILE)

    def worthwhile(self, shape: ConvShape) -> bool:
        """Whether it beats the direct convolution, as measured here (2-core Zen 3, ResNet-50's 3x3 layers, 2
        threads): 1.5-3.6x faster at 56x56, 28x28 and 14x14 outputs (16 tiles and more), no faster at 7x7 (4 tiles,
        15 of their 64 pixels padding)."""
        tiles_h, tiles_w = self.tiles(shape)
        return shape.batch * tiles_h * tiles_w >= 8

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """The kernel's result: ``[N, O/y, OH, OW, y]``."""
        return (shape.batch, shape.out_channels // shape.out_block, shape.out_height, shape.out_width, shape.out_block)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """``[O, C/groups, 3, 3]`` → ``U = G g Gᵀ`` per filter, as ``[36, O/y, C/groups, y]`` (patch position,
        output block, input channel of its group, output channel in the block), in float64 then rounded once."""
        g = torch.tensor(G, dtype=torch.float64)
        out_channels, channels = weight.shape[:2]
        transformed = torch.einsum("ak,ockl,bl->abco", g, weight.double(), g).reshape(PATCH * PATCH, channels, -1)
        y = shape.out_block
        blocked = transformed.reshape(PATCH * PATCH, channels, out_channels // y, y).permute(0, 2, 1, 3)
        return blocked.float().contiguous()

    def build(self, workload: Workload, config: WinogradF32Config, variant=None):
        """Parameters, in order: ``x`` ``[N, C/x, H, W, x]``; the transformed weight (:meth:`pack`); ``bias``
        ``[O]``; the epilogue's operands (whole ones as ``[N, O/y, OH, OW, y]``); the result
        ``[N, O/y, OH, OW, y]``."""
        from tvm import s_tir, te

        shape = ConvShape(*workload)
        epilogue = variant
        x_block, y_block = shape.in_block, shape.out_block
        in_blocks, out_blocks = shape.channels // x_block, shape.out_channels // y_block
        tiles_h, tiles_w = self.tiles(shape)
        tiles = shape.batch * tiles_h * tiles_w
        rows = min(config.rows, tiles)
        padded_tiles = padded_to(tiles, rows)
        # Padded for whole patches: every tile's 6x6 window inside.
        extended = shape._replace(
            pad_bottom=tiles_h * TILE + 2 - shape.height - shape.pad_top,
            pad_right=tiles_w * TILE + 2 - shape.width - shape.pad_left,
        )
        x = te.placeholder((shape.batch, in_blocks, shape.height, shape.width, x_block), "float32", name="x")
        source = padded_input(extended, x)
        group_channels = shape.channels // shape.groups
        u = te.placeholder((PATCH * PATCH, out_blocks, group_channels, y_block), "float32", name="u")
        bias = te.placeholder((shape.out_channels,), "float32", name="bias")

        transformed = input_transform(source, shape, B_T, padded_tiles, "float32")
        k = te.reduce_axis((0, group_channels), "k")
        acc = te.compute(
            (PATCH * PATCH, out_blocks, padded_tiles, y_block),
            lambda e, o, t, lane: te.sum(
                transformed[e, t, o // shape.group_out_blocks * group_channels + k] * u[e, o, k, lane], axis=k
            ),
            name="acc",
        )
        out_shape = self.result_shape(shape)
        output = output_transform(acc, shape, A_T, "float32")
        conv = te.compute(
            out_shape, lambda n, o, h, w, lane: output(n, o, h, w, lane) + bias[o * y_block + lane], name="conv"
        )
        operands, out = written_with_epilogue(conv, epilogue, out_shape)
        func = te.create_prim_func([x, u, bias, *operands, out])

        sch = s_tir.Schedule(func)
        kept = inline_tail(sch, ("out",))
        schedule_padding(sch, extended)
        schedule_input_transform(sch, x_block)
        # The GEMMs on the register tile.
        block = sch.get_sblock("acc")
        task, row, vector, lane, k_loop = gemm_task(sch, block, config.rows, config.vectors, tiles)
        accumulate_in_registers(sch, block, task, (row, vector), lane, k_loop)
        schedule_output_transform(sch, ("out",), kept)
        return self.tagged(sch.mod["main"], workload)


WINOGRAD_F32 = WinogradF32()


def output_tiles(shape: ConvShape, tile_size: int) -> tuple[int, int]:
    """Tiles of ``tile_size`` x ``tile_size`` output pixels down and across ``shape``'s output."""
    return -(-shape.out_height // tile_size), -(-shape.out_width // tile_size)


def input_transform(source, shape: ConvShape, b_t, padded_tiles: int, dtype: str):
    """``V = Bᵀ d B`` of every tile's patch of ``source`` (the padded input, ``[N, C/x, H', W', x]``), by rows then
    columns, in ``dtype``: ``[patch positions, tiles (padded_tiles: past the last, the last), C]``."""
    from tvm import te

    patch_size, tile_size = len(b_t), len(b_t) - 2
    tiles_h, tiles_w = output_tiles(shape, tile_size)
    tiles, x_block = shape.batch * tiles_h * tiles_w, shape.in_block

    def patch(t, c, a, b):  # tile t's input value at (a, b) of its patch, channel c
        t = te.min(t, tiles - 1)
        n, rest = t // (tiles_h * tiles_w), t % (tiles_h * tiles_w)
        value = source[n, c // x_block, rest // tiles_w * tile_size + a, rest % tiles_w * tile_size + b, c % x_block]
        return value.astype(dtype)

    rows_done = te.compute(
        (patch_size, patch_size, padded_tiles, shape.channels),
        lambda xi, b, t, c: weighted_sum(b_t, xi, lambda a: patch(t, c, a, b), dtype),
        name="input_rows",
    )
    return te.compute(
        (patch_size * patch_size, padded_tiles, shape.channels),
        lambda e, t, c: weighted_sum(b_t, e % patch_size, lambda b: rows_done[e // patch_size, b, t, c], dtype),
        name="input_transform",
    )


def output_transform(acc, shape: ConvShape, a_t, dtype: str):
    """``Y = Aᵀ M A`` of the GEMMs' sums ``acc`` (``[patch positions, O/y, tiles, y]``, copied out of the register
    tile as ``product``), by columns then rows: a function of the output pixel ``(n, o, h, w, lane)``."""
    from tvm import te

    tile_size, patch_size = len(a_t), len(a_t[0])
    tiles_h, tiles_w = output_tiles(shape, tile_size)
    product = te.compute(acc.shape, lambda *i: acc(*i), name="product")
    columns_done = te.compute(
        (patch_size, tile_size, shape.batch, acc.shape[1], tiles_h * tiles_w, acc.shape[3]),
        lambda xi, j, n, o, r, lane: weighted_sum(
            a_t, j, lambda nu: product[xi * patch_size + nu, o, n * tiles_h * tiles_w + r, lane], dtype
        ),
        name="output_columns",
    )

    def pixel(n, o, h, w, lane):
        tile = h // tile_size * tiles_w + w // tile_size
        return weighted_sum(a_t, h % tile_size, lambda xi: columns_done[xi, w % tile_size, n, o, tile, lane], dtype)

    return pixel


def inline_tail(sch, writers: tuple[str, ...]) -> list:
    """Inline every stage but the kernel's own (the transforms, the GEMMs, the ``writers``) and those the
    epilogue reads more than once (:data:`~fxopt.codegen.epilogue.KEPT`), which it returns."""
    own = ("pad", "input_rows", "input_transform", "acc", "product", "output_columns", *writers)
    kept = []
    for stage in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(stage).name_hint
        if name.startswith(KEPT):
            kept.append(stage)
        elif name not in own:
            sch.compute_inline(stage)
    return kept


def schedule_input_transform(sch, x_block: int) -> None:
    """The input transform: per tile and block of channels, the patch's values in vectors of the block."""
    stage = sch.get_sblock("input_transform")
    e, t, c = sch.get_loops(stage)
    c_block, lane = sch.split(c, [None, x_block])
    sch.reorder(t, c_block, e, lane)
    sch.parallel(t)
    sch.unroll(e)
    sch.vectorize(lane)
    rows_stage = sch.get_sblock("input_rows")
    sch.compute_at(rows_stage, c_block, preserve_unit_loops=True)
    xi, b, _, lane = sch.get_loops(rows_stage)[-4:]
    sch.unroll(xi)
    sch.unroll(b)
    sch.vectorize(lane)


def gemm_task(sch, block, rows: int, vectors: int, tiles: int) -> tuple:
    """The GEMMs' loops (``block``'s: patch position, output block, tile, lane, then its reductions): a task per
    position, group of ``vectors`` output blocks and ``rows`` tiles, the first reduction outside the tile's rows and
    vectors, the others inside its lanes; ``product`` written per task. Returns the task, row, vector, lane and
    outer reduction loops."""
    position, o, t, lane, outer, *inner = sch.get_loops(block)
    group, vector = sch.split(o, [None, vectors])
    tile, row = sch.split(t, [None, min(rows, tiles)])
    sch.reorder(position, group, tile, outer, row, vector, lane, *inner)
    task = sch.fuse(position, group, tile)
    writer = sch.get_sblock("product")
    sch.reverse_compute_at(writer, task, preserve_unit_loops=True)
    sch.vectorize(sch.get_loops(writer)[-1])
    return task, row, vector, lane, outer


def schedule_output_transform(sch, writers: tuple[str, ...], kept: list) -> None:
    """The output transform, then each writer (the bias, the epilogue, a requantization) per output pixel row,
    the ``kept`` stages in registers under the first writer's rows."""
    columns = sch.get_sblock("output_columns")
    loops = sch.get_loops(columns)
    sch.reorder(*loops[2:5], loops[0], loops[1], loops[5])
    sch.parallel(sch.fuse(*loops[2:5]))
    sch.unroll(loops[0])
    sch.unroll(loops[1])
    sch.vectorize(loops[5])
    row_tasks = []
    for name in writers:
        out_loops = sch.get_loops(sch.get_sblock(name))
        row_tasks.append(sch.fuse(*out_loops[:3]))
        sch.parallel(row_tasks[-1])
        sch.vectorize(out_loops[-1])
    for stage in reversed(kept):  # each reads the ones before it: the last first
        sch.compute_at(stage, row_tasks[0], preserve_unit_loops=True)
        sch.set_scope(stage, 0, "local")
        sch.vectorize(sch.get_loops(stage)[-1])
