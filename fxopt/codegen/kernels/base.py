"""The kernel family protocol: what every hand-scheduled kernel template declares, so lowering, tuning and the
tuned-choice database treat them all alike.

A family (one module under :mod:`fxopt.codegen.kernels`) builds one kind of kernel — a float32 GEMM, an int8
GEMM, attention — for any *workload* (its shape: a tuple of ints, e.g. ``(rows, in_features, out_features)``)
from a *config* (a frozen dataclass of int knobs: register tile, cache blocks, lanes; and bool switches: AMX
tiles). It declares

- :meth:`~KernelFamily.applies`: whether it builds a workload for an :class:`~fxopt.codegen.isa.Isa`;
- :meth:`~KernelFamily.space`: the configs tuning times for a workload on an ISA, and
  :meth:`~KernelFamily.default`: the analytic choice from the ISA's vector width, registers and caches, used
  untuned (always one of the space);
- :meth:`~KernelFamily.build`: the scheduled PrimFunc for a workload, a config and a *variant* — what the call
  site adds that does not change the schedule (an epilogue, a mask's shape, where the inputs are read from);
  ``None`` is the plain form tuning times.

Families whose kernels read a constant weight also give ``pack(weight, config)``: the weight re-laid at build time.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar

from fxopt.codegen.intrinsics.x86 import AMX_ROWS
from fxopt.codegen.isa import Isa

__all__ = [
    "TEMPLATE_ATTR",
    "WIDE_INDICES_ATTR",
    "wide_indexed_prim_func",
    "Workload",
    "RegisterTile",
    "KernelFamily",
    "workload_key",
    "parse_workload_key",
    "padded_to",
    "epilogue_on_tile",
    "written_with_epilogue",
    "dot_product_tiles",
    "dot_tiles",
    "dot_tile_default",
]

#: The PrimFunc attribute naming a family's kernel and its workload (``"gemm_f32 128x768x3072"``): what tuning
#: finds in a module and times candidates of.
TEMPLATE_ATTR = "fxopt_template"

#: The PrimFunc attribute of a kernel built with 64-bit index arithmetic, which its lowering keeps
#: (:func:`fxopt.codegen.compile.register_tir_pipeline`; TVM's narrows indices that fit to 32 bits).
WIDE_INDICES_ATTR = "fxopt_wide_indices"

Workload = tuple[int, ...]

Config = TypeVar("Config")


def workload_key(workload: Workload) -> str:
    """``(128, 768, 3072)`` → ``"128x768x3072"``: how a workload is named in kernel attributes and the database."""
    return "x".join(str(n) for n in workload)


def parse_workload_key(key: str) -> Workload:
    """The inverse of :func:`workload_key`."""
    return tuple(int(n) for n in key.split("x"))


def padded_to(n: int, tile: int) -> int:
    """``n`` rounded up to whole tiles of ``tile``: the rows a kernel computes when its last tile recomputes
    rows past the end rather than being predicated."""
    return -(-n // tile) * tile


@dataclass(frozen=True)
class RegisterTile:
    """A tile of ``rows`` x ``vectors`` accumulators of ``lanes`` floats each, held in vector registers beside the
    ``vectors`` values of the other operand and one broadcast value (the GEMM's and attention's micro-kernel)."""

    rows: int
    vectors: int
    lanes: int

    @property
    def panel(self) -> int:
        """Columns one tile computes: ``vectors`` x ``lanes``."""
        return self.vectors * self.lanes

    def fits(self, isa: Isa) -> bool:
        """Whether its accumulators, the other operand's vectors and the broadcast fit ``isa``'s registers."""
        return self.rows * self.vectors + self.vectors + 1 <= isa.vector_registers


def wide_indexed_prim_func(tensors: list) -> Any:
    """``te.create_prim_func(tensors)`` with 64-bit indices, marked to keep them (:data:`WIDE_INDICES_ATTR`).

    Why: a 32-bit flattened index ``offset + pixel`` is sign-extended per pixel, which LLVM cannot hoist; with an
    image or group offset in a direct convolution's tile, its SLP vectorizer then computes the pixels' addresses in
    vector registers the accumulators need (181 instructions a tap with two stack reloads against 163 on AVX2;
    grouped 3x3 512@14² stride 2: 120 -> 136 GFLOP/s here).
    """
    from tvm import te

    return te.create_prim_func(tensors, index_dtype_override="int64").with_attr(WIDE_INDICES_ATTR, True)


class KernelFamily(ABC, Generic[Config]):
    """One kernel template: see the module docstring. Subclasses set :attr:`name` and :attr:`config_type`."""

    #: How the family is named in kernel attributes, tuning reports and the database.
    name: ClassVar[str]
    #: Its config: a frozen dataclass whose fields are ints (how the database stores it).
    config_type: ClassVar[type]

    @abstractmethod
    def applies(self, workload: Workload, isa: Isa) -> bool:
        """Whether the family builds ``workload`` for ``isa``."""

    @abstractmethod
    def space(self, workload: Workload, isa: Isa) -> list[Config]:
        """The configs tuning times for ``workload`` on ``isa``; :meth:`default` is one of them."""

    @abstractmethod
    def default(self, workload: Workload, isa: Isa) -> Config:
        """The config used untuned, derived from ``isa``."""

    @abstractmethod
    def build(self, workload: Workload, config: Config, variant: Any = None) -> Any:
        """The scheduled PrimFunc (tagged by :meth:`tagged`)."""

    def kernel_name(self, workload: Workload) -> str:
        """``"gemm_f32 128x768x3072"``: the kernel's :data:`TEMPLATE_ATTR` and what tuning reports."""
        return f"{self.name} {workload_key(workload)}"

    def tagged(self, func: Any, workload: Workload) -> Any:
        """``func`` marked as scheduled (MetaSchedule leaves it alone), opaque to fusion, and named for tuning."""
        return func.with_attrs(
            {"tir.is_scheduled": True, "op_pattern": 8, TEMPLATE_ATTR: self.kernel_name(workload)}  # 8: opaque
        )

    def config_entry(self, config: Config) -> dict[str, int]:
        """``config`` as the database stores it."""
        return dataclasses.asdict(config)  # type: ignore[call-overload]

    def config_from(self, entry: dict) -> Config:
        """The config a database entry holds (a knob added since it was written: its default, the schedule it was
        measured with); raises ``KeyError``, ``TypeError`` or ``ValueError`` for one this module did not write."""
        values: dict[str, int | bool] = {}
        for f in dataclasses.fields(self.config_type):
            value = entry[f.name] if f.name in entry or f.default is dataclasses.MISSING else f.default
            values[f.name] = bool(value) if isinstance(f.default, bool) else int(value)  # a switch, else a count
        if min(v for v in values.values() if not isinstance(v, bool)) < 1:
            raise ValueError(f"{self.name} config {values}: knobs are at least 1")
        return self.config_type(**values)


def epilogue_on_tile(sch, tile_loop, before: tuple[str, ...] = ("pad",), writers: tuple[str, ...] = ("out",)) -> Any:
    """Schedule a tiled kernel's tail on its tile: the stages between the accumulator ``acc`` and the ``writers``
    (the bias, the epilogue: :mod:`fxopt.codegen.epilogue`) inlined into the writers, but for those the
    epilogue reads more than once (:data:`~fxopt.codegen.epilogue.KEPT`), which are computed once per tile into
    registers; the writers (in order: a later one may read an earlier one's tile) and those stages under
    ``tile_loop``, their last loop vectorized. ``before``: the stages that prepare the accumulator's operands,
    left alone. Returns the last writer."""
    from fxopt.codegen.epilogue import KEPT

    kept = []
    for stage in sch.get_child_blocks(sch.get_sblock("root")):
        name = sch.get(stage).name_hint
        if name.startswith(KEPT):
            kept.append(stage)
        elif name not in ("acc", *writers, *before):
            sch.compute_inline(stage)
    for stage in kept:  # in order: each reads the ones before it
        sch.reverse_compute_at(stage, tile_loop, preserve_unit_loops=True)
        sch.set_scope(stage, 0, "local")
        sch.vectorize(sch.get_loops(stage)[-1])
    for name in writers:
        writer = sch.get_sblock(name)
        sch.reverse_compute_at(writer, tile_loop, preserve_unit_loops=True)
        sch.vectorize(sch.get_loops(writer)[-1])
    return writer


def written_with_epilogue(conv, epilogue, out_shape: tuple[int, ...]) -> tuple[list, object]:
    """The epilogue's operands (TE placeholders; whole ones in the result's shape) and the ``out`` stage writing
    ``epilogue(conv)`` (``conv`` itself without one)."""
    from tvm import te

    operands = [
        te.placeholder(out_shape if len(s) == 2 else s, "float32", name=f"operand_{k}")
        for k, s in enumerate(epilogue.operand_shapes if epilogue else [])
    ]
    result = epilogue(conv, operands) if epilogue else conv
    return operands, te.compute(out_shape, lambda *index: result(*index), name="out")


def accumulate_in_registers(sch, acc, task, unrolled, lane, reduction, intrinsic: str | None = None) -> None:
    """The register tile's schedule the families share: the accumulator stage ``acc`` in registers, ``task`` (if
    any) on every core, the tile's ``unrolled`` loops unrolled and its ``lane`` loop vectorized, or with a dot
    instruction's ``intrinsic`` (the sums of a few adjacent inputs per lane, inside ``lane``) tensorized there, the
    accumulators' zeroing split off before the ``reduction`` loop and vectorized."""
    sch.set_scope(acc, 0, "local")  # a stack slot (fxopt's TIR pipeline: compile.scratch_on_stack), in registers
    if task is not None:
        sch.parallel(task)
    if intrinsic is None:
        for loop in unrolled:
            sch.unroll(loop)
        sch.vectorize(lane)
        init = sch.decompose_reduction(acc, reduction)
    else:  # the zeroing split off first: the intrinsic matches the update alone
        init = sch.decompose_reduction(acc, reduction)
        sch.tensorize(lane, intrinsic)
        for loop in unrolled:
            sch.unroll(loop)
    sch.vectorize(sch.get_loops(init)[-1])


def dot_tiles(rows: int, blocks: int, lanes: int, isa: Isa) -> list[tuple[int, int]]:
    """The register tiles of :func:`dot_product_tiles` tuning times for ``rows`` rows and ``blocks`` blocks of
    ``lanes`` outputs: ``(rows, blocks)`` of 1-8 rows by 1-4 blocks with at least 4 accumulators that fit ``isa``'s
    registers and divide the workload (a partial tile cannot be tensorized)."""
    return [
        (r, b)
        for r in (1, 2, 3, 4, 6, 8)
        for b in (1, 2, 3, 4)
        if r * b >= 4 and rows % r == 0 and blocks % b == 0 and RegisterTile(r, b, lanes).fits(isa)
    ]


def dot_tile_default(rows: int, blocks: int, lanes: int, isa: Isa, wide: bool) -> tuple[int, int]:
    """The register tile :func:`dot_product_tiles` uses untuned: ``wide``, up to 8 rows x 3 blocks (24
    accumulators, for 32 registers); else up to 4 x 2 (8, for 16). Fewer rows and blocks where they do not
    divide the workload."""
    r = next(r for r in ((8, 6, 4, 2, 1) if wide else (4, 2, 1)) if rows % r == 0)
    b = next(b for b in ((3, 4, 2, 1) if wide else (2, 1)) if blocks % b == 0 and RegisterTile(r, b, lanes).fits(isa))
    return r, b


def dot_product_tiles(func, rows: int, blocks: int, intrinsic: str, whole_reduction: bool = False) -> Any:
    """The schedule of the GEMMs whose dot instruction sums a few adjacent inputs per output lane (int8's
    ``vpmaddwd``/``vpdpbusd``, bfloat16's ``vdpbf16ps``, AMX's tile products): ``func`` computes
    ``acc[m, block, lane]`` over ``(step, within)`` from ``wide`` (the activations as the instruction reads them,
    converted once per call: the tiles read each row once per block of outputs) and packed weights; tiles of
    ``rows`` x ``blocks`` blocks, output blocks outermost (a block's weights stay in cache while the rows stream
    by), on every core, the tail on the tile (:func:`epilogue_on_tile`). ``intrinsic`` (tensorized) computes the
    reduction's innermost step for one row's block, or with ``whole_reduction`` the tile's whole reduction
    (:func:`fxopt.codegen.intrinsics.x86.amx_dot`: its accumulators in tile registers, stored for the tail).
    Returns the schedule and its tile loop."""
    from tvm import s_tir

    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    m, channel_block, lane, step_loop, within_loop = sch.get_loops(block)
    m_outer, m_inner = sch.split(m, [None, rows])
    block_outer, block_inner = sch.split(channel_block, [None, blocks])
    if whole_reduction:
        sch.reorder(block_outer, m_outer, m_inner, block_inner, lane, step_loop, within_loop)
    else:
        sch.reorder(block_outer, m_outer, step_loop, m_inner, block_inner, lane, within_loop)
    tile = sch.fuse(block_outer, m_outer)
    epilogue_on_tile(sch, tile, before=("wide",))  # its last loop, the tile's columns, vectorized
    if whole_reduction:  # the tile's whole reduction in the intrinsic, the zeroing before it
        accumulate_in_registers(sch, block, tile, (), m_inner, m_inner, intrinsic)
    else:
        accumulate_in_registers(sch, block, tile, (m_inner, block_inner), lane, step_loop, intrinsic)
    widen = sch.get_sblock("wide")
    widen_rows, widen_columns = sch.get_loops(widen)
    sch.parallel(widen_rows)
    sch.vectorize(widen_columns)
    return sch, tile


#: The AMX tasks (row tiles, column tiles) tuning times, the first that divides the workload the default: the
#: accumulators and one tile per row tile and column tile within AMX's eight tile registers; 2 x 2 loads a tile
#: per product, the others more. (One column tile's unit loop does not match the tensor intrinsic.)
AMX_TASKS = ((2, 2), (1, 3), (1, 2))
#: Output channels in a row of an AMX accumulator tile (32-bit sums).
AMX_LANES = 16


def amx_tasks(workload: Workload, depth: int) -> list[tuple[int, int]]:
    """``(rows, column tiles)`` of the :data:`AMX_TASKS` that divide GEMM ``workload`` ``(rows, in, out)``, whose
    inputs come ``depth`` to a 32-bit element (int8: 4, bfloat16: 2); none where the inputs are not whole tile
    rows (16 elements) or the outputs whole tiles (16)."""
    rows, in_features, out_features = workload
    if in_features % (AMX_ROWS * depth) or out_features % AMX_LANES:
        return []
    blocks = out_features // AMX_LANES
    return [(r * AMX_ROWS, c) for r, c in AMX_TASKS if rows % (r * AMX_ROWS) == 0 and blocks % c == 0]
