"""Hand-scheduled CPU kernels (x86; the float32 GEMM also NEON), for what TVM's generic schedules and tensor
intrinsics leave slow.

**int8 linear on AVX2** (:func:`int8_linear`). TVM's x86 int8 intrinsics need
VNNI or AVX-512; on an AVX2 CPU an untuned int8 matmul runs as scalar-ish
loops, 30x slower than PyTorch's float GEMM. The fast AVX2 instruction,
``vpmaddubsw``, saturates its int16 pair sums on full-range int8 data (the
reason PyTorch's x86 backends quantize activations to 7 bits), so this kernel
uses ``vpmaddwd`` instead: weights are packed at build time as int16 pairs
``[N/8, K/2, 8, 2]``, each step multiplies one broadcast pair of sign-extended
activations by 8 output channels' pairs and adds exactly into int32 (activations
are sign-extended once per call: widening inside the tiles cost 40%). Measured here
(2-core Zen 3, MiniLM's 128x384x1536, 128x1536x384, 128x384x1152) it runs 1.2-1.7x
faster than PyTorch's MKL float GEMM, and it is exact. A tile (4 rows x 16 outputs)
keeps its 8 accumulators in registers; the epilogue (zero-point correction, scales, bias) runs on the tile
while it is hot, so the int32 result never reaches memory.

**float32 linear on AVX2, AVX-512 and AArch64 NEON** (:func:`dense_f32`; NEON in cross builds, not run here).
The weight is packed at build time into panels of output channels (``[N/panel, K, panel]``, the last panel
zero-padded); a register tile (:class:`DenseTile`, chosen per ISA by :func:`dense_tile`: 4 rows x 3 ymm vectors
on AVX2, 8 x 3 zmm on AVX-512, 8 x 3 q registers on NEON) keeps its accumulators in registers beside the
panel's weight vectors and one broadcast activation, one FMA per accumulator per step of K;
tiles run on every core, groups of panels outermost so their weights stay in L2 while the rows stream past them
(:func:`default_panels_per_task`: as many as fit in half of the host's L2); the bias and the elementwise ops after
the GEMM (a GELU, a residual add: :mod:`fxopt.codegen.epilogue`) are applied on the tile. Tuning times the other
tiles (:data:`DENSE_TILES`) and panel groups per GEMM shape (:mod:`fxopt.codegen.templates`). Measured here
(2-core Zen 3, BERT-base's 128x768x{768,3072}, 128x3072x768; 2 threads,
``benchmarks/gemm.py``) it runs 1.2-1.4x faster than PyTorch's MKL, 78-93% of the cores' measured FMA peak
(depending on what else shares the machine).

**float32 attention on AVX2** (:func:`attention_f32`). TVM's generic lowering of ``scaled_dot_product_attention``
(two batched matmuls and a softmax, each a naive loop nest) took 36 ms on one BERT-base layer's heads, 50x
PyTorch. This kernel computes a tile of query rows start to end on one core: the scores of the tile against every
key (a rows x 16 register tile over K transposed once per call, so keys run along vector lanes), the additive
mask, the row maximum, ``exp`` as a polynomial (LLVM makes ``expf`` a scalar libm call), the row sums and the
probabilities times V (the same register tile), so the scores never leave L1. Measured here (2-core Zen 3, BERT's
12 heads x 128 x 64) it runs at PyTorch's speed, 0.5 ms. It can read Q, K and V through the layout ops that cut
them out of a fused projection (:mod:`fxopt.codegen.layout`) and write its result with the heads merged.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from fxopt.codegen.epilogue import KEPT
from fxopt.codegen.isa import Isa

__all__ = [
    "pack_int8_weight",
    "int8_linear",
    "DenseTile",
    "AVX2_TILE",
    "AVX512_TILE",
    "dense_tile",
    "has_dense_f32",
    "NEON_TILE",
    "default_panels_per_task",
    "DENSE_TILES",
    "TEMPLATE_ATTR",
    "dense_template_name",
    "pack_dense_weight",
    "dense_f32",
    "attention_f32",
]

_INTRINSIC = "fxopt_avx2_dot_8x2_i16"
_LANES = 8  # int32 lanes of a 256-bit register: output channels per intrinsic call


def pack_int8_weight(weight: torch.Tensor) -> torch.Tensor:
    """``[N, K]`` int8 → ``[N/8, K/2, 8, 2]`` int16: for each 8 output channels, their input pairs side by side."""
    out_features, in_features = weight.shape
    pairs = weight.to(torch.int16).reshape(out_features // _LANES, _LANES, in_features // 2, 2)
    return pairs.permute(0, 2, 1, 3).contiguous()


@functools.cache
def _register_intrinsic() -> str:
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def description(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), "int16", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            for i in T.serial(0, 8):
                for k in T.serial(0, 2):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        c[vi] = c[vi] + T.cast(a[vk], "int32") * T.cast(b[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def implementation(
        a: T.Buffer((2,), "int16", offset_factor=1),
        b: T.Buffer((8, 2), "int16", offset_factor=1),
        c: T.Buffer((8,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(c[0:8], a[0:2], b[0:8, 0:2])
            T.writes(c[0:8])
            pair = T.reinterpret(a.vload([0], "int16x2"), dtype="int32")
            c[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"),
                T.reinterpret(T.broadcast(pair, 8), dtype="int16x16"),
                b.vload([0, 0], dtype="int16x16"),
                dtype="int32x8",
            )

    TensorIntrin.register(_INTRINSIC, description, implementation)
    return _INTRINSIC


def int8_linear(rows: int, in_features: int, out_features: int, per_row_activation: bool, per_channel_weight: bool):
    """The scheduled PrimFunc ``out[m, n] = (acc[m, n] - zp * colsum[n]) * (x_scale * w_scale) + bias[n]``.

    Parameters, in order: ``xq`` int8 ``[rows, in]``; the packed weight (:func:`pack_int8_weight`);
    ``colsum`` int32 ``[out]`` (each output channel's weight sum); ``zero_point`` int32 and ``x_scale``
    float32, ``[rows]`` or ``[1]``; ``w_scale`` float32 ``[out]`` or ``[1]``; ``bias`` float32 ``[out]``;
    the result float32 ``[rows, out]``. Needs ``in_features`` even and ``out_features`` a multiple of 8.
    """
    from tvm import s_tir, te

    activations = rows if per_row_activation else 1
    xq = te.placeholder((rows, in_features), "int8", name="xq")
    packed = te.placeholder((out_features // _LANES, in_features // 2, _LANES, 2), "int16", name="packed")
    colsum = te.placeholder((out_features,), "int32", name="colsum")
    zero_point = te.placeholder((activations,), "int32", name="zero_point")
    x_scale = te.placeholder((activations,), "float32", name="x_scale")
    w_scale = te.placeholder((out_features if per_channel_weight else 1,), "float32", name="w_scale")
    bias = te.placeholder((out_features,), "float32", name="bias")
    # Sign-extended once per call (the tiles read each row N/16 times; widening there costs 40%).
    wide = te.compute(xq.shape, lambda m, k: xq[m, k].astype("int16"), name="wide")
    pair = te.reduce_axis((0, in_features // 2), "pair")
    half = te.reduce_axis((0, 2), "half")
    acc = te.compute(
        (rows, out_features // _LANES, _LANES),
        lambda m, block, lane: te.sum(
            wide[m, pair * 2 + half].astype("int32") * packed[block, pair, lane, half].astype("int32"),
            axis=[pair, half],
        ),
        name="acc",
    )

    def row(m):
        return m if per_row_activation else 0

    out = te.compute(
        (rows, out_features),
        lambda m, n: (
            (acc[m, n // _LANES, n % _LANES] - zero_point[row(m)] * colsum[n]).astype("float32")
            * (x_scale[row(m)] * w_scale[n if per_channel_weight else 0])
            + bias[n]
        ),
        name="out",
    )
    func = te.create_prim_func([xq, packed, colsum, zero_point, x_scale, w_scale, bias, out])

    tile_rows = next(r for r in (4, 2, 1) if rows % r == 0)
    tile_blocks = 2 if (out_features // _LANES) % 2 == 0 else 1  # 4x2 tile: 8 accumulator registers
    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    m, channel_block, lane, pair_loop, half_loop = sch.get_loops(block)
    m_outer, m_inner = sch.split(m, [None, tile_rows])
    # Output channels outermost: a tile's packed weights (K x 16 int16) stay in L1 while the rows stream by.
    block_outer, block_inner = sch.split(channel_block, [None, tile_blocks])
    sch.reorder(block_outer, m_outer, pair_loop, m_inner, block_inner, lane, half_loop)
    tile = sch.fuse(block_outer, m_outer)
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, tile, preserve_unit_loops=True)  # its last loop, the columns, vectorized
    sch.set_scope(block, 0, "local")
    sch.parallel(tile)
    init = sch.decompose_reduction(block, pair_loop)
    sch.tensorize(lane, _register_intrinsic())
    sch.unroll(m_inner)
    sch.unroll(block_inner)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(epilogue)[-1])
    widen = sch.get_sblock("wide")
    widen_rows, widen_columns = sch.get_loops(widen)
    sch.parallel(widen_rows)
    sch.vectorize(widen_columns)
    return sch.mod["main"].with_attr({"tir.is_scheduled": True, "op_pattern": 8})  # 8: opaque, never fused


#: The PrimFunc attribute naming a template kernel and its shape (``"dense_f32 128x768x3072"``): what tuning
#: times candidates of (:mod:`fxopt.codegen.templates`).
TEMPLATE_ATTR = "fxopt_template"


def dense_template_name(rows: int, in_features: int, out_features: int) -> str:
    """The float32 GEMM template's name at one shape: its kernel's :data:`TEMPLATE_ATTR`, and what tuning
    reports."""
    return f"dense_f32 {rows}x{in_features}x{out_features}"


@dataclass(frozen=True)
class DenseTile:
    """The float32 GEMM's register tile: ``rows`` x ``vectors`` accumulators of ``lanes`` floats each, with the
    panel's ``vectors`` weight vectors and one broadcast activation beside them in registers."""

    rows: int
    vectors: int
    lanes: int

    @property
    def panel(self) -> int:
        """Output channels per packed weight panel: one register tile's columns."""
        return self.vectors * self.lanes


#: AVX2 (16 ymm): 4 x 3 vectors is 12 accumulators + 3 weight vectors + 1 broadcast, 7 loads per 12 FMAs.
#: Measured here (2-core Zen 3, BERT's shapes, 2 threads): 4 x 3 155-185 GFLOP/s, BLIS's 6 x 2 145-160, 2 x 6
#: 125-140, 3 x 4 and 5 x 2 about 70 (their partial last row tile of 128 rows costs half the speed).
AVX2_TILE = DenseTile(rows=4, vectors=3, lanes=8)
#: AVX-512 (32 zmm): 8 x 3 is 24 accumulators + 3 + 1, the same shape at twice the registers (11 loads per 24
#: FMAs). Not measured on an AVX-512 host yet: built, not run, where the host has no AVX-512.
AVX512_TILE = DenseTile(rows=8, vectors=3, lanes=16)
#: AArch64 NEON (32 128-bit v registers): 8 x 3 vectors of 4 is 24 accumulators + 3 + 1, BLIS's 8 x 12 ARMv8
#: SGEMM tile. Cross-built only (no ARM host here): the template is the same, LLVM emits ``fmla`` on ``v`` registers.
NEON_TILE = DenseTile(rows=8, vectors=3, lanes=4)


#: The tiles tuning times per GEMM shape (:mod:`fxopt.codegen.templates`), by lanes: those whose accumulators,
#: weight vectors and broadcast fill the registers. AVX2: 5 x 2 and 3 x 4 lose on 128 rows (a partial last row
#: tile) and win on others (192 rows: MiniLM's 8 x 24 tokens).
DENSE_TILES = {
    4: (NEON_TILE, DenseTile(6, 4, 4), DenseTile(4, 6, 4), DenseTile(12, 2, 4)),
    8: (AVX2_TILE, DenseTile(6, 2, 8), DenseTile(5, 2, 8), DenseTile(3, 4, 8), DenseTile(2, 6, 8)),
    16: (AVX512_TILE, DenseTile(6, 4, 16), DenseTile(4, 6, 16), DenseTile(12, 2, 16)),
}


def attention_tile(isa: Isa) -> DenseTile:
    """The attention kernel's tile of scores and of P·V: 6 query rows x 2 vectors of keys or columns, at
    ``isa``'s float lanes (ymm on AVX2, zmm on AVX-512; a 4 x 3 tile would leave most of a 128-key row's last
    panel empty)."""
    return DenseTile(rows=6, vectors=2, lanes=isa.lanes())


def has_dense_f32(isa: Isa) -> bool:
    """Whether the float32 GEMM template builds for ``isa``: x86 with AVX2 (and FMA), or AArch64 NEON."""
    return isa.avx2 or isa.neon


def dense_tile(isa: Isa) -> DenseTile:
    """The register tile for ``isa``'s widest vectors."""
    if isa.neon:
        return NEON_TILE
    return AVX512_TILE if isa.lanes() >= 16 else AVX2_TILE


def default_panels_per_task(in_features: int, tile: DenseTile, l2_bytes: int) -> int:
    """How many weight panels one task of the GEMM runs its row tile over: as many as fit in half of a core's L2
    (the other half holds the activations), at most 3. Measured here (2-core Zen 3, 512 KiB L2, K=768: three
    74 KiB panels): GPT-2's LM head (128x768x50257) 8-10% faster than one panel per task, 128x768x3072 4-5%,
    768x768 3%, 768x2304 the same; at K=3072 (295 KiB panels) two per task were 2-4% slower. ``l2_bytes``: a
    core's L2 (:attr:`Isa.l2_bytes <fxopt.codegen.isa.Isa.l2_bytes>`)."""
    panel_bytes = in_features * tile.panel * 4
    return max(1, min(3, l2_bytes // 2 // panel_bytes))


def pack_dense_weight(weight: torch.Tensor, panel: int) -> torch.Tensor:
    """``[N, K]`` float32 → ``[ceil(N/panel), K, panel]``: each panel's output channels side by side along K (the
    last panel zero-padded), so the micro-kernel reads one contiguous row of the panel per step of K."""
    out_features, in_features = weight.shape
    panels = -(-out_features // panel)
    padded = torch.nn.functional.pad(weight.float(), (0, 0, 0, panels * panel - out_features))
    return padded.reshape(panels, panel, in_features).permute(0, 2, 1).contiguous()


def dense_f32(rows: int, in_features: int, out_features: int, tile: DenseTile, panels_per_task: int, epilogue=None):
    """The scheduled PrimFunc ``out[m, n] = act(sum_k x[m, k] * w[n, k] + bias[n])`` (``linear``), float32.

    Parameters, in order: ``x`` ``[rows, in]``; the packed weight (:func:`pack_dense_weight` by ``tile.panel``:
    whole panels, the last one zero-padded); ``bias`` ``[out]``; the epilogue's operands; the result
    ``[rows, out]``. ``epilogue``: elementwise ops applied on the tile while it is in registers instead of passes
    of their own over the result (:class:`fxopt.codegen.epilogue.Epilogue`: its ``operand_shapes``, and called
    with the TE result and operand placeholders it gives the TE value to write).
    ``tile``: the register tile (:func:`dense_tile` for an ISA). ``panels_per_task``: how many weight panels one
    task runs its row tile over (:func:`default_panels_per_task`).
    """
    from tvm import s_tir, te

    width = tile.panel
    panels = -(-out_features // width)
    x = te.placeholder((rows, in_features), "float32", name="x")
    packed = te.placeholder((panels, in_features, width), "float32", name="packed")
    bias = te.placeholder((out_features,), "float32", name="bias")
    k = te.reduce_axis((0, in_features), "k")
    acc = te.compute(
        (rows, panels, width),
        lambda m, panel, lane: te.sum(x[m, k] * packed[panel, k, lane], axis=k),
        name="acc",
    )
    linear = te.compute((rows, out_features), lambda m, n: acc[m, n // width, n % width] + bias[n], name="linear")
    shapes = epilogue.operand_shapes if epilogue else []
    operands = [te.placeholder(shape, "float32", name=f"operand_{i}") for i, shape in enumerate(shapes)]
    result = epilogue(linear, operands) if epilogue else linear
    out = te.compute(linear.shape, lambda m, n: result[m, n], name="out")
    func = te.create_prim_func([x, packed, bias, *operands, out])

    sch = s_tir.Schedule(func)
    block = sch.get_sblock("acc")
    m, panel, lane, k_loop = sch.get_loops(block)
    m_outer, m_inner = sch.split(m, [None, min(tile.rows, rows)])  # a partial last tile is predicated
    vector, lane_inner = sch.split(lane, [None, tile.lanes])
    # Groups of panels outermost: their weights (K x width floats each) stay in L2 while every row tile streams
    # past them, and each task runs its row tile over the group's panels in turn (the tile's activations stay in
    # L1, its output rows are written group-wide). A partial last group is predicated.
    group, panel = sch.split(panel, [None, panels_per_task])
    sch.reorder(group, m_outer, panel, k_loop, m_inner, vector, lane_inner)
    fused = sch.fuse(group, m_outer)
    kept = []  # values the epilogue reads more than once: computed once per tile, in registers
    for stage in sch.get_child_blocks(sch.get_sblock("root")):  # the bias and the epilogue, into the tile
        name = sch.get(stage).name_hint
        if name.startswith(KEPT):
            kept.append(stage)
        elif name not in ("acc", "out"):
            sch.compute_inline(stage)
    for stage in kept:  # in order: each reads the ones before it
        sch.reverse_compute_at(stage, panel, preserve_unit_loops=True)
        sch.set_scope(stage, 0, "local")
        sch.vectorize(sch.get_loops(stage)[-1])
    epilogue = sch.get_sblock("out")
    sch.reverse_compute_at(epilogue, panel, preserve_unit_loops=True)  # its last loop, the columns, vectorized
    sch.set_scope(block, 0, "local")
    sch.parallel(fused)
    sch.unroll(m_inner)
    sch.unroll(vector)
    sch.vectorize(lane_inner)
    init = sch.decompose_reduction(block, k_loop)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.vectorize(sch.get_loops(epilogue)[-1])
    return sch.mod["main"].with_attrs(
        {
            "tir.is_scheduled": True,
            "op_pattern": 8,  # opaque, never fused
            TEMPLATE_ATTR: dense_template_name(rows, in_features, out_features),
        }
    )


def attention_f32(
    batch: int,
    heads: int,
    length: int,
    source: int,
    dim: int,
    bias_shape: tuple,
    scale: float,
    isa: Isa,
    gathers: tuple = (None, None, None),
    heads_inside: bool = False,
):
    """The scheduled PrimFunc ``out = softmax(q @ k.T * scale + bias) @ v`` per batch and head, float32, its
    tiles at ``isa``'s vector lanes (:func:`attention_tile`).

    Parameters, in order: ``q`` ``[batch, heads, length, dim]``; ``k`` and ``v`` ``[batch, heads, source, dim]``;
    the additive mask ``bias`` ``[1 or batch, 1 or heads, length, source]`` (``-inf`` where a key is masked out);
    the result ``[batch, heads, length, dim]``. A row whose keys are all masked out gives zeros, as in PyTorch.
    ``gathers``: for q, k and v, None or where the kernel reads it from instead
    (:class:`fxopt.codegen.layout.Gather`: the parameter is then a tensor of its ``shape``, read through its
    ``index`` map). ``heads_inside``: the result laid out ``[batch, length, heads, dim]`` instead, as the
    transpose after attention that merges the heads wants it (which then costs nothing).
    """
    import tvm
    from tvm import s_tir, te, topi

    def read(name: str, rows: int, gather):
        """The kernel's parameter for ``name`` and the tensor the kernel reads as it."""
        shape = (batch, heads, rows, dim)
        if gather is None:
            placeholder = te.placeholder(shape, "float32", name=name)
            return placeholder, placeholder
        placeholder = te.placeholder(gather.shape, "float32", name=f"{name}_source")
        return placeholder, te.compute(shape, lambda *i: placeholder[tuple(gather.index(list(i)))], name=name)

    (q_in, q), (k_in, k), (v_in, v) = (read(*args) for args in zip("qkv", (length, source, source), gathers))
    bias = te.placeholder(bias_shape, "float32", name="bias")
    per_batch, per_head = bias_shape[0] > 1, bias_shape[1] > 1
    keys = te.compute((batch, heads, dim, source), lambda b, h, c, t: k[b, h, t, c], name="keys")
    c = te.reduce_axis((0, dim), "c")
    dot = te.compute(
        (batch, heads, length, source),
        lambda b, h, i, t: te.sum(q[b, h, i, c] * keys[b, h, c, t], axis=c),
        name="dot",
    )
    scores = te.compute(
        dot.shape,
        lambda b, h, i, t: dot[b, h, i, t] * scale + bias[b if per_batch else 0, h if per_head else 0, i, t],
        name="scores",
    )
    # The maximum starts at -inf (te.max's identity is the lowest finite float): a fully masked row stays -inf.
    maximum = te.comm_reducer(lambda x, y: te.max(x, y), lambda dtype: tvm.tirx.const(float("-inf"), dtype))
    tile_shape = attention_tile(isa)
    lanes = tile_shape.lanes
    # Each row's max and sum in one vector's lanes, combined at the end, not a serial chain of `source` dependent
    # ops (a max is 4 cycles on Intel). Measured on AVX2 (12 heads x 128 x 64): the lane sums 1.09-1.11x the kernel
    # at 128 keys, 1.04x at 64, 0.96-0.99x at 24. Whole vectors only: compute_at drops the predicate of a partial one.
    in_lanes = source % lanes == 0 and source >= 64
    if in_lanes:
        # Written out in two stages: TVM's rfactor rejects the custom -inf reducer.
        chunk = te.reduce_axis((0, source // lanes), "chunk")
        top_lanes = te.compute(
            (batch, heads, length, lanes),
            lambda b, h, i, lane: maximum(scores[b, h, i, chunk * lanes + lane], axis=chunk),
            name="top_lanes",
        )
        lane = te.reduce_axis((0, lanes), "lane")
        top = te.compute(
            (batch, heads, length), lambda b, h, i: maximum(top_lanes[b, h, i, lane], axis=lane), name="top"
        )
    else:
        t = te.reduce_axis((0, source), "t")
        top = te.compute((batch, heads, length), lambda b, h, i: maximum(scores[b, h, i, t], axis=t), name="top")
    shifted = te.compute(dot.shape, lambda b, h, i, t: scores[b, h, i, t] - top[b, h, i], name="shifted")
    weights = topi.fast_exp(shifted)
    t = te.reduce_axis((0, source), "t")
    total = te.compute((batch, heads, length), lambda b, h, i: te.sum(weights[b, h, i, t], axis=t), name="total")
    t = te.reduce_axis((0, source), "t")
    mixed = te.compute(q.shape, lambda b, h, i, c: te.sum(weights[b, h, i, t] * v[b, h, t, c], axis=t), name="mixed")
    out = te.compute(
        q.shape,
        lambda b, h, i, c: te.if_then_else(
            top[b, h, i] == float("-inf"), tvm.tirx.const(0.0, "float32"), mixed[b, h, i, c] / total[b, h, i]
        ),
        name="out",
    )
    sch = s_tir.Schedule(te.create_prim_func([q_in, k_in, v_in, bias, out]))
    for name, gather in zip("qkv", gathers):
        if gather is not None:
            sch.compute_inline(sch.get_sblock(name))
    if heads_inside:
        sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda b, h, i, c: (b, i, h, c))

    transpose = sch.get_sblock("keys")
    *outer, keys_inner = sch.get_loops(transpose)
    sch.parallel(sch.fuse(*outer))
    sch.vectorize(keys_inner)

    # One tile of query rows per task; its output in panels of the tile's columns.
    rows = min(tile_shape.rows, length)
    b, h, i, column = sch.get_loops(sch.get_sblock("out"))
    row_tile, row = sch.split(i, [None, rows])
    panel, lane = sch.split(column, [None, tile_shape.panel])
    sch.reorder(row_tile, panel, row, lane)
    tile = sch.fuse(b, h, row_tile)
    sch.parallel(tile)
    sch.vectorize(lane)
    _register_tile(sch, sch.get_sblock("mixed"), panel, lanes)
    if in_lanes:
        *_, key = sch.get_loops(sch.get_sblock("total"))
        sch.rfactor(sch.split(key, [None, lanes])[1], factor_axis=3)
    for name in ("total", "total_rf", "T_fast_exp", "shifted", "top", "top_lanes", "scores"):
        if name.endswith(("_rf", "_lanes")) and not in_lanes:
            continue
        block = sch.get_sblock(name)
        sch.compute_at(block, tile, preserve_unit_loops=True)
        sch.set_scope(block, 0, "local")
    sch.compute_inline(sch.get_sblock("shifted"))
    if in_lanes:
        for name in ("total_rf", "top_lanes"):  # each lane's running value in one register, the lanes innermost
            block = sch.get_sblock(name)
            row, lane, key = _lane_loops(sch, block)
            sch.reorder(row, key, lane)
            sch.vectorize(lane)
            sch.vectorize(sch.get_loops(sch.decompose_reduction(block, key))[-1])
    sch.vectorize(sch.get_loops(sch.get_sblock("T_fast_exp"))[-1])
    # The scores in panels of keys, each the register tile of q against the transposed keys.
    scores_block = sch.get_sblock("scores")
    tile_row, key = sch.get_loops(scores_block)[-2:]
    key_panel, key_lane = sch.split(key, [None, tile_shape.panel])
    sch.reorder(key_panel, tile_row, key_lane)
    sch.vectorize(key_lane)
    _register_tile(sch, sch.get_sblock("dot"), key_panel, lanes)
    return sch.mod["main"].with_attr({"tir.is_scheduled": True, "op_pattern": 8})  # 8: opaque, never fused


def _lane_loops(sch, block) -> tuple:
    """A row-in-lanes block's loops under the tile: the row, the lane and the reduction over chunks of the row
    (rfactor puts its lane loop first)."""
    loops = sch.get_loops(block)
    if sch.get(block).name_hint.endswith("_rf"):
        lane, *_, row, key = loops[-5:]
        return row, lane, key
    return tuple(loops[-3:])


def _register_tile(sch, block, loop, lanes: int) -> None:
    """Compute reduction ``block`` under ``loop`` as a tile of accumulators held in vector registers of
    ``lanes``: the reduction outermost, rows and vectors unrolled inside it."""
    sch.compute_at(block, loop, preserve_unit_loops=True)  # the loops below are then always rows, columns, reduction
    sch.set_scope(block, 0, "local")
    loops = sch.get_loops(block)
    depth = next(n for n, enclosing in enumerate(loops, 1) if sch.get(enclosing).same_as(sch.get(loop)))
    *tile_loops, reduction = loops[depth:]
    vector, lane = sch.split(tile_loops[-1], [None, lanes])
    sch.reorder(reduction, *tile_loops[:-1], vector, lane)
    for unrolled in (*tile_loops[:-1], vector):
        sch.unroll(unrolled)
    sch.vectorize(lane)
    init = sch.decompose_reduction(block, reduction)
    sch.vectorize(sch.get_loops(init)[-1])
