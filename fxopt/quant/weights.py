"""Group-wise weight quantization: min/max ranges, the clipping search (AWQ) and GPTQ's error-compensating
rounding."""

from __future__ import annotations

import torch

from fxopt.quant.formats import INT4, Format, affine_params, dequantize_grouped, quantize_tensor

__all__ = ["group_params", "gptq_groups"]


def group_params(
    weight: torch.Tensor,
    group_size: int,
    fmt: Format,
    symmetric: bool,
    hessian: torch.Tensor | None = None,
    grid: int = 20,
) -> tuple[torch.Tensor, ...]:
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
            d = groups - dequantize_grouped(
                quantize_tensor(groups, params[0][..., None], params[1][..., None], fmt), *params
            )
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


def gptq_groups(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    group_size: int,
    fmt: Format,
    symmetric: bool,
    search_ranges: bool = False,
    damping: float = 0.1,
) -> tuple[torch.Tensor, ...]:
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
                block = None if blocks is None else blocks[i : i + group_size, i : i + group_size]
                _, group_scale, group_zero_point = group_params(
                    w[:, i : i + group_size], group_size, fmt, symmetric, block
                )
                scale[:, g], zero_point[:, g] = group_scale[:, 0], group_zero_point[:, 0]
            q[:, i] = quantize_tensor(w[:, i], scale[:, g], zero_point[:, g], fmt).int()
            error = (w[:, i] - (q[:, i] - zero_point[:, g]).double() * scale[:, g].double()) / inverse[i, i]
            w[:, i + 1 : end] -= error[:, None] * inverse[i, i + 1 : end][None, :]
            errors[:, i - start] = error
        w[:, end:] -= errors @ inverse[start:end, end:]
    return q.to(torch.int32 if fmt is INT4 else fmt.dtype), scale, zero_point
