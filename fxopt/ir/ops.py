"""fxopt's own ops (namespace ``fxopt``), for what ATen has no single op for.

Each is a ``torch.library`` custom op with a PyTorch reference implementation
(so a graph using it runs, and verifies, in PyTorch) and a fake
implementation for shape propagation; the TVM backend has a lowering for each
(:mod:`fxopt.codegen.lower`, :mod:`fxopt.codegen.lower_conv`).

The blocked layout NCHW[x]c (``convert-layout``): a ``[N, C, H, W]`` activation stored as ``[N, C/x, H, W, x]``,
``x`` channels side by side, so a CPU's vector holds one pixel's block of channels. Elementwise ATen ops and
means over ``H, W`` apply to blocked tensors unchanged; convolutions and pools have blocked forms here.

Importing :mod:`fxopt.ir` registers them; the quantized ops are
:mod:`fxopt.quant.ops`.
"""

from __future__ import annotations

import torch

__all__ = ["crms_norm", "to_blocked", "from_blocked", "conv2d_blocked", "pool2d_blocked"]


@torch.library.custom_op("fxopt::crms_norm", mutates_args=())
def crms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """CRMSNorm (Jiang et al. 2023): RMSNorm of a zero-mean vector stored without its last element.

    ``x`` holds the first ``n - 1`` features of a vector whose features sum to
    zero (the last is ``-x.sum(-1)``); the result is the same first ``n - 1``
    features of ``rms_norm`` of the whole vector:
    ``x / sqrt((sum(x²) + sum(x)²) / n + eps)``. Half inputs are normalized in
    float32, as PyTorch's norms do.
    """
    wide = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    width = x.shape[-1] + 1
    mean_square = (wide.square().sum(-1, keepdim=True) + wide.sum(-1, keepdim=True).square()) / width
    return (wide * torch.rsqrt(mean_square + eps)).to(x.dtype)


@crms_norm.register_fake
def _crms_norm_fake(x: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("fxopt::to_blocked", mutates_args=())
def to_blocked(x: torch.Tensor, block: int) -> torch.Tensor:
    """``[N, C, H, W]`` → ``[N, C/block, H, W, block]`` (NCHW[x]c); ``block`` divides ``C``."""
    n, c, *spatial = x.shape
    return _unaliased(x.reshape(n, c // block, block, *spatial).movedim(2, -1).contiguous(), x)


@to_blocked.register_fake
def _to_blocked_fake(x: torch.Tensor, block: int) -> torch.Tensor:
    n, c, *spatial = x.shape
    return x.new_empty((n, c // block, *spatial, block))


@torch.library.custom_op("fxopt::from_blocked", mutates_args=())
def from_blocked(x: torch.Tensor) -> torch.Tensor:
    """``[N, C/x, H, W, x]`` → ``[N, C, H, W]``: the inverse of :func:`to_blocked`."""
    n, blocks, *spatial, block = x.shape
    return _unaliased(x.movedim(-1, 2).reshape(n, blocks * block, *spatial).contiguous(), x)


def _unaliased(result: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``result``, copied if it is a view of ``x`` (one block, or one pixel: nothing moved), as a custom op must."""
    return result.clone() if result.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() else result


@from_blocked.register_fake
def _from_blocked_fake(x: torch.Tensor) -> torch.Tensor:
    n, blocks, *spatial, block = x.shape
    return x.new_empty((n, blocks * block, *spatial))


@torch.library.custom_op("fxopt::conv2d_blocked", mutates_args=())
def conv2d_blocked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    block: int,
) -> torch.Tensor:
    """``conv2d`` of a blocked ``x`` (any block dividing its channels) by a plain ``[O, C/groups, KH, KW]``
    ``weight``, the result blocked by ``block``. ``padding``: ``[top, left, bottom, right]`` zeros (a padding op
    before the convolution, folded in, may pad one side only)."""
    top, left, bottom, right = padding
    plain = torch.nn.functional.pad(from_blocked(x), (left, right, top, bottom))
    return to_blocked(torch.nn.functional.conv2d(plain, weight, bias, stride, 0, dilation, groups), block)


@conv2d_blocked.register_fake
def _conv2d_blocked_fake(x, weight, bias, stride, padding, dilation, groups, block):
    n, _, height, width, _ = x.shape
    top, left, bottom, right = padding
    out_h = (height + top + bottom - dilation[0] * (weight.shape[2] - 1) - 1) // stride[0] + 1
    out_w = (width + left + right - dilation[1] * (weight.shape[3] - 1) - 1) // stride[1] + 1
    return x.new_empty((n, weight.shape[0] // block, out_h, out_w, block))


@torch.library.custom_op("fxopt::pool2d_blocked", mutates_args=())
def pool2d_blocked(
    x: torch.Tensor,
    kind: str,
    kernel: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    ceil_mode: bool,
    count_include_pad: bool,
) -> torch.Tensor:
    """``max_pool2d`` (``kind="max"``) or ``avg_pool2d`` (``"avg"``; no dilation) of a blocked ``x``, blocked
    alike."""
    plain = from_blocked(x)
    if kind == "max":
        pooled = torch.nn.functional.max_pool2d(plain, kernel, stride, padding, dilation, ceil_mode)
    else:
        pooled = torch.nn.functional.avg_pool2d(plain, kernel, stride, padding, ceil_mode, count_include_pad)
    return to_blocked(pooled, x.shape[-1])


@pool2d_blocked.register_fake
def _pool2d_blocked_fake(x, kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad):
    n, blocks, height, width, block = x.shape
    spatial = []
    for size, k, s, p, d in zip((height, width), kernel, stride, padding, dilation):
        span = size + 2 * p - d * (k - 1) - 1
        out = (span + (s - 1 if ceil_mode else 0)) // s + 1
        if ceil_mode and (out - 1) * s >= size + p:  # the last window must start inside the input or left pad
            out -= 1
        spatial.append(out)
    return x.new_empty((n, blocks, *spatial, block))
