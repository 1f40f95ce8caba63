"""fxopt's canonical op set: core ATen plus a few preserved composite ops.

Captured graphs are decomposed with :func:`decomposition_table` (core ATen, the
ops tagged ``torch.Tag.core``) except for the ops in :data:`PRESERVED_OPS`; an
op is canonical when that table leaves it alone (a fixed point: core ops, the
preserved ones, and the few ops PyTorch has no decomposition for, such as
``rand_like``). Those stay whole because later
passes and the backend want to see them as one op (a Linear is one matmul with
a bias, not ``view/permute/addmm/view``; an attention is one fused kernel).
"""

from __future__ import annotations

import functools
import operator

import torch

__all__ = ["PRESERVED_OPS", "decomposition_table", "is_canonical_target"]

aten = torch.ops.aten

PRESERVED_OPS: frozenset[torch._ops.OpOverload] = frozenset(
    {
        aten.linear.default,
        aten.layer_norm.default,
        aten.rms_norm.default,
        aten.group_norm.default,
        aten.scaled_dot_product_attention.default,
    }
)

# Non-ATen callables export legitimately leaves in a graph: tuple indexing of
# multi-output ops and arithmetic on symbolic sizes of dynamic dimensions.
_STRUCTURAL_TARGETS = frozenset(
    {
        operator.getitem,
        operator.add,
        operator.sub,
        operator.mul,
        operator.floordiv,
        operator.mod,
        operator.eq,
        operator.ne,
        operator.lt,
        operator.le,
        operator.gt,
        operator.ge,
        torch.sym_int,
        torch.sym_float,
        torch.sym_max,
        torch.sym_min,
        torch.sym_not,
    }
)


def decomposition_table() -> dict:
    """The decomposition table capture runs: core ATen minus :data:`PRESERVED_OPS`."""
    table = torch.export.default_decompositions()
    for op in PRESERVED_OPS:
        table.pop(op, None)
    return table


@functools.cache
def _decomposed_ops() -> frozenset:
    return frozenset(decomposition_table().keys())


def is_canonical_target(target: object) -> bool:
    """Whether a ``call_function`` target belongs to the canonical op set."""
    if target in PRESERVED_OPS or target in _STRUCTURAL_TARGETS:
        return True
    if isinstance(target, torch._ops.OpOverload):
        # fxopt's own ops (RMSNorm, quantized kernels, ...) live in the "fxopt" namespace.
        return torch.Tag.core in target.tags or target.namespace == "fxopt" or target not in _decomposed_ops()
    return False
