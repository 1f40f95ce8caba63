"""Weight-only quantized GEMM (``linear_wq``: float activations, 8- or 4-bit weights in groups along K) on x86 and
AArch64: the float32 GEMM's tiles (:mod:`.gemm_f32`) on the integer weights, scaled once per group.

The integer weights stay integers in the library (a quarter or an eighth of the float32 bytes) and are read as
such: packed at build time into the float GEMM's panels, ``[N/panel, K, panel]`` int8 (8 bits) or
``[N/panel, K/2, panel]`` uint8 (4 bits: two neighbouring inputs a byte, the even one in the low nibble, as the
reference packs them: a step of K reads one byte per output channel and shifts them all alike), their group's
zero points and scales ``[N/panel, K/group, panel]``. The reference's sum regrouped,
``sum_g scale * (sum_k x * q - zero_point * sum_k x)`` over the groups ``g`` and their inputs ``k``: each group's
``x * q`` summed in a register tile of its own (one conversion per weight vector for the tile's ``rows`` FMAs),
then its zero point and scale applied to the tile once (each row's sums per group, ``sum_k x``, computed once per
call). The same value as the reference within float32 rounding, not bit for bit. Dequantizing each weight
vector instead (a conversion, a subtraction and a multiplication) bounded decode: regrouped it runs 1.3-1.5x
faster (4096 x 4096, 4096 x 11008; 2.6-3.8x on 384 x 1536, whose weights sit in L2; Zen 4). Decode (one row)
reads a quarter or an eighth of a float GEMV's bytes. Rows of :data:`PANEL_ONCE_ROWS` tiles or more (prefill)
would convert every weight once per row tile: there each task dequantizes its group of panels once, as the
reference does (the same float weights), and runs the float32 GEMM's loop over them for every row tile.

Workload: ``(rows, in_features, out_features, group_size, bits)``.
"""

from __future__ import annotations

import functools

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, Workload
from fxopt.codegen.kernels.gemm_f32 import (
    GEMM_F32,
    GemmF32Config,
    biased_with_epilogue,
    panel_sums,
    panel_tiles,
)

__all__ = ["GemmWq", "GEMM_WQ", "PANEL_ONCE_ROWS"]

#: Row tiles from which each task dequantizes its weight panels once (the float GEMM's loop then runs over them)
#: rather than summing each group's integer products per row tile.
PANEL_ONCE_ROWS = 2


class GemmWq(KernelFamily[GemmF32Config]):
    """``out[m, n] = epilogue(sum_k x[m, k] * (q[n, k] - zp[n, k / g]) * scale[n, k / g] + bias[n])``, float32
    sums (regrouped by groups); the float32 GEMM's configs."""

    name = "gemm_wq"
    config_type = GemmF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """Where the float32 GEMM applies, for 8- or 4-bit weights in groups that divide the input features (of
        pairs of inputs, for 4 bits)."""
        rows, in_features, out_features, group_size, bits = workload
        whole = in_features % group_size == 0 and (bits == 8 or group_size % 2 == 0)
        return bits in (4, 8) and whole and GEMM_F32.applies(workload[:3], isa)

    def space(self, workload: Workload, isa: Isa) -> list[GemmF32Config]:
        return GEMM_F32.space(workload[:3], isa)

    def default(self, workload: Workload, isa: Isa) -> GemmF32Config:
        return GEMM_F32.default(workload[:3], isa)

    @staticmethod
    def pack(
        q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, config: GemmF32Config, bits: int
    ) -> list[torch.Tensor]:
        """``q`` ``[N, K]`` (0..15 for 4 bits, unpacked) and ``scale``/``zero_point`` ``[N, K/g]`` → the packed
        weight, scales and zero points (the last panel's channels past ``N``: zero weights, unit scales)."""
        width = config.tile.panel
        out_features, in_features = q.shape
        panels = -(-out_features // width)
        pad = panels * width - out_features

        def panelled(t: torch.Tensor, value: float) -> torch.Tensor:
            padded = torch.nn.functional.pad(t, (0, 0, 0, pad), value=value)
            return padded.reshape(panels, width, t.shape[1]).permute(0, 2, 1).contiguous()

        weights = panelled(q.to(torch.int16), 0)
        if bits == 4:
            weights = (weights[:, 0::2] | (weights[:, 1::2] << 4)).to(torch.uint8)
        else:
            weights = weights.to(torch.int8)
        return [weights, panelled(scale.float(), 1.0), panelled(zero_point.float(), 0.0)]

    def build(self, workload: Workload, config: GemmF32Config, variant=None):
        """Parameters, in order: ``x`` ``[rows, in]``; the packed weights, scales and zero points (:meth:`pack`);
        ``bias`` ``[out]``; the epilogue's operands; the result ``[rows, out]``. ``variant``: the epilogue, or
        None."""
        from tvm import te, tirx

        rows, in_features, out_features, group_size, bits = workload
        width = config.tile.panel
        panels, groups = -(-out_features // width), in_features // group_size
        x = te.placeholder((rows, in_features), "float32", name="x")
        if bits == 4:
            packed = te.placeholder((panels, in_features // 2, width), "uint8", name="packed")
        else:
            packed = te.placeholder((panels, in_features, width), "int8", name="packed")
        scale = te.placeholder((panels, groups, width), "float32", name="scale")
        zero_point = te.placeholder((panels, groups, width), "float32", name="zero_point")
        bias = te.placeholder((out_features,), "float32", name="bias")

        def level(panel, k, lane):
            if bits == 4:  # the even input's nibble low, the odd one's high
                byte = packed[panel, k // 2, lane].astype("int32")
                return tirx.bitwise_and(tirx.shift_right(byte, (k % 2) * 4), 15).astype("float32")
            return packed[panel, k, lane].astype("float32")

        levels = te.compute((panels, in_features, width), level, name="levels")
        if rows >= PANEL_ONCE_ROWS * config.tile.rows:
            # Rows of several tiles (prefill): each task dequantizes its panels once, as the reference does, and
            # runs the float32 GEMM's tiles over them.
            weight = te.compute(
                levels.shape,
                lambda p, k, lane: (
                    (levels[p, k, lane] - zero_point[p, k // group_size, lane]) * scale[p, k // group_size, lane]
                ),
                name="weight",
            )
            acc = panel_sums(x, weight, config)
            schedule = functools.partial(panel_tiles, per_task="weight")
        else:
            within = te.reduce_axis((0, group_size), "within")
            row_sums = te.compute(
                (rows, groups), lambda m, g: te.sum(x[m, g * group_size + within], axis=within), name="row_sums"
            )
            within = te.reduce_axis((0, group_size), "within")
            sums = te.compute(
                (rows, panels, groups, width),
                lambda m, p, g, lane: te.sum(
                    x[m, g * group_size + within] * levels[p, g * group_size + within, lane], axis=within
                ),
                name="sums",
            )
            g = te.reduce_axis((0, groups), "g")
            acc = te.compute(
                (rows, panels, width),
                lambda m, p, lane: te.sum(
                    (sums[m, p, g, lane] - zero_point[p, g, lane] * row_sums[m, g]) * scale[p, g, lane], axis=g
                ),
                name="acc",
            )
            schedule = functools.partial(panel_tiles, per_step=("row_sums", "sums"))
        operands, out = biased_with_epilogue(acc, bias, variant, (rows, out_features))
        func = te.create_prim_func([x, packed, scale, zero_point, bias, *operands, out])
        return self.tagged(schedule(func, rows, config), workload)


GEMM_WQ = GemmWq()
