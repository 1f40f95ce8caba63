"""int8 depthwise 2-D convolution (``conv_q`` with a group per channel: MobileNet's) in NCHW[x]c, exact.

The int8 dot instructions sum adjacent channels into one lane, which a depthwise convolution never does (each
output channel reads its own input channel), so this kernel is :mod:`.depthwise_f32`'s on centered values:
``xq - zp`` (|.| <= 255) converted to float32 as each task pads the input rows it reads (in cache, padded with 0:
the zero point, the real 0), times the int8 weights held as floats. Every product is an integer below 2^15 and
a 3x3 or 5x5 window sums fewer than :data:`~fxopt.quant.ops.EXACT_FLOAT32_TERMS` of them, so the float32 sums
are the exact integer sums in any order. Then, on the tile, the scales and bias as the reference applies them,
the float ops after the layer (ReLU6, a residual add) and the next layer's quantization
(:class:`~.conv2d_int8.Conv2dInt8Variant`), so a quantized MobileNet block passes int8 from kernel to kernel.

Workload: :class:`~.conv2d_f32.ConvShape`'s with ``groups == channels == out_channels`` and one block for both;
the results are ``[N, C/x, OH, OW, x]``, float32 or int8.
"""

from __future__ import annotations

import torch

from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.base import KernelFamily, Workload
from fxopt.codegen.kernels.conv2d_f32 import ConvShape, padded_input
from fxopt.codegen.kernels.conv2d_int8 import Conv2dInt8Variant
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32, DepthwiseF32Config, row_tiled, taps_reduced
from fxopt.quant.ops import EXACT_FLOAT32_TERMS

__all__ = ["DepthwiseInt8", "DEPTHWISE_INT8"]


class DepthwiseInt8(KernelFamily[DepthwiseF32Config]):
    """``out[n, c, p] = (sum_{kh, kw} (xq - zp)[n, c, p's tap] * w[c, kh, kw]) * x_scale * w_scale[c] + bias[c]``,
    then the variant's tail, in NCHW[x]c; :mod:`.depthwise_f32`'s tiles and space."""

    name = "depthwise_int8"
    config_type = DepthwiseF32Config

    def applies(self, workload: Workload, isa: Isa) -> bool:
        """Where the float32 depthwise kernel applies, on x86 (the int8 family's CPUs), for windows whose sums
        float32 holds exactly."""
        shape = ConvShape(*workload)
        exact = shape.kernel_h * shape.kernel_w <= EXACT_FLOAT32_TERMS
        return isa.avx2 and exact and DEPTHWISE_F32.applies(workload, isa)

    def space(self, workload: Workload, isa: Isa) -> list[DepthwiseF32Config]:
        return DEPTHWISE_F32.space(workload, isa)

    def default(self, workload: Workload, isa: Isa) -> DepthwiseF32Config:
        return DEPTHWISE_F32.default(workload, isa)

    @staticmethod
    def result_shape(shape: ConvShape) -> tuple[int, ...]:
        """``[N, C/x, OH, OW, x]``."""
        return DEPTHWISE_F32.result_shape(shape)

    @staticmethod
    def pack(weight: torch.Tensor, shape: ConvShape) -> torch.Tensor:
        """int8 ``[C, 1, KH, KW]`` → float32 ``[C/x, KH, KW, x]`` (the same integers)."""
        return DEPTHWISE_F32.pack(weight, shape)

    def build(self, workload: Workload, config: DepthwiseF32Config, variant: Conv2dInt8Variant | None = None):
        """Parameters, in order: ``xq`` int8 ``[N, C/x, H, W, x]``; the packed weight (:meth:`pack`);
        ``zero_point`` int32 and ``x_scale`` float32, ``[1]``; ``w_scale`` and ``bias`` float32 ``[C]``; the
        epilogue's operands (whole ones as the result); requantized, the output's ``scale`` float32 and
        ``zero_point`` int32, ``[1]`` each; the results ``[N, C/x, OH, OW, x]``: float32 (unless requantized
        alone), then int8 (requantized)."""
        from tvm import te

        shape = ConvShape(*workload)
        adds = variant or Conv2dInt8Variant()
        block = shape.out_block
        blocked = (shape.batch, shape.channels // block, shape.height, shape.width, block)
        xq = te.placeholder(blocked, "int8", name="xq")
        packed = te.placeholder((shape.channels // block, shape.kernel_h, shape.kernel_w, block), "float32", "packed")
        zero_point = te.placeholder((1,), "int32", name="zero_point")
        x_scale = te.placeholder((1,), "float32", name="x_scale")
        w_scale = te.placeholder((shape.channels,), "float32", name="w_scale")
        bias = te.placeholder((shape.channels,), "float32", name="bias")
        # Inlined into the padding, which each task computes in cache: converted once per input row a task reads.
        centered = te.compute(
            blocked, lambda *i: (xq(*i).astype("int32") - zero_point[0]).astype("float32"), name="centered"
        )

        def multiply_add(tap, c, kh, kw, lane):
            return te.sum(tap * packed[c, kh, kw, lane], axis=[kh, kw])

        acc = taps_reduced(shape, config, padded_input(shape, centered), multiply_add)
        out_shape = self.result_shape(shape)

        def dequantized(n, c, h, w, lane):
            channel = c * block + lane
            return acc[n, c, h, w, lane] * (x_scale[0] * w_scale[channel]) + bias[channel]

        conv = te.compute(out_shape, dequantized, name="conv")
        operands, requantize, results, writers = adds.written(conv, out_shape)
        func = te.create_prim_func([xq, packed, zero_point, x_scale, w_scale, bias, *operands, *requantize, *results])
        return self.tagged(row_tiled(func, shape, config, writers), workload)


DEPTHWISE_INT8 = DepthwiseInt8()
