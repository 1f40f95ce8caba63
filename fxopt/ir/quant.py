"""Quantization numerics and fxopt's quantized ops.

A quantized graph is explicit: activations pass through ``fxopt::quantize``
and integer (or fp8) layers ``fxopt::linear_q`` / ``fxopt::conv_q`` read the
quantized values and their constant quantized weights; weight-only layers
``fxopt::linear_wq`` read float activations and dequantize their weights
inside the matmul. Every op is a ``torch.library`` custom op whose PyTorch
implementation is the reference (so a quantized graph runs, and is measured,
in PyTorch); the TVM backend lowers them to integer kernels.

Conventions, shared by the ops, the passes and the backend:

- integer formats are affine: ``real = (q - zero_point) * scale``, and
  ``q = clamp(floor(x / scale + 0.5) + zero_point, qmin, qmax)`` (rounding half
  up, which TVM reproduces exactly);
- ``scale`` and ``zero_point`` are float32 / int32 tensors broadcastable
  against the tensor they describe (a scalar per tensor, ``[out]`` per output
  channel, ``[..., 1]`` per token);
- int8 layers accumulate exact integer products in int32 (the reference sums
  them in float32 in chunks short enough to stay exact, :data:`EXACT_FLOAT32_TERMS`,
  and adds the chunks in float64), then multiply by ``x_scale * w_scale`` and
  add the float bias;
- fp8 is ``float8_e4m3fn`` with a float32 scale: ``real = fp8 * scale``;
  products accumulate in float32 (simulated where the CPU has no fp8 units);
- 4-bit weights are stored two per byte (low nibble first) as unsigned
  ``0..15`` with a per-group zero point (8 for symmetric).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Format", "FORMATS", "INT8", "INT4", "FP8", "fake_quantize", "quantize_tensor", "affine_params",
           "pack_int4", "unpack_int4", "group_params", "gptq_groups", "dequantize_groups", "linear_q", "conv_q", "linear_wq",
           "quantize"]


@dataclass(frozen=True)
class Format:
    """A number format a tensor is quantized to."""

    name: str
    dtype: torch.dtype  # storage dtype of the quantized values
    qmin: float
    qmax: float
    integer: bool

    @property
    def symmetric_max(self) -> float:
        """The largest magnitude a symmetric scale maps ``amax`` to (127 for int8: -128 stays unused)."""
        return min(-self.qmin, self.qmax) if self.integer else self.qmax


INT8 = Format("int8", torch.int8, -128, 127, True)
INT4 = Format("int4", torch.uint8, 0, 15, True)  # unsigned nibbles; symmetric weights use zero point 8
FP8 = Format("fp8", torch.float8_e4m3fn, -448.0, 448.0, False)
FORMATS = {f.name: f for f in (INT8, INT4, FP8)}


def quantize_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """``x`` in ``fmt`` (integers as ``fmt.dtype`` values, unpacked; fp8 as ``float8_e4m3fn``)."""
    scaled = x.float() / scale
    if not fmt.integer:
        return scaled.clamp(fmt.qmin, fmt.qmax).to(fmt.dtype)
    q = torch.floor(scaled + 0.5)
    if zero_point is not None:
        q = q + zero_point
    return q.clamp(fmt.qmin, fmt.qmax).to(torch.int32 if fmt is INT4 else fmt.dtype)


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, fmt: Format) -> torch.Tensor:
    """``x`` quantized and dequantized again, as float32: what the quantized model sees instead of ``x``."""
    q = quantize_tensor(x, scale, zero_point, fmt).float()
    return (q - zero_point if zero_point is not None else q) * scale


def affine_params(lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, zero_point)`` mapping the range ``[lo, hi]`` onto ``fmt`` (elementwise over the range tensors).

    The range is widened to include 0 so that zero is exact (padding, ReLU
    outputs). Symmetric formats get zero point 0 (fp8 always is); an empty
    range gets scale 1.
    """
    lo, hi = torch.minimum(lo.float(), torch.zeros(())), torch.maximum(hi.float(), torch.zeros(()))
    if symmetric or not fmt.integer:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / fmt.symmetric_max, torch.ones(()))
        return scale, torch.zeros_like(scale, dtype=torch.int32)
    scale = (hi - lo) / (fmt.qmax - fmt.qmin)
    scale = torch.where(scale > 0, scale, torch.ones(()))
    zero_point = torch.clamp(torch.floor(fmt.qmin - lo / scale + 0.5), fmt.qmin, fmt.qmax)
    return scale, zero_point.to(torch.int32)


def group_params(weight: torch.Tensor, group_size: int, fmt: Format, symmetric: bool,
                 hessian: torch.Tensor | None = None, grid: int = 20) -> tuple[torch.Tensor, ...]:
    """Quantize a ``[out, in]`` weight in groups of ``group_size`` inputs: ``(q, scale, zero_point)``.

    ``q`` is ``[out, in]`` integers (unpacked), ``scale`` and ``zero_point``
    are ``[out, in / group_size]`` float32 (zero points are integral).
    Symmetric 4-bit uses the signed range -7..7 stored with zero point 8.

    Each group's range is its min/max, or, given the ``hessian = E[x xᵀ]`` of
    the layer's inputs, the range shrunk by the factor in ``1, 1 - 0.5 / grid,
    ..., 0.5`` whose quantization error ``dᵀ H d`` on the layer's output is
    least (AWQ's clipping search): clipping a few large weights can buy finer
    steps for the rest.
    """
    out_features, in_features = weight.shape
    groups = weight.float().reshape(out_features, in_features // group_size, group_size)
    lo, hi = groups.amin(-1), groups.amax(-1)
    scale, zero_point = _group_range_params(lo, hi, fmt, symmetric)
    if hessian is not None:
        count = in_features // group_size
        blocks = hessian.float().reshape(count, group_size, count, group_size).diagonal(dim1=0, dim2=2)
        blocks = blocks.permute(2, 0, 1)  # [groups, group_size, group_size]: each group's inputs with each other

        def output_error(params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            d = groups - _dequantize(quantize_tensor(groups, params[0][..., None], params[1][..., None], fmt), *params)
            return torch.einsum("ogi,gij,ogj->og", d, blocks, d)

        best = output_error((scale, zero_point))  # the min/max range: shrink 1
        for step in range(1, grid + 1):
            shrink = 1 - 0.5 * step / grid
            candidate = _group_range_params(lo * shrink, hi * shrink, fmt, symmetric)
            error = output_error(candidate)
            better = error < best
            best = torch.where(better, error, best)
            scale, zero_point = torch.where(better, candidate[0], scale), torch.where(better, candidate[1], zero_point)
    q = quantize_tensor(groups, scale[..., None], zero_point[..., None], fmt)
    return q.reshape(out_features, in_features), scale, zero_point


def _group_range_params(lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool) -> tuple[torch.Tensor, ...]:
    if symmetric and fmt is INT4:
        amax = torch.maximum(-lo, hi)
        scale = torch.where(amax > 0, amax / 7, torch.ones(()))
        return scale, torch.full_like(scale, 8.0)
    scale, zero_point = affine_params(lo, hi, fmt, symmetric)
    return scale, zero_point.float()


def _dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Groups ``[out, groups, group_size]`` of integers back to float32 with ``[out, groups]`` parameters."""
    return (q.float() - zero_point[..., None]) * scale[..., None]


def gptq_groups(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, fmt: Format, symmetric: bool,
                search_ranges: bool = False, damping: float = 0.1) -> tuple[torch.Tensor, ...]:
    """:func:`group_params` with GPTQ's rounding (Frantar et al. 2023): columns are quantized in order, and each
    one's rounding error is spread over the columns not yet quantized, weighted by the inverse Hessian
    ``hessian = E[x xᵀ]`` of the layer's inputs, so the layer's output error, not the weight error, is minimized.

    Group scales are chosen from the updated weights as each group starts (with ``search_ranges``, by
    :func:`group_params`' clipping search on the group's block of the Hessian). Inputs that never fire (zero
    diagonal) get no weight.
    """
    out_features, in_features = weight.shape
    w = weight.double().clone()
    h = hessian.double().clone()
    blocks = hessian if search_ranges else None
    dead = h.diagonal() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    h += torch.eye(in_features, dtype=h.dtype) * damping * h.diagonal().mean()
    # Upper Cholesky factor of H⁻¹: row i holds how the remaining columns absorb column i's error.
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.empty(out_features, in_features, dtype=torch.int32)
    groups = in_features // group_size
    scale = torch.empty(out_features, groups)
    zero_point = torch.empty(out_features, groups)
    # Lazy batch updates (GPTQ's blocks): a column's error reaches the rest of its block at once and the columns
    # beyond in one matmul per block; blocks hold whole groups, or groups whole blocks.
    block_size = 128 if 128 % group_size == 0 or group_size % 128 == 0 else group_size
    for start in range(0, in_features, block_size):
        end = min(start + block_size, in_features)
        errors = torch.empty(out_features, end - start, dtype=w.dtype)
        for i in range(start, end):
            g = i // group_size
            if i % group_size == 0:
                block = None if blocks is None else blocks[i:i + group_size, i:i + group_size]
                _, group_scale, group_zero_point = group_params(w[:, i:i + group_size], group_size, fmt, symmetric,
                                                                block)
                scale[:, g], zero_point[:, g] = group_scale[:, 0], group_zero_point[:, 0]
            q[:, i] = quantize_tensor(w[:, i], scale[:, g], zero_point[:, g], fmt).int()
            error = (w[:, i] - (q[:, i] - zero_point[:, g]).double() * scale[:, g].double()) / inverse[i, i]
            w[:, i + 1:end] -= error[:, None] * inverse[i, i + 1:end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q.to(torch.int32 if fmt is INT4 else fmt.dtype), scale, zero_point


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` weight from unpacked group-quantized integers (see :func:`group_params`)."""
    out_features, in_features = q.shape
    return _dequantize(q.reshape(out_features, scale.shape[1], -1), scale, zero_point).reshape(out_features, in_features)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack ``0..15`` integers along the last dim two per byte, low nibble first."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The ``0..15`` integers :func:`pack_int4` packed, as uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)


# --- ops ----------------------------------------------------------------------------------------------------


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
    return sum(layer(x.narrow(channel_dim, start, min(step, channels - start)),
                     w[:, start:start + step]).double() for start in range(0, channels, step))


@torch.library.custom_op("fxopt::linear_q", mutates_args=())
def linear_q(xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, wq: torch.Tensor,
             w_scale: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
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
def conv_q(xq: torch.Tensor, x_scale: torch.Tensor, x_zero_point: torch.Tensor, wq: torch.Tensor,
           w_scale: torch.Tensor, bias: torch.Tensor | None, stride: list[int], padding: list[int],
           dilation: list[int], groups: int, out_dtype: torch.dtype) -> torch.Tensor:
    """``convolution`` of quantized activations and weights, like :func:`linear_q`; per-tensor ``x_scale``,
    ``w_scale`` per tensor or ``[out]``. Padding pads with the real value 0 (the zero point)."""
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[wq.dim() - 2]
    if groups > 1 and xq.dtype == torch.int8:  # chunks of input channels would cut across groups: float64
        acc = conv(xq.double() - x_zero_point.double(), wq.double(), None, stride, padding, dilation, groups)
    else:
        acc = _accumulate(xq, x_zero_point, wq, lambda x, w: conv(x, w, None, stride, padding, dilation, groups),
                          wq[0].numel())
    channel = (-1,) + (1,) * (wq.dim() - 2)
    y = acc.float() * (x_scale * w_scale).reshape(channel if w_scale.dim() else ())
    if bias is not None:
        y = y + bias.float().reshape(channel)
    return y.to(out_dtype)


@conv_q.register_fake
def _conv_q_fake(xq, x_scale, x_zero_point, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype):
    spatial = [
        (size + 2 * p - d * (k - 1) - 1) // s + 1
        for size, k, s, p, d in zip(xq.shape[2:], wq.shape[2:], stride, padding, dilation)
    ]
    return xq.new_empty((xq.shape[0], wq.shape[0], *spatial), dtype=out_dtype)


@torch.library.custom_op("fxopt::linear_wq", mutates_args=())
def linear_wq(x: torch.Tensor, wq: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
              bias: torch.Tensor | None, bits: int) -> torch.Tensor:
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
