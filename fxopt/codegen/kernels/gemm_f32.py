"""float32 GEMM (``linear``) on AVX2, AVX-512 and AArch64 NEON (NEON in cross builds, not run here).

The weight is packed at build time into panels of output channels (``[N/panel, K, panel]``, the last panel
zero-padded); a register tile (:class:`~fxopt.codegen.kernels.base.RegisterTile`: 4 rows x 3 ymm vectors on
AVX2, 8 x 3 zmm on AVX-512, 8 x 3 q registers on NEON) keeps its accumulators in registers beside the panel's
weight vectors and one broadcast activation, one FMA per accumulator per step of K; tiles run on every core,
groups of panels outermost so their weights stay in L2 while the rows stream past them (as many as fit in half
of a core's L2); the bias and the elementwise ops after the GEMM (a GELU, a residual add:
:mod:`fxopt.codegen.epilogue`) are applied on the tile. Tuning times the other tiles (:data:`TILES`) and panel
groups per shape. Measured here (2-core Zen 3, BERT-base's 128x768x{768,3072}, 128x3072x768; 2 threads,
``benchmarks/gemm.py``) it runs 1.2-1.4x faster than PyTorch's MKL, 78-93% of the cores' measured FMA peak
(depending on what else shares the machine).

Workload: ``(rows, in_features, out_features)``.
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

__all__ = [
    "GemmF32Config",
    "GemmF32",
    "GEMM_F32",
    "TILES",
    "AVX2_TILE",
    "AVX512_TILE",
    "NEON_TILE",
    "default_tile",
    "default_panels_per_task",
    "panel_sums",
    "panel_tiles",
    "biased_with_epilogue",
]


@dataclass(frozen=True)
class GemmF32Config:
    """The register tile (``rows`` x ``vectors`` accumulators of ``lanes`` floats) and how many weight panels one
    task runs its row tile over."""

    rows: int
    vectors: int
    lanes: int
    panels_per_task: int

    @property
    def tile(self) -> RegisterTile:
        return RegisterTile(self.rows, self.vectors, self.lanes)

    def __str__(self) -> str:
        return f"{self.rows}x{self.vectors} tile, {self.panels_per_task} panels per task"


#: AVX2 (16 ymm): 4 x 3 vectors is 12 accumulators + 3 weight vectors + 1 broadcast, 7 loads per 12 FMAs.
#: Measured here (2-core Zen 3, BERT's shapes, 2 threads): 4 x 3 155-185 GFLOP/s, BLIS's 6 x 2 145-160, 2 x 6
#: 125-140, 3 x 4 and 5 x 2 about 70 (their partial last row tile of 128 rows costs half the speed).
AVX2_TILE = RegisterTile(rows=4, vectors=3, lanes=8)
#: AVX-512 (32 zmm): 8 x 3 is 24 accumulators + 3 + 1, the same shape at twice the registers (11 loads per 24
#: FMAs). Not measured on an AVX-512 host yet: built, not run, where the host has no AVX-512.
AVX512_TILE = RegisterTile(rows=8, vectors=3, lanes=16)
#: AArch64 NEON (32 128-bit v registers): 8 x 3 vectors of 4 is 24 accumulators + 3 + 1, BLIS's 8 x 12 ARMv8
#: SGEMM tile. Cross-built only (no ARM host here): the template is the same, LLVM emits ``fmla`` on ``v`` registers.
NEON_TILE = RegisterTile(rows=8, vectors=3, lanes=4)

#: The tiles tuning times, by lanes (the first is the default): those whose accumulators, weight vectors and
#: broadcast fill the registers. AVX2: 5 x 2 and 3 x 4 lose on 128 rows (a partial last row tile) and win on
#: others (192 rows: MiniLM's 8 x 24 tokens).
TILES = {
    4: (NEON_TILE, RegisterTile(6, 4, 4), RegisterTile(4, 6, 4), RegisterTile(12, 2, 4)),
    8: (AVX2_TILE, RegisterTile(6, 2, 8), RegisterTile(5, 2, 8), RegisterTile(3, 4, 8), RegisterTile(2, 6, 8)),
    16: (AVX512_TILE, RegisterTile(6, 4, 16), RegisterTile(4, 6, 16), RegisterTile(12, 2, 16)),
}


def default_tile(isa: Isa) -> RegisterTile:
    """The register tile for ``isa``'s widest vectors."""
    if isa.neon:
        return NEON_TILE
    return AVX512_TILE if isa.lanes() >= 16 else AVX2_TILE


def default_panels_per_task(in_features: int, out_features: int, tile: RegisterTile, l2_bytes: int) -> int:
    """How many weight panels one task runs its row tile over: as many as fit in half of a core's L2 (the other
    half holds the activations), at most 3, and as divide the panels (a last group short of panels leaves the
    core that runs it idle: 768 outputs in 16 panels, 2-core Zen 4, 3 per task 12% slower than 2) unless there are
    16 groups or more. Measured here (2-core Zen 3, 512 KiB L2, K=768: three 74 KiB panels): GPT-2's LM head
    (128x768x50257) 8-10% faster than one panel per task, 128x768x3072 4-5%, 768x768 3%, 768x2304 the same; at
    K=3072 (295 KiB panels) two per task were 2-4% slower."""
    panel_bytes = in_features * tile.panel * 4
    panels = -(-out_features // tile.panel)
    most = max(1, min(3, l2_bytes // 2 // panel_bytes))
    return next(n for n in range(most, 0, -1) if panels % n == 0 or panels >= 16 * n)


class GemmF32(KernelFamily[GemmF32Config]):
    """``out[m, n] = epilogue(sum_k x[m, k] * w[n, k] + bias[n])``, float32, ``w`` packed into panels."""

    name = "gemm_f32"
    config_type = GemmF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 (and FMA), or AArch64 NEON."""
        return isa.avx2 or isa.neon

    def space(self, workload: Workload, isa: Isa) -> list[GemmF32Config]:
        """Every tile of :data:`TILES` at ``isa``'s lanes with 1 to 3 weight panels per task, as many as fit in a
        core's L2."""
        _, in_features, _ = workload
        return [
            GemmF32Config(tile.rows, tile.vectors, tile.lanes, panels)
            for tile in TILES[default_tile(isa).lanes]
            for panels in (1, 2, 3)
            if panels == 1 or panels * in_features * tile.panel * 4 <= isa.l2_bytes
        ]

    def default(self, workload: Workload, isa: Isa) -> GemmF32Config:
        tile = default_tile(isa)
        return GemmF32Config(
            tile.rows, tile.vectors, tile.lanes, default_panels_per_task(workload[1], workload[2], tile, isa.l2_bytes)
        )

    @staticmethod
    def pack(weight: torch.Tensor, config: GemmF32Config) -> torch.Tensor:
        """``[N, K]`` float32 → ``[ceil(N/panel), K, panel]``: each panel's output channels side by side along K
        (the last panel zero-padded), so the micro-kernel reads one contiguous row of the panel per step of K."""
        panel = config.tile.panel
        out_features, in_features = weight.shape
        panels = -(-out_features // panel)
        padded = torch.nn.functional.pad(weight.float(), (0, 0, 0, panels * panel - out_features))
        return padded.reshape(panels, panel, in_features).permute(0, 2, 1).contiguous()

    def build(self, workload: Workload, config: GemmF32Config, variant=None):
        """Parameters, in order: ``x`` ``[rows, in]``; the packed weight (:meth:`pack`); ``bias`` ``[out]``; the
        epilogue's operands; the result ``[rows, out]``. ``variant``: the epilogue
        (:class:`fxopt.codegen.epilogue.Epilogue`: its ``operand_shapes``, and called with the TE result and
        operand placeholders it gives the TE value to write), or ``None``."""
        from tvm import te

        rows, in_features, out_features = workload
        epilogue, tile = variant, config.tile
        width = tile.panel
        panels = -(-out_features // width)
        x = te.placeholder((rows, in_features), "float32", name="x")
        packed = te.placeholder((panels, in_features, width), "float32", name="packed")
        bias = te.placeholder((out_features,), "float32", name="bias")
        acc = panel_sums(x, packed, config)
        operands, out = biased_with_epilogue(acc, bias, epilogue, (rows, out_features))
        func = te.create_prim_func([x, packed, bias, *operands, out])
        return self.tagged(panel_tiles(func, rows, config), workload)


GEMM_F32 = GemmF32()


def panel_sums(x, panels, config: GemmF32Config):
    """The ``acc`` stage of :func:`panel_tiles`: ``x`` ``[rows, K]`` times ``panels`` ``[panels, K, width]``, over
    whole row tiles of ``config``: a last partial tile's rows past the end repeat the last row (computed, never
    written), since predicating them in every step of the tile cost 30% (196 rows, Zen 4)."""
    from tvm import te

    rows, in_features = x.shape
    k = te.reduce_axis((0, in_features), "k")
    return te.compute(
        (padded_to(rows, min(config.tile.rows, rows)), panels.shape[0], panels.shape[2]),
        lambda m, panel, lane: te.sum(x[te.min(m, rows - 1), k] * panels[panel, k, lane], axis=k),
        name="acc",
    )


def biased_with_epilogue(acc, bias, epilogue, out_shape: tuple[int, int]) -> tuple[list, object]:
    """The panels' sums ``acc`` (``[rows, panels, width]``; rows past ``out_shape``'s, if any, are not written)
    plus ``bias``, then ``epilogue`` (or None): its operands (TE placeholders) and the ``out`` stage writing
    ``out_shape``, ``[rows, out_features]``."""
    from tvm import te

    width = acc.shape[2]
    linear = te.compute(out_shape, lambda m, n: acc[m, n // width, n % width] + bias[n], name="linear")
    return written_with_epilogue(linear, epilogue, out_shape)


def panel_tiles(
    func, rows: int, config: GemmF32Config, per_step: tuple[str, ...] = (), per_task: str | None = None
) -> object:
    """The float32 GEMM's schedule of ``func``: an ``acc`` stage ``[rows, panels, width]`` reduced over its last
    axis, read by the tail that ``out`` writes (:func:`~.base.epilogue_on_tile`; other stages inlined).
    ``per_step``: stages computed before ``acc`` (the weight-only GEMM's: each row's sums per group, at the root)
    and, the last of them, a reduction ``[rows, panels, steps, width]`` that each step of ``acc``'s reduction reads,
    computed there as a register tile of its own (its sums over a group of inputs). ``per_task``: a stage of the
    packed weight's shape (the weight-only GEMM's dequantized panels) computed once per task for its group of
    panels, each task then running every row tile over them."""
    from tvm import s_tir

    tile = config.tile
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    m, panel, lane, step = sch.get_loops(block)
    m_outer, m_inner = sch.split(m, [None, min(tile.rows, rows)])  # whole tiles (panel_sums), else predicated
    vector, lane_inner = sch.split(lane, [None, tile.lanes])
    # Groups of panels outermost: their weights (K x width floats each) stay in L2 while every row tile streams
    # past them, and each task runs its row tile over the group's panels in turn (the tile's activations stay
    # in L1, its output rows are written group-wide). A partial last group is predicated.
    group, panel = sch.split(panel, [None, config.panels_per_task])
    sch.reorder(group, m_outer, panel, step, m_inner, vector, lane_inner)
    task = group if per_task else sch.fuse(group, m_outer)
    epilogue_on_tile(sch, panel, before=("pad", *per_step, *([per_task] if per_task else [])))
    if per_task:
        panels = sch.get_sblock(per_task)
        sch.compute_at(panels, task, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(panels)[-1])
    inner = None
    if per_step:
        inner = sch.get_sblock(per_step[-1])
        sch.compute_at(inner, step, preserve_unit_loops=True)
        sch.set_scope(inner, 0, "local")
        rows_loop, _, _, lanes, reduction = sch.get_loops(inner)[-5:]
        inner_vector, inner_lane = sch.split(lanes, [None, tile.lanes])
        sch.reorder(reduction, rows_loop, inner_vector, inner_lane)
        sch.unroll(rows_loop)
        sch.unroll(inner_vector)
        sch.vectorize(inner_lane)
    accumulate_in_registers(sch, block, task, (m_inner, vector), lane_inner, step)
    if inner is not None:  # after the task loop is parallel: a decomposed reduction inside it is not one
        init = sch.decompose_reduction(inner, reduction)
        sch.vectorize(sch.get_loops(init)[-1])
    return sch.mod["main"]
