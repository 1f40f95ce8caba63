"""Removal of ops that return their input unchanged."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.pattern import Pat, RewriteContext, Rule, RuleSet
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext

aten = torch.ops.aten


def _same_value_type(node: fx.Node, source: object) -> bool:
    """``node`` has the shape, dtype and strides of ``source``: forwarding ``source`` is a no-op.

    Strides matter: a ``clone`` of an expanded tensor makes it contiguous so
    that a later ``view`` works; forwarding the expanded tensor would break it.
    """
    if not isinstance(source, fx.Node):
        return False
    a, b = node.meta.get("val"), source.meta.get("val")
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return False
    return (
        a.dtype == b.dtype
        and a.device == b.device
        and [str(d) for d in a.shape] == [str(d) for d in b.shape]
        and [str(d) for d in a.stride()] == [str(d) for d in b.stride()]
    )


def _forward_input(ctx: RewriteContext, x: fx.Node) -> fx.Node | None:
    """Replace the matched node by its input ``x``, unless that would alias an output to a model input or constant.

    A copy returned to the user protects the model's inputs and weights from
    in-place edits of the output; such a copy stays.
    """
    root = ctx.root
    if not _same_value_type(root, x):
        return None
    outputs = ctx.program.output_nodes()
    if root in outputs and (x.op in ("placeholder", "get_attr") or x in outputs):
        return None
    return x


def _scalar(value: float):
    return lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and v == value


x = Pat.any("x")
_PRESERVING_FORMATS = (None, torch.preserve_format, torch.contiguous_format)

NOOP_RULES = RuleSet(
    [
        Rule(
            "copy",
            Pat(
                (aten.clone.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default),
                x,
                where=lambda n: n.kwargs.get("memory_format") in _PRESERVING_FORMATS,
            ),
            _forward_input,
        ),
        Rule(
            "to-same-dtype",
            Pat(aten._to_copy.default, x, where=lambda n: n.kwargs.get("memory_format") in _PRESERVING_FORMATS),
            _forward_input,
        ),
        Rule(
            "same-shape-view",
            Pat((aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten.expand.default), x),
            _forward_input,
        ),
        Rule(
            "identity-permute",
            Pat(aten.permute.default, x, Pat.any(where=lambda d: list(d) == sorted(d))),
            _forward_input,
        ),
        Rule(
            "full-slice", Pat(aten.slice.Tensor, x, where=lambda n: (list(n.args[4:5]) or [1])[0] == 1), _forward_input
        ),
        Rule(
            "single-cat",
            Pat(aten.cat.default, Pat.any(where=lambda ts: len(ts) == 1, name="tensors")),
            lambda ctx, tensors: _forward_input(ctx, tensors[0]),
        ),
        Rule("eval-dropout", Pat(aten.dropout.default, x, Pat.any(), False), _forward_input),
        Rule(
            "mul-one",
            Pat((aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar), x, Pat.any(where=_scalar(1))),
            _forward_input,
        ),
        Rule(
            "add-zero",
            Pat(
                (aten.add.Tensor, aten.add.Scalar, aten.sub.Tensor, aten.sub.Scalar),
                x,
                Pat.any(where=_scalar(0)),
                where=lambda n: n.kwargs.get("alpha", 1) == 1,
            ),
            _forward_input,
        ),
    ]
)


@dataclass(frozen=True)
class RemoveNoops(Pass):
    """Remove ops that return their input unchanged.

    Copies (clone/alias/detach, the remains of eval-mode dropout and of
    ``contiguous``), casts to the same dtype, views/reshapes/expands to the
    same shape, identity permutes, full slices, one-tensor concats, eval-mode
    dropout, ``x*1``, ``x/1``, ``x+0`` and ``x-0`` when the result has the
    input's dtype and shape. Exact. A copy that keeps a model output from
    aliasing a model input or weight is kept. Run first: it exposes patterns
    to every later pass.
    """

    name = "remove-noops"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        return ctx.rewrite(program, NOOP_RULES)
