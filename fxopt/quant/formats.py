"""Number formats and their arithmetic: what a quantized tensor holds and how it maps back to real values.

Conventions, shared by the ops, the passes and the backend:

- integer formats are affine: ``real = (q - zero_point) * scale``, and
  ``q = clamp(floor(x / scale + 0.5) + zero_point, qmin, qmax)`` (rounding half
  up, which TVM reproduces exactly);
- ``scale`` and ``zero_point`` are float32 / int32 tensors broadcastable
  against the tensor they describe (a scalar per tensor, ``[out]`` per output
  channel, ``[..., 1]`` per token);
- int8 layers accumulate exact integer products in int32 (the reference sums
  them in float32 in chunks short enough to stay exact, :data:`fxopt.quant.ops.EXACT_FLOAT32_TERMS`,
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

__all__ = [
    "Format",
    "FORMATS",
    "INT8",
    "INT4",
    "FP8",
    "signed_int8",
    "quantize_tensor",
    "fake_quantize",
    "affine_params",
    "dequantize_groups",
    "dequantize_grouped",
    "pack_int4",
    "unpack_int4",
]


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


def signed_int8(bits: int) -> Format:
    """int8 storage of ``bits``-bit signed values (:data:`INT8` for 8): a symmetric scale maps ``amax`` to
    ``2^(bits-1) - 1``. Seven-bit weights are what ``vpmaddubsw`` multiplies by unsigned bytes exactly."""
    return INT8 if bits == 8 else Format("int8", torch.int8, -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, True)


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


def affine_params(
    lo: torch.Tensor, hi: torch.Tensor, fmt: Format, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
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


def dequantize_grouped(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """Groups ``[out, groups, group_size]`` of integers back to float32 with ``[out, groups]`` parameters."""
    return (q.float() - zero_point[..., None]) * scale[..., None]


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """float32 ``[out, in]`` weight from unpacked group-quantized integers (see
    :func:`fxopt.quant.weights.group_params`)."""
    out_features, in_features = q.shape
    grouped = q.reshape(out_features, scale.shape[1], -1)
    return dequantize_grouped(grouped, scale, zero_point).reshape(out_features, in_features)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack ``0..15`` integers along the last dim two per byte, low nibble first."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The ``0..15`` integers :func:`pack_int4` packed, as uint8."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)
