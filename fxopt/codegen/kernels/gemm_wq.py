"""Weight-only quantized GEMM (``linear_wq``: float activations, 8- or 4-bit weights in groups along K) on x86 and
AArch64: the float32 GEMM's tiles (:mod:`.gemm_f32`) with each weight vector dequantized in registers.

The integer weights stay integers in the library (a quarter or an eighth of the float32 bytes) and are read as
such: packed at build time into the float GEMM's panels, ``[N/panel, K, panel]`` int8 (8 bits) or
``[N/panel, K/2, panel]`` uint8 (4 bits: two neighbouring inputs a byte, the even one in the low nibble, as the
reference packs them: a step of K reads one byte per output channel and shifts them all alike), their group's
zero points and scales ``[N/panel, K/group, panel]``. In the tile each weight vector is
``(q - zero_point) * scale`` as the reference computes it (so the float weights are the reference's, bit for
bit), then multiplied into the accumulators as the float kernel's are: one conversion, subtraction and
multiplication per weight vector for the tile's ``rows`` FMAs, the reduction split by groups so a group's
zero points and scales are loaded once per group. Decode (one row) reads a quarter or an eighth of a float
GEMV's bytes; prefill (rows of a tile) pays the conversions once per tile of rows.

Workload: ``(rows, in_features, out_features, group_size, bits)``.
"""

from __future__ import annotations

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, Workload
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32, GemmF32Config, biased_with_epilogue, panel_tiles

__all__ = ["GemmWq", "GEMM_WQ"]


class GemmWq(KernelFamily[GemmF32Config]):
    """``out[m, n] = epilogue(sum_k x[m, k] * (q[n, k] - zp[n, k / g]) * scale[n, k / g] + bias[n])``, float32
    sums; the float32 GEMM's configs."""

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

        def dequantized(panel, k, lane):
            if bits == 4:  # the even input's nibble low, the odd one's high
                byte = packed[panel, k // 2, lane].astype("int32")
                q = tirx.bitwise_and(tirx.shift_right(byte, (k % 2) * 4), 15)
            else:
                q = packed[panel, k, lane]
            group = k // group_size
            return (q.astype("float32") - zero_point[panel, group, lane]) * scale[panel, group, lane]

        weight = te.compute((panels, in_features, width), dequantized, name="weight")
        k = te.reduce_axis((0, in_features), "k")
        acc = te.compute(
            (rows, panels, width), lambda m, p, lane: te.sum(x[m, k] * weight[p, k, lane], axis=k), name="acc"
        )
        operands, out = biased_with_epilogue(acc, bias, variant, out_features)
        func = te.create_prim_func([x, packed, scale, zero_point, bias, *operands, out])
        return self.tagged(panel_tiles(func, rows, config, group_size), workload)


GEMM_WQ = GemmWq()
