"""float32 attention (``scaled_dot_product_attention``) on x86 with AVX2 or AVX-512.

TVM's generic lowering (two batched matmuls and a softmax, each a naive loop nest) took 36 ms on one BERT-base
layer's heads, 50x PyTorch. This kernel computes a tile of query rows start to end on one core: the scores of the
tile against every key (a register tile over K transposed once per call, so keys run along vector lanes), the
additive mask, the row maximum and sum in vector lanes, ``exp`` as a polynomial (LLVM makes ``expf`` a scalar libm
call), and the probabilities times V (the same register tile), so the scores never leave L1. Measured here
(2-core Zen 3, BERT's 12 heads x 128 x 64) it runs 1.4x faster than PyTorch, 0.44 ms. It can read Q, K and V
through the layout ops that cut them out of a fused projection (:mod:`fxopt.codegen.layout`) and write its result
with the heads merged.

The same schedule computes int8 attention (``fxopt::attention_q``, :class:`AttentionInputs` ``quantized``): Q, K
and V turned into their int8 levels once per call, the softmax's weights into 8-bit levels on the tile; every
product and sum is an integer float32 holds exactly (heads of up to 1024 values, 514 keys), so the kernel equals
the reference but where its ``exp`` and PyTorch's round a weight to neighbouring levels. With VNNI (and whole
tiles) Q·Kᵀ is ``vpdpbusd`` dot products: Q's levels shifted into uint8, K's packed in quads of dims per key once
per call, the shift taken back with each key's sum; and where the head's columns are whole panels, P·V too: the
tile's weight levels (0..255) as uint8 in the task's scratch, V's levels packed in quads of keys per column once
per call. BERT's 12 heads x 128 x 64 on Zen 4: float lanes 304 µs, Q·Kᵀ on VNNI 200, both 132; float32 attention
269.

Workload: ``(batch, heads, length, source, dim)``: queries ``length``, keys ``source``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fxopt.codegen.intrinsics.x86 import dot_u8s8_quads, transpose_block
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, RegisterTile, Workload, accumulate_in_registers
from fxopt.quant.ops import WEIGHT_LEVELS

__all__ = ["AttentionF32Config", "AttentionInputs", "AttentionF32", "ATTENTION_F32"]


@dataclass(frozen=True)
class AttentionF32Config:
    """The register tile of scores and of P·V: ``rows`` query rows x ``vectors`` vectors of ``lanes`` keys (or
    output columns); each task computes one tile of query rows."""

    rows: int
    vectors: int
    lanes: int

    @property
    def tile(self) -> RegisterTile:
        return RegisterTile(self.rows, self.vectors, self.lanes)

    def __str__(self) -> str:
        return f"{self.rows}x{self.vectors} tile"


@dataclass(frozen=True)
class AttentionInputs:
    """The kernel's variant: the additive mask's shape ``[1 or batch, 1 or heads, length, source]``, the scale,
    for q, k and v None or where the kernel reads it from instead (:class:`fxopt.codegen.layout.Gather`: the
    parameter is then a tensor of its ``shape``, read through its ``index`` map), and whether the result is laid
    out ``[batch, length, heads, dim]`` (as the transpose after attention that merges the heads wants it, which
    then costs nothing) instead of ``[batch, heads, length, dim]``; and whether it is int8 attention
    (``fxopt::attention_q``: Q, K and V on int8 levels of per-head scales, parameters after the mask; the softmax's
    weights on 8-bit levels; every sum an integer float32 holds exactly)."""

    bias_shape: tuple
    scale: float
    gathers: tuple = (None, None, None)
    heads_inside: bool = False
    quantized: bool = False
    #: int8 attention's Q·Kᵀ (and P·V where the head's columns are whole panels) as VNNI ``vpdpbusd`` dot products
    #: (K's and V's levels packed in quads per call): where the CPU has VNNI and the tile's rows divide the
    #: queries, its panels the keys (whole tiles only).
    vnni: bool = False


#: The tiles tuning times (rows, vectors), those that fit the ISA's registers; the first is the default (a 4 x 3
#: tile would leave most of a 128-key row's last panel empty).
TILES = ((6, 2), (4, 2), (4, 3), (8, 1), (3, 4), (8, 2), (6, 3), (12, 2))


class AttentionF32(KernelFamily[AttentionF32Config]):
    """``out = softmax(q @ k.T * scale + bias) @ v`` per batch and head, float32."""

    name = "attention_f32"
    config_type = AttentionF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """x86 with AVX2 or AVX-512."""
        return isa.avx2

    def space(self, workload: Workload, isa: Isa) -> list[AttentionF32Config]:
        lanes = isa.lanes()
        return [AttentionF32Config(r, v, lanes) for r, v in TILES if RegisterTile(r, v, lanes).fits(isa)]

    def default(self, workload: Workload, isa: Isa) -> AttentionF32Config:
        """6 query rows x 2 vectors at ``isa``'s float lanes (ymm on AVX2, zmm on AVX-512)."""
        rows, vectors = TILES[0]
        return AttentionF32Config(rows, vectors, isa.lanes())

    def build(self, workload: Workload, config: AttentionF32Config, variant: AttentionInputs | None = None):
        """Parameters, in order: ``q`` ``[batch, heads, length, dim]``; ``k`` and ``v`` ``[batch, heads, source,
        dim]``; the additive mask ``bias`` (``-inf`` where a key is masked out); the result. A row whose keys are
        all masked out gives zeros, as in PyTorch. ``variant``: :class:`AttentionInputs`; ``None``: a
        ``[1, 1, length, source]`` mask, the scale ``1/sqrt(dim)``, inputs read as they are."""
        import tvm
        from tvm import s_tir, te, topi

        batch, heads, length, source, dim = workload
        inputs = variant or AttentionInputs((1, 1, length, source), 1 / math.sqrt(dim))

        def read(name: str, rows: int, gather):
            """The kernel's parameter for ``name`` and the tensor the kernel reads as it."""
            shape = (batch, heads, rows, dim)
            if gather is None:
                placeholder = te.placeholder(shape, "float32", name=name)
                return placeholder, placeholder
            placeholder = te.placeholder(gather.shape, "float32", name=f"{name}_source")
            return placeholder, te.compute(shape, lambda *i: placeholder[tuple(gather.index(list(i)))], name=name)

        (q_in, q), (k_in, k), (v_in, v) = (read(*args) for args in zip("qkv", (length, source, source), inputs.gathers))
        bias = te.placeholder(inputs.bias_shape, "float32", name="bias")
        per_batch, per_head = inputs.bias_shape[0] > 1, inputs.bias_shape[1] > 1
        levels = [te.placeholder((heads,), "float32", name=f"{n}_scale") for n in "qkv"] if inputs.quantized else []
        tile_shape = config.tile
        whole = length % min(tile_shape.rows, length) == 0 and source % tile_shape.panel == 0 and dim % 4 == 0
        vnni = inputs.quantized and inputs.vnni and whole
        mix_vnni = vnni and dim % tile_shape.panel == 0  # P·V on whole panels of the output's columns too
        if levels:  # each value's int8 level (as fxopt::quantize rounds), once per call, as a float
            q, k, v = (_levels(t, s, f"{n}_levels") for t, s, n in zip((q, k, v), levels, "qkv"))
        if vnni:  # Q's levels shifted into uint8, K's packed in quads of dims for each key, as vpdpbusd reads them
            q_float, k_float = q, k
            q = te.compute(q.shape, lambda *i: (q_float(*i) + 128.0).astype("uint8"), name="q_bytes")
            k = te.compute(k.shape, lambda *i: k_float(*i).astype("int8"), name="k_bytes")
            keys = te.compute(
                (batch, heads, dim // 4, source, 4), lambda b, h, c4, t, w: k[b, h, t, c4 * 4 + w], name="keys"
            )
            c = te.reduce_axis((0, dim), "c")
            key_sums = te.compute(
                (batch, heads, source), lambda b, h, t: te.sum(k[b, h, t, c].astype("int32"), axis=c), name="key_sums"
            )
            dot = _quad_dots(q, keys, "dot")
        else:
            keys = te.compute((batch, heads, dim, source), lambda b, h, c, t: k[b, h, t, c], name="keys")
            c = te.reduce_axis((0, dim), "c")
            dot = te.compute(
                (batch, heads, length, source),
                lambda b, h, i, t: te.sum(q[b, h, i, c] * keys[b, h, c, t], axis=c),
                name="dot",
            )

        def scaled(b, h, i, t):
            if vnni:  # the shift taken back: sum (q + 128) k - 128 sum k
                exact = (dot[b, h, i, t] - 128 * key_sums[b, h, t]).astype("float32")
                return exact * (levels[0][h] * levels[1][h] * inputs.scale)
            if levels:  # as the reference rounds: (q_scale * k_scale) * scale, then the dot
                return dot[b, h, i, t] * (levels[0][h] * levels[1][h] * inputs.scale)
            return dot[b, h, i, t] * inputs.scale

        scores = te.compute(
            dot.shape,
            lambda b, h, i, t: scaled(b, h, i, t) + bias[b if per_batch else 0, h if per_head else 0, i, t],
            name="scores",
        )
        # The maximum starts at -inf (te.max's identity is the lowest finite float): a fully masked row stays -inf.
        maximum = te.comm_reducer(lambda x, y: te.max(x, y), lambda dtype: tvm.tirx.const(float("-inf"), dtype))
        lanes = tile_shape.lanes
        # Each row's max and sum in one vector's lanes, combined at the end, not a serial chain of `source`
        # dependent ops (a max is 4 cycles on Intel). Measured on AVX2 (12 heads x 128 x 64): the lane sums
        # 1.09-1.11x the kernel at 128 keys, 1.04x at 64, 0.96-0.99x at 24. Whole vectors only: compute_at drops
        # the predicate of a partial one.
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
        if levels:  # exp(s - max) in [0, 1] as 0..255
            exp = weights
            weights = te.compute(
                dot.shape, lambda *i: tvm.tirx.floor(exp(*i) * float(WEIGHT_LEVELS) + 0.5), name="weight_levels"
            )
        t = te.reduce_axis((0, source), "t")
        total = te.compute((batch, heads, length), lambda b, h, i: te.sum(weights[b, h, i, t], axis=t), name="total")
        if mix_vnni:  # the weights' levels as uint8, V's packed in quads of keys for each column
            weight_bytes = te.compute(dot.shape, lambda *i: weights(*i).astype("uint8"), name="weight_bytes")
            values = te.compute(
                (batch, heads, source // 4, dim, 4),
                lambda b, h, t4, c, w: v[b, h, t4 * 4 + w, c].astype("int8"),
                name="values",
            )
            mixed = _quad_dots(weight_bytes, values, "mixed")
        else:
            t = te.reduce_axis((0, source), "t")
            mixed = te.compute(
                q.shape, lambda b, h, i, c: te.sum(weights[b, h, i, t] * v[b, h, t, c], axis=t), name="mixed"
            )

        def mean(b, h, i, c):
            value = mixed[b, h, i, c].astype("float32") / total[b, h, i]
            return value * levels[2][h] if levels else value

        out = te.compute(
            q.shape,
            lambda b, h, i, c: te.if_then_else(
                top[b, h, i] == float("-inf"), tvm.tirx.const(0.0, "float32"), mean(b, h, i, c)
            ),
            name="out",
        )
        sch = s_tir.Schedule(te.create_prim_func([q_in, k_in, v_in, bias, *levels, out]))
        for name, gather in zip("qkv", inputs.gathers):
            if gather is not None:
                sch.compute_inline(sch.get_sblock(name))
        if levels:
            if vnni:
                sch.compute_inline(sch.get_sblock("q_levels"))
                sch.compute_inline(sch.get_sblock("k_levels"))
            if mix_vnni:
                sch.compute_inline(sch.get_sblock("v_levels"))
            for name in (
                ("q_bytes", "k_bytes", "values" if mix_vnni else "v_levels")
                if vnni
                else ("q_levels", "k_levels", "v_levels")
            ):
                *rows, columns = sch.get_loops(sch.get_sblock(name))
                sch.parallel(sch.fuse(*rows[:2]))
                sch.vectorize(columns)
            sch.compute_inline(sch.get_sblock("T_fast_exp"))
        if inputs.heads_inside:
            sch.transform_layout(sch.get_sblock("out"), ("write", 0), lambda b, h, i, c: (b, i, h, c))

        transpose = sch.get_sblock("keys")
        if vnni:
            b, h, *_, quad = sch.get_loops(transpose)
            sch.parallel(sch.fuse(b, h))
            sch.vectorize(quad)  # a key's 4 bytes as one 32-bit move
            b, h, *_ = sch.get_loops(sch.get_sblock("key_sums"))
            sch.parallel(sch.fuse(b, h))
        elif lanes >= 16 and source % lanes == 0 and dim % lanes == 0:
            # In blocks of lanes x lanes: K's rows read as whole vectors, transposed in registers. On AVX-512 only:
            # a column read a float at a time cost ~10% of the kernel on Emerald Rapids, and llvm-mca puts the
            # register transpose at 0.62 cycles per float there against 0.94 (Zen 4: 0.56 against 0.53); on AVX2
            # the column reads measured 2% faster on Zen 3 (BERT's 12 heads x 128 x 64, 1 and 2 threads).
            b, h, c, t = sch.get_loops(transpose)
            c_outer, c_inner = sch.split(c, [None, lanes])
            t_outer, _ = sch.split(t, [None, lanes])
            sch.reorder(c_outer, t_outer, c_inner)
            sch.parallel(sch.fuse(b, h, c_outer))
            k_rows = sch.cache_read(transpose, 0, "local")
            sch.compute_at(k_rows, t_outer)
            sch.vectorize(sch.get_loops(k_rows)[-1])
            sch.tensorize(c_inner, transpose_block(lanes))
        else:
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
        if mix_vnni:  # the weights' tile in the task's scratch (computed under the tile below)
            sch.set_scope(sch.get_sblock("weight_bytes"), 0, "local")
            _register_tile(sch, sch.get_sblock("mixed"), panel, lanes, dot_u8s8_quads(lanes, "local"))
        else:
            _register_tile(sch, sch.get_sblock("mixed"), panel, lanes)
        if in_lanes:
            *_, key = sch.get_loops(sch.get_sblock("total"))
            sch.rfactor(sch.split(key, [None, lanes])[1], factor_axis=3)
        exp_stage = "weight_levels" if levels else "T_fast_exp"
        for name in ("weight_bytes", "total", "total_rf", exp_stage, "shifted", "top", "top_lanes", "scores"):
            if (name.endswith(("_rf", "_lanes")) and not in_lanes) or (name == "weight_bytes" and not mix_vnni):
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
        sch.vectorize(sch.get_loops(sch.get_sblock(exp_stage))[-1])
        if mix_vnni:
            sch.vectorize(sch.get_loops(sch.get_sblock("weight_bytes"))[-1])
        # The scores in panels of keys, each the register tile of q against the transposed keys.
        scores_block = sch.get_sblock("scores")
        tile_row, key = sch.get_loops(scores_block)[-2:]
        key_panel, key_lane = sch.split(key, [None, tile_shape.panel])
        sch.reorder(key_panel, tile_row, key_lane)
        sch.vectorize(key_lane)
        _register_tile(sch, sch.get_sblock("dot"), key_panel, lanes, dot_u8s8_quads(lanes) if vnni else None)
        return self.tagged(sch.mod["main"], workload)


def _levels(x, scale, name: str):
    """``x``'s int8 levels at its head's ``scale`` as ``fxopt::quantize`` rounds them (``floor(x / s + 0.5)``,
    clamped), as floats."""
    from tvm import te, tirx

    def level(b, h, i, c):
        return tirx.max(tirx.min(tirx.floor(x[b, h, i, c] / scale[h] + 0.5), 127.0), -128.0)

    return te.compute(x.shape, level, name=name)


def _lane_loops(sch, block) -> tuple:
    """A row-in-lanes block's loops under the tile: the row, the lane and the reduction over chunks of the row
    (rfactor puts its lane loop first)."""
    loops = sch.get_loops(block)
    if sch.get(block).name_hint.endswith("_rf"):
        lane, *_, row, key = loops[-5:]
        return row, lane, key
    return tuple(loops[-3:])


def _quad_dots(a, packed, name: str):
    """``a`` ``[batch, heads, rows, K]`` (uint8) times ``packed`` ``[batch, heads, K/4, columns, 4]`` (int8: each
    column's values in quads along K), int32 sums as ``vpdpbusd`` computes them: ``[batch, heads, rows, columns]``."""
    from tvm import te

    batch, heads, rows, depth = a.shape
    step, within = te.reduce_axis((0, depth // 4), "step"), te.reduce_axis((0, 4), "within")
    return te.compute(
        (batch, heads, rows, packed.shape[3]),
        lambda b, h, i, j: te.sum(
            a[b, h, i, step * 4 + within].astype("int32") * packed[b, h, step, j, within].astype("int32"),
            axis=[step, within],
        ),
        name=name,
    )


def _register_tile(sch, block, loop, lanes: int, intrinsic: str | None = None) -> None:
    """Compute reduction ``block`` under ``loop`` as a tile of accumulators held in vector registers of
    ``lanes``: the reduction outermost, rows and vectors unrolled inside it. With a dot instruction's ``intrinsic``
    (int32 accumulators of ``vpdpbusd``: the reduction in steps of 4 bytes, each a broadcast quad of a row by
    ``lanes`` columns' quads), tensorized over the lanes and the quad."""
    sch.compute_at(block, loop, preserve_unit_loops=True)  # the loops below are then always rows, columns, reduction
    loops = sch.get_loops(block)
    depth = next(n for n, enclosing in enumerate(loops, 1) if sch.get(enclosing).same_as(sch.get(loop)))
    *tile_loops, reduction = loops[depth:] if intrinsic is None else loops[depth:-1]  # the quad: the intrinsic's
    vector, lane = sch.split(tile_loops[-1], [None, lanes])
    sch.reorder(reduction, *tile_loops[:-1], vector, lane)
    accumulate_in_registers(sch, block, None, (*tile_loops[:-1], vector), lane, reduction, intrinsic)


ATTENTION_F32 = AttentionF32()
