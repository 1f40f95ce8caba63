"""fxopt's own ops (namespace ``fxopt``), for what ATen has no single op for.

Each is a ``torch.library`` custom op with a PyTorch reference implementation
(so a graph using it runs, and verifies, in PyTorch) and a fake
implementation for shape propagation; the TVM backend has a lowering for each
in :mod:`fxopt.codegen.lower`. Importing :mod:`fxopt.ir` registers them; the quantized ops are
:mod:`fxopt.quant.ops`.
"""

from __future__ import annotations

import torch

__all__ = ["crms_norm"]


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
