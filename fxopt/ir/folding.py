"""The weight arithmetic of exact folds: a per-channel affine map ``y * scale + shift`` on a layer's output, or on its
input, folded into the layer's weight and bias; two layers in a row composed into one.

Pure functions of tensors, built from torch ops only, so ``fold-conv-bn{mode=tune}`` can also trace them into the
graph; property tests check each against the layer applied before or after the affine.
"""

from __future__ import annotations

import torch

__all__ = ["fold_output_affine", "fold_input_affine", "absorb_input_affine", "compose_layers"]


def fold_output_affine(
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(weight, bias)`` of a linear or conv layer whose output, per output channel, is the original's
    times ``scale`` plus ``shift``. A transposed conv's weight is ``[in, out / groups, *k]``: output channel
    ``(group, j)`` is dim 1 of that group's block."""
    w = weight.float()
    channels = scale.shape[0]
    if transposed:
        shape = (groups, 1, channels // groups) + (1,) * (w.dim() - 2)
        w = (w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) * scale.reshape(shape)).reshape(w.shape)
    else:
        w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
    b = shift if bias is None else bias.float() * scale + shift
    return w, b


def fold_input_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor, *, groups: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 ``(weight, bias)`` of a linear or (unpadded) conv layer computing on ``x`` what the original computes
    on ``x * scale + shift`` per input channel. Weight ``[out, in / groups, *k]``: input channel ``ci`` of output
    ``o``'s group ``g`` is ``g * in / groups + ci``."""
    w = weight.float()
    out, per_group = w.shape[0], scale.shape[0] // groups
    grouped = w.reshape(groups, out // groups, per_group, -1)
    scaled = grouped * scale.reshape(groups, 1, per_group, 1)
    b = (grouped * shift.reshape(groups, 1, per_group, 1)).sum((2, 3)).reshape(out)
    if bias is not None:
        b = b + bias.float()
    return scaled.reshape(w.shape), b


def absorb_input_affine(
    weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor, shift: torch.Tensor | None, in_dim: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Float64 weight and bias of a matmul-like layer reading ``x`` that computes what it computed reading
    ``x * scale + shift`` (per input feature; ``in_dim`` is the weight's input-feature dim)."""
    shape = [1] * weight.dim()
    shape[in_dim] = -1
    wide = weight.double()
    new_bias = None if bias is None else bias.double()
    if shift is not None:
        moved = (wide * shift.double().reshape(shape)).sum(in_dim)
        new_bias = moved if new_bias is None else new_bias + moved
    return wide * scale.double().reshape(shape), new_bias


def compose_layers(
    w1: torch.Tensor, b1: torch.Tensor | None, w2: torch.Tensor, b2: torch.Tensor | None, kind: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 ``(weight, bias)`` of one layer computing layer 2 of layer 1's output.

    ``kind``: ``"linear"`` (two linears: ``W2 W1``), ``"pointwise-first"`` (a 1x1 conv, then any conv: exact when
    the second pads nothing or the first has no bias, whose value a padded border would miss) or
    ``"pointwise-second"`` (any conv, then a 1x1 conv). Groups 1, no transposed convs. The bias is
    ``b2 + W2 b1``, a conv's W2 summed over its kernel taps.
    """
    w1, w2 = w1.float(), w2.float()
    if kind == "linear":
        weight = w2 @ w1
    elif kind == "pointwise-first":  # W[o, i, k] = sum_m W2[o, m, k] W1[m, i]
        weight = torch.einsum("om...,mi->oi...", w2, w1.flatten(1))
    elif kind == "pointwise-second":  # W[o, i, k] = sum_m W2[o, m] W1[m, i, k]
        weight = torch.einsum("om,mi...->oi...", w2.flatten(1), w1)
    else:
        raise ValueError(f"compose_layers: unknown kind {kind!r}")
    if b1 is None:
        return weight, None if b2 is None else b2.float()
    carried = w2 @ b1.float() if kind == "linear" else torch.einsum("om...,m->o", w2, b1.float())
    return weight, carried if b2 is None else carried + b2.float()
