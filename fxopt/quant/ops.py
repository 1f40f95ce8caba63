"""fxopt's quantized ops (namespace ``fxopt``): the explicit form of a quantized graph.

A quantized graph is explicit: activations pass through ``fxopt::quantize``
and integer (or fp8) layers ``fxopt::linear_q`` / ``fxopt::conv_q`` read the
quantized values and their constant quantized weights; weight-only layers
``fxopt::linear_wq`` read float activations and dequantize their weights
inside the matmul; ``fxopt::linear_bf16`` layers round their float activations
to bfloat16 and multiply them by bfloat16 weights, summing in float32;
``fxopt::attention_q`` is attention on int8 levels of Q, K and V and 8-bit
levels of the softmax's weights, with integer sums. Every
op is a ``torch.library`` custom op whose PyTorch implementation is the
reference (so a quantized graph runs, and is measured, in PyTorch); the TVM
backend lowers them to integer (and bfloat16) kernels.

Their arithmetic follows :mod:`fxopt.quant.formats`. Each op also registers its FLOP formula with
``torch.utils.flop_counter`` (the multiply-adds of the float layer it replaces), so :func:`fxopt.ir.count_flops`
counts quantized graphs without knowing these ops.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from fxopt.ir.ops import from_blocked, to_blocked
from fxopt.quant.formats import FORMATS, INT8, dequantize_groups, quantize_tensor, unpack_int4

__all__ = [
    "quantize",
    "linear_q",
    "conv_q",
    "conv_q_blocked",
    "linear_wq",
    "linear_bf16",
    "attention_q",
    "attention_mask",
    "EXACT_FLOAT32_TERMS",
    "WEIGHT_LEVELS",
    "EXACT_ATTENTION_KEYS",
    "EXACT_ATTENTION_DIM",
]


@torch.library.custom_op("fxopt::quantize", mutates_args=())
def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, fmt: str) -> torch.Tensor:
    """Quantize activations to ``fmt`` (``"int8"`` or ``"fp8"``) with ``scale``/``zero_point`` broadcast over ``x``."""
    return quantize_tensor(x, scale, zero_point if FORMATS[fmt].integer else None, FORMATS[fmt])


@quantize.register_fake
def _quantize_fake(x, scale, zero_point, fmt):
    return torch.empty_like(x, dtype=FORMATS[fmt].dtype)


#: Products of an int8 weight and an activation centered on its zero point (|x - zp| <= 255) summed this many at a
#: time stay below 2^24, where float32 holds every integer: such sums are exact in any order, so fast float GEMMs
#: compute them.
EXACT_FLOAT32_TERMS = 2**24 // (255 * 128)


def _accumulate(xq: torch.Tensor, x_zero_point: torch.Tensor, wq: torch.Tensor, layer, terms: int) -> torch.Tensor:
    """``layer(x, w)`` of the quantized values: exact integer sums (int8, as float64), or float32 sums of fp8
    products. ``terms`` is the reduction length per output; longer int8 reductions are split over input channels
    (dim 1 of the weight) into chunks that float32 sums exactly, added in float64."""
    if xq.dtype != torch.int8:
        return layer(xq.float(), wq.float())
    x, w = xq.float() - x_zero_point.float(), wq.float()
    channels = w.shape[1]
    step = max(1, channels * EXACT_FLOAT32_TERMS // terms)
    if step >= channels:
        return layer(x, w).double()
    channel_dim = x.dim() - 1 if w.dim() == 2 else 1
    return sum(
        layer(x.narrow(channel_dim, start, min(step, channels - start)), w[:, start : start + step]).double()
        for start in range(0, channels, step)
    )


@torch.library.custom_op("fxopt::linear_q", mutates_args=())
def linear_q(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``linear`` of quantized activations and weights (int8 × int8 → int32, or fp8 × fp8 → float32), dequantized.

    ``x_scale`` is per tensor (static) or ``[..., 1]`` per token (dynamic);
    ``w_scale`` per tensor or ``[out]``; ``wq`` is ``[out, in]``.
    """
    acc = _accumulate(xq, x_zero_point, wq, lambda x, w: x @ w.T, wq.shape[1])
    return (acc.float() * (x_scale * w_scale) + (0 if bias is None else bias.float())).to(out_dtype)


@linear_q.register_fake
def _linear_q_fake(xq, x_scale, x_zero_point, wq, w_scale, bias, out_dtype):
    return xq.new_empty((*xq.shape[:-1], wq.shape[0]), dtype=out_dtype)


@torch.library.custom_op("fxopt::conv_q", mutates_args=())
def conv_q(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """``convolution`` of quantized activations and weights, like :func:`linear_q`; per-tensor ``x_scale``,
    ``w_scale`` per tensor or ``[out]``. Padding pads with the real value 0 (the zero point)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[wq.dim() - 2]
    if groups > 1 and xq.dtype == torch.int8:  # chunks of input channels would cut across groups: float64
        acc = conv(xq.double() - x_zero_point.double(), wq.double(), None, stride, padding, dilation, groups)
    else:
        acc = _accumulate(
            xq, x_zero_point, wq, lambda x, w: conv(x, w, None, stride, padding, dilation, groups), wq[0].numel()
        )
    channel = (-1,) + (1,) * (wq.dim() - 2)
    y = acc.float() * (x_scale * w_scale).reshape(channel if w_scale.dim() else ())
    if bias is not None:
        y = y + bias.float().reshape(channel)
    return y.to(out_dtype)


@conv_q.register_fake
def _conv_q_fake(xq, x_scale, x_zero_point, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    windows = zip(xq.shape[2:], wq.shape[2:], stride, padding, dilation)
    spatial = [_out_size(size, k, s, 2 * p, d) for size, k, s, p, d in windows]
    return xq.new_empty((xq.shape[0], wq.shape[0], *spatial), dtype=out_dtype)


def _out_size(size, kernel: int, stride: int, padding: int, dilation: int):
    """A convolution's outputs along a dimension of ``size`` inputs, ``padding`` in all added to them."""
    return (size + padding - dilation * (kernel - 1) - 1) // stride + 1


@torch.library.custom_op("fxopt::conv_q_blocked", mutates_args=())
def conv_q_blocked(
    xq: torch.Tensor,
    x_scale: torch.Tensor,
    x_zero_point: torch.Tensor,
    wq: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    out_dtype: torch.dtype,
    block: int,
) -> torch.Tensor:
    """:func:`conv_q` of a blocked ``xq`` (NCHW[x]c, ``fxopt::to_blocked``), the result blocked by ``block``:
    what ``convert-layout`` makes of a quantized convolution. ``padding``: ``[top, left, bottom, right]``, the
    zero point (the real 0)."""
    top, left, bottom, right = padding
    plain = from_blocked(xq)
    padded = F.pad(plain, (left, right, top, bottom), value=int(x_zero_point.reshape(-1)[0]))
    y = conv_q(padded, x_scale, x_zero_point, wq, w_scale, bias, stride, [0, 0], dilation, groups, out_dtype)
    return to_blocked(y, block)


@conv_q_blocked.register_fake
def _conv_q_blocked_fake(
    xq, x_scale, x_zero_point, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype, block
):
    n, _, height, width, _ = xq.shape
    top, left, bottom, right = padding
    out_h = _out_size(height, wq.shape[2], stride[0], top + bottom, dilation[0])
    out_w = _out_size(width, wq.shape[3], stride[1], left + right, dilation[1])
    return xq.new_empty((n, wq.shape[0] // block, out_h, out_w, block), dtype=out_dtype)


@torch.library.custom_op("fxopt::linear_wq", mutates_args=())
def linear_wq(
    x: torch.Tensor,
    wq: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
) -> torch.Tensor:
    """Weight-only quantized ``linear``: float ``x``, group-wise ``bits``-bit weights dequantized in the matmul.

    ``wq`` is ``[out, in]`` int8 (8 bits) or ``[out, in / 2]`` packed uint8 (4 bits);
    ``scale``/``zero_point`` are ``[out, groups]`` float32.
    """
    q = unpack_int4(wq) if bits == 4 else wq
    weight = dequantize_groups(q, scale, zero_point).to(x.dtype)
    return F.linear(x, weight, bias)


@linear_wq.register_fake
def _linear_wq_fake(x, wq, scale, zero_point, bias, bits):
    return x.new_empty((*x.shape[:-1], scale.shape[0]))


@torch.library.custom_op("fxopt::linear_bf16", mutates_args=())
def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` in bfloat16 with float32 sums: ``x`` rounded to bfloat16 (to nearest, ties to even), times the
    bfloat16 ``weight`` ``[out, in]``; each product is exact in float32 (8-bit by 8-bit significands), summed in
    float32, plus the float32 ``bias``; the result in ``x``'s dtype."""
    rounded = x.to(torch.bfloat16).float()
    return F.linear(rounded, weight.float(), None if bias is None else bias.float()).to(x.dtype)


@linear_bf16.register_fake
def _linear_bf16_fake(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


#: The levels of the softmax's weights in :func:`attention_q`: ``exp(s - max)`` in ``[0, 1]`` as 0..255.
WEIGHT_LEVELS = 255
#: Keys :func:`attention_q`'s sums of weight levels times int8 values (each at most 255 x 128) stay exact in
#: float32 for: kernels summing in float32 lanes apply up to this many.
EXACT_ATTENTION_KEYS = 2**24 // (WEIGHT_LEVELS * 128)
#: The head size its Q·Kᵀ sums (each product at most 128 x 128) stay exact in float32 for.
EXACT_ATTENTION_DIM = 2**24 // (128 * 128)


def attention_mask(scores_shape, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """``scaled_dot_product_attention``'s masks as one additive float mask broadcast to ``scores_shape``: boolean
    masks ``-inf`` where False, additive ones as they are, ``is_causal`` ``-inf`` above the diagonal."""
    length, source = scores_shape[-2:]
    bias = torch.zeros(())
    if attn_mask is not None:
        bias = torch.where(attn_mask, 0.0, float("-inf")) if attn_mask.dtype == torch.bool else attn_mask.float()
    if is_causal:
        bias = bias + torch.full((length, source), float("-inf")).triu(1)
    return bias.expand(scores_shape)


@torch.library.custom_op("fxopt::attention_q", mutates_args=())
def attention_q(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    q_scale: torch.Tensor,
    k_scale: torch.Tensor,
    v_scale: torch.Tensor,
    scale: float,
    is_causal: bool,
) -> torch.Tensor:
    """Attention on integer levels, ``[batch, heads, length, dim]``: Q, K and V quantized to int8 with one
    symmetric scale per head (``[heads]``), Q·Kᵀ an exact integer sum scaled by ``q_scale * k_scale * scale``,
    the mask added; each row's softmax weights ``exp(s - max)`` (the largest 1) rounded to :data:`WEIGHT_LEVELS`
    levels, P·V an exact integer sum of levels times V's int8 values, divided by the row's sum of levels and
    scaled by ``v_scale``. A row whose keys are all masked out gives zeros, as in PyTorch.

    Weight levels relative to each row's largest keep 8 bits wherever the weights are near the maximum (a
    diffuse row: normalized probabilities of 1/128 would get two levels)."""
    heads = (1, -1, 1, 1)
    levels = [
        quantize_tensor(t, s.reshape(heads), None, INT8).double() for t, s in ((q, q_scale), (k, k_scale), (v, v_scale))
    ]
    qi, ki, vi = levels
    dots = (qi @ ki.transpose(-1, -2)).float()
    scores = dots * (q_scale * k_scale * scale).reshape(heads) + attention_mask(dots.shape, attn_mask, is_causal)
    top = scores.amax(-1, keepdim=True)
    weights = torch.floor(torch.exp(scores - top) * WEIGHT_LEVELS + 0.5)
    weights = torch.where(top == float("-inf"), 0.0, weights)
    total = weights.sum(-1, keepdim=True)
    mixed = (weights.double() @ vi).float()
    out = torch.where(total > 0, mixed / total.clamp_min(1) * v_scale.reshape(heads), 0.0)
    return _heads_inside(out.to(q.dtype))


def _heads_inside(out: torch.Tensor) -> torch.Tensor:
    """``out`` ``[batch, heads, length, dim]`` laid out ``[batch, length, heads, dim]``, as PyTorch's CPU attention
    lays out its result (graphs captured from it view the heads merged without a copy)."""
    return out.transpose(1, 2).contiguous().transpose(1, 2)


@attention_q.register_fake
def _attention_q_fake(q, k, v, attn_mask, q_scale, k_scale, v_scale, scale, is_causal):
    batch, heads, length, _ = q.shape
    return q.new_empty((batch, length, heads, v.shape[-1])).transpose(1, 2)


# Quantized layers count the multiply-adds of the float layers they replace.
@register_flop_formula([torch.ops.fxopt.linear_q, torch.ops.fxopt.linear_wq, torch.ops.fxopt.linear_bf16])
def _linear_flops(x_shape, *args, out_shape, **kwargs) -> int:
    return 2 * math.prod(x_shape) * out_shape[-1]


@register_flop_formula([torch.ops.fxopt.conv_q, torch.ops.fxopt.conv_q_blocked])
def _conv_flops(x_shape, x_scale_shape, x_zero_point_shape, w_shape, *args, out_shape, **kwargs) -> int:
    return 2 * math.prod(out_shape) * math.prod(w_shape[1:])
