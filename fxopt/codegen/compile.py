"""Relax → machine code for a target: fxopt's build pipeline around TVM's passes.

The pipeline is TVM's per-target default with two differences: tuned
schedules from a MetaSchedule database are applied right after fusion
(before anything else schedules the kernels), and every kernel the database
does not cover gets a default schedule: DLight's GPU rules on CUDA; on CPUs
DLight's reduction rule and :func:`cpu_injective` (TVM's CPU default leaves
a kernel as one thread of scalar loops). Below Relax, kernels are lowered by
TVM's TIR pipeline, keeping the indices of kernels built 64-bit
(:func:`keeping_wide_indices`), plus :func:`scratch_on_stack` (:data:`TIR_PIPELINE`).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

from fxopt.codegen.kernels.base import WIDE_INDICES_ATTR
from fxopt.codegen.tuning_database import RECORDS_FILE, load_database
from fxopt.errors import CodegenError, first_line
from fxopt.log import native_stderr_to_debug
from fxopt.targets import Target

__all__ = [
    "fusion_passes",
    "relax_pipeline",
    "compile_module",
    "compile_kernel",
    "kernel_source",
    "cpu_injective",
    "scratch_on_stack",
    "keeping_wide_indices",
    "STACK_SCRATCH_BYTES",
    "register_tir_pipeline",
    "TIR_PIPELINE",
]

#: The TIR pipeline kernels are lowered with (registered in TVM's pipeline map by :func:`register_tir_pipeline`):
#: TVM's default (per :func:`keeping_wide_indices`), then :func:`scratch_on_stack`.
TIR_PIPELINE = "fxopt"

#: The largest thread-private buffer :func:`scratch_on_stack` puts on the stack (a worker thread's is 2-8 MiB);
#: larger ones stay TVM's workspace allocations.
STACK_SCRATCH_BYTES = 64 << 10


def fusion_passes():
    """Legalize Relax ops to TIR and fuse them into kernels; tuning extracts its tasks after these."""
    from tvm import relax

    return [
        relax.transform.DeadCodeElimination(),  # copies a hand kernel reads through (codegen/layout.py), unread
        deduplicate_kernels(),
        relax.backend.DispatchSampling(),
        relax.backend.DispatchSortScan(),
        relax.transform.LegalizeOps(),
        relax.transform.AnnotateTIROpPattern(),
        relax.transform.FoldConstant(),
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
    ]


def deduplicate_kernels():
    """Module pass: kernels equal but for their names compiled once. Hand-scheduled kernels are named after their
    nodes, so each of a transformer's identical layers brought its own copy of each (BERT-base: 12 of every GEMM
    and attention kernel, each unrolled, compiled by LLVM one by one); calls of a copy go to the first."""
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    @tvm.transform.module_pass(opt_level=0, name="fxopt_deduplicate_kernels")
    def deduplicate(mod, _ctx):
        first: dict = {}
        same = {}
        for var, func in mod.functions_items():
            if isinstance(func, tirx.PrimFunc):
                key = tvm_ffi.StructuralKey(func.without_attr("global_symbol"))
                same[var] = first.setdefault(key, var)
        same = {copy: kept for copy, kept in same.items() if not copy.same_as(kept)}
        if not same:
            return mod

        @relax.expr_functor.mutator
        class Redirect(relax.PyExprMutator):
            def visit_global_var_(self, var):
                return same.get(var, var)

        functions = {}
        for var, func in mod.functions_items():
            if isinstance(func, relax.Function):
                functions[var] = Redirect(mod).visit_expr(func)
            elif var not in same:
                functions[var] = func
        return tvm.IRModule(functions, attrs=mod.attrs, global_infos=mod.global_infos)

    return deduplicate


def relax_pipeline(target: Target, database_dir: Path | None):
    import tvm
    from tvm import relax

    backend = relax.backend.cuda.pipeline if target.kind == "cuda" else relax.backend.cpu_generic.pipeline
    tvm_target = target.tvm()
    # Applied from the scope (the database the build's check parsed already), not parsed again from its files.
    database = None
    if database_dir is not None and (Path(database_dir) / RECORDS_FILE).exists():
        database = load_database(Path(database_dir))

    @tvm.transform.module_pass(opt_level=0, name="fxopt_pipeline")
    def pipeline(mod, _ctx):
        # The target: some passes read it from the context when constructed.
        with tvm_target, database if database is not None else contextlib.nullcontext():
            passes = fusion_passes()
            if database is not None:
                passes.append(relax.transform.MetaScheduleApplyDatabase())
            from tvm.s_tir import dlight as dl

            if target.kind == "cuda":
                rules = (dl.gpu.Matmul(), dl.gpu.GEMV(), dl.gpu.Reduction(), dl.gpu.GeneralReduction())
                passes.append(dl.ApplyDefaultSchedule(*map(_declining_on_error, rules), dl.gpu.Fallback()))
            else:
                rules = (_lane_sums_vectorized(dl.cpu.Reduction()), cpu_injective())
                passes.append(dl.ApplyDefaultSchedule(*map(_declining_on_error, rules)))
            passes += backend.dataflow_lower_passes(tvm_target) + backend.finalize_passes(tvm_target)
            return tvm.transform.Sequential(passes)(mod)

    return pipeline


def cpu_injective():
    """DLight rule for elementwise and data-movement kernels on CPUs: producers inlined into the outputs, each
    output's loops fused, split into a parallel loop over cores and a vectorized inner loop of one register's lanes."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.target.codegen import llvm_get_vector_width

    @dl.ScheduleRule.from_callable("fxopt-cpu-injective")
    def injective(func, target, _tunable):
        if target.kind.name != "llvm":
            return None
        sch = s_tir.Schedule(func)
        blocks = dl.normalize_prim_func(sch)
        # A reduction over unit loops (a 1x1 convolution of one channel) counts as injective to DLight, but its
        # init would be inlined away: computed wrongly before this check (tests/property/test_equivalence.py).
        if blocks is None or not all(b.is_injective() and sch.get(b.block_rv).init is None for b in blocks):
            return None
        # What is left after inlining writes the outputs (a split writes several), each in its own loop nest.
        blocks = dl.try_inline(sch, blocks)
        for block in blocks:
            loops = sch.get_loops(block.block_rv)
            if not loops:
                return None
            fused = sch.fuse(*loops)
            extent = sch.get(fused).extent
            write = sch.get(block.block_rv).writes[0].source
            lanes = max(2, max(llvm_get_vector_width(target), 128) // write.dtype.bits)
            if isinstance(extent, tirx.IntImm) and extent.value % lanes == 0 and extent.value > lanes:
                outer, inner = sch.split(fused, [None, lanes])
                sch.parallel(outer)
                sch.vectorize(inner)
            else:
                sch.parallel(fused)
        return sch

    return injective


#: Suffix of the blocks that sum a row in interleaved partial sums, one per vector lane (fxopt.codegen.lower's
#: layer norm): their lane loop goes innermost and is vectorized.
LANE_SUMS = "_lanes"


def _lane_sums_vectorized(rule):
    """DLight's CPU reduction rule, then each partial-sums block's lane loop moved inside its reduction loops and
    vectorized: the sums advance together in one register (DLight leaves the lanes outermost, one serial chain
    of adds after another)."""
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl

    @dl.ScheduleRule.from_callable(f"lane-sums-{type(rule).__name__}")
    def vectorized(func, target, tunable):
        blocks = dl.normalize_prim_func(s_tir.Schedule(func)) if isinstance(func, tirx.PrimFunc) else None
        sch = rule.apply(func, target, tunable)
        if sch is None or isinstance(sch, list) or blocks is None:
            return sch
        for name in [b.name for b in blocks if b.name.endswith(LANE_SUMS)]:
            block = sch.get_sblock(name)
            *_, lane, chunk, chunk_inner = sch.get_loops(block)
            sch.reorder(chunk, chunk_inner, lane)
            sch.vectorize(lane)
            sch.set_scope(block, 0, "local")  # one row's sums: a register, not a store and reload per step
        return sch

    return vectorized


def _declining_on_error(rule):
    """A DLight rule that declines a kernel it fails on, so the next rule schedules it.

    TVM 0.27's GPU ``Matmul`` rule claims MobileNetV2's fused conv + clip kernels and then asserts
    ("consumers of the cache-write stage that are not properly inlined"), failing the whole build.
    """
    from tvm.s_tir import dlight as dl

    @dl.ScheduleRule.from_callable(f"declining-{type(rule).__name__}")
    def declining(func, target, tunable):
        try:
            return rule.apply(func, target, tunable)
        except Exception:  # the rule's own assertion: not applicable after all
            return None

    return declining


def scratch_on_stack():
    """PrimFunc pass: on CPUs, each constant-size thread-private buffer (scope ``"local"``: a register tile's
    accumulators, the values its epilogue keeps) up to :data:`STACK_SCRATCH_BYTES` allocated on the stack.

    TVM 0.27 lowers every allocation but small ``"global"`` ones to a ``TVMBackendAllocWorkspace`` /
    ``TVMBackendFreeWorkspace`` call pair where it is declared: a register tile's, declared in its task's loop,
    cost two runtime calls per tile and kept the accumulators in memory (LLVM cannot promote a workspace to
    registers). On a stack slot LLVM keeps them in registers: a 16 -> 96 channel 1x1 convolution on 112 x 112
    pixels ran 2.2x faster here.
    """
    import tvm_ffi
    from tvm import tirx

    def on_stack(alloc):
        buffer = alloc.buffer
        if buffer.scope() != "local" or not all(isinstance(extent, tirx.IntImm) for extent in buffer.shape):
            return alloc
        if buffer.dtype.itemsize * math.prod(int(extent) for extent in buffer.shape) > STACK_SCRATCH_BYTES:
            return alloc  # itemsize: of all the dtype's lanes
        return tirx.AllocBuffer(buffer, {**alloc.annotations, "disable_lower_builtin": tirx.IntImm("bool", 1)})

    def transform(func, _mod, _ctx):
        target = func.attrs.get("target") if func.attrs else None
        if target is None or target.kind.name != "llvm":
            return func
        return func.with_body(tvm_ffi.structural_map(func.body, (tirx.AllocBuffer, on_stack), order="post"))

    return tirx.transform.prim_func_pass(transform, opt_level=0, name="fxopt_scratch_on_stack")


def keeping_wide_indices(lowering):
    """Module pass: TVM's TIR ``lowering``, except that kernels marked :data:`WIDE_INDICES_ATTR` are lowered without
    its ``NarrowDataType(32)`` (a pass over every function, so they are lowered as a module of their own)."""
    import tvm

    @tvm.transform.module_pass(opt_level=0, name="fxopt_lowering_keeping_wide_indices")
    def lower(mod, ctx):
        wide = {gv for gv, func in mod.functions.items() if func.attrs and func.attrs.get(WIDE_INDICES_ATTR)}
        if not wide:
            return lowering(mod)
        lowered = lowering(tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv not in wide}, attrs=mod.attrs))
        narrowing_disabled = tvm.transform.PassContext(
            opt_level=ctx.opt_level,
            required_pass=list(ctx.required_pass),
            disabled_pass=[*ctx.disabled_pass, "tirx.NarrowDataType"],
            instruments=list(ctx.instruments),
            config=dict(ctx.config),
        )
        with narrowing_disabled:
            lowered.update(lowering(tvm.IRModule({gv: mod[gv] for gv in wide}, attrs=mod.attrs)))
        return lowered

    return lower


def register_tir_pipeline() -> str:
    """Register :data:`TIR_PIPELINE` with TVM (once per process: builder workers register it too); returns its
    name, for ``tvm.compile(..., tir_pipeline=...)``."""
    import tvm
    from tvm.tirx import compilation_pipeline

    def pipeline():
        lowering, host_passes, device_passes = compilation_pipeline.get_tir_pipeline("s_tir")
        return (
            tvm.transform.Sequential([keeping_wide_indices(lowering), scratch_on_stack()]),
            host_passes,
            device_passes,
        )

    compilation_pipeline.PIPELINE_MAP.setdefault(TIR_PIPELINE, pipeline)
    return TIR_PIPELINE


def compile_kernel(mod, tvm_target):
    """Build an ``IRModule`` of scheduled kernels (PrimFuncs) for ``tvm_target`` (a ``tvm.target.Target``) as
    :func:`compile_module` lowers them."""
    import tvm

    return tvm.compile(mod, target=tvm_target, tir_pipeline=register_tir_pipeline())


def compile_module(mod, target: Target, database_dir: Path | None = None):
    """Build a Relax ``IRModule`` into a ``tvm.runtime.Executable`` for ``target``."""
    import tvm
    from tvm import relax

    try:
        with tvm.transform.PassContext(opt_level=3), native_stderr_to_debug("tvm"):
            return relax.build(
                mod,
                target.tvm(),
                relax_pipeline=relax_pipeline(target, database_dir),
                tir_pipeline=register_tir_pipeline(),
            )
    except Exception as exc:  # a TVM bug or gap, raised from C++ as any exception type
        raise CodegenError(f"TVM failed to build for target '{target}': {first_line(exc)}") from exc


def kernel_source(executable, fmt: str | None = None) -> str:
    """The generated kernels: CUDA C of CUDA modules (``fmt=None`` or ``"cu"``); else the LLVM host/CPU code as
    LLVM IR (``fmt=None`` or ``"ll"``) or assembly (``"asm"``)."""
    modules = list(_library_modules(executable.mod))
    cuda = [m.inspect_source("") for m in modules if m.kind == "cuda"]
    if cuda and fmt in (None, "cu"):
        return "\n".join(cuda)
    if fmt not in (None, "ll", "asm"):
        raise CodegenError(f"kernel source format '{fmt}': use 'cu' (CUDA targets), 'll' or 'asm'")
    llvm = [m.inspect_source(fmt or "ll") for m in modules if m.kind == "llvm"]
    if not llvm:
        raise CodegenError("the built module holds no kernel source to show")
    return "\n".join(llvm)


def _library_modules(module):
    yield module
    for child in module.imports:
        yield from _library_modules(child)
