"""Spelled-out attention becomes one ``scaled_dot_product_attention``."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.edit import read_outside, replace_subgraph
from fxopt.ir.layers import is_call, is_constant, is_number
from fxopt.ir.meta import describe_node, dtype_of, shape_of, stamp_provenance
from fxopt.ir.pattern import Pat, RewriteContext, Rewritten, Rule, Skip
from fxopt.ir.program import Program, attribute_owner
from fxopt.ir.traits import DIV, MUL, SDPA
from fxopt.passes.base import Pass, PassContext

aten = torch.ops.aten

_SOFTMAX = aten._softmax.default
# What capture's decomposition of a batched matmul wraps around its ``bmm`` (broadcast, flatten, unflatten).
_RESHAPES = (
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.expand.default,
    aten.clone.default,
)


@dataclass(frozen=True)
class FuseAttention(Pass):
    """Rewrite ``softmax(Q @ Kᵀ * scale + mask) @ V`` as one ``scaled_dot_product_attention``.

    Eager attention implementations (``transformers``' ``eager`` attention,
    hand-written blocks) reach the graph as two batched matmuls around a
    scale, an optional additive mask and a softmax over the last dimension;
    PyTorch runs that as five kernels and materializes the score matrix,
    while SDPA is one fused kernel in PyTorch and one attention lowering in
    the backend. Matched: scale factors (a number or a one-element constant,
    multiplied or divided, on the scores or on Q), an additive float mask of
    any broadcastable shape of rank 2 or more after the scaling, Kᵀ given as a transpose of K
    (or any other tensor, which is then transposed), Q/K/V of equal batch
    dimensions and rank at least 3. Not matched (note in the report): a mask
    applied with ``where``/``masked_fill``, a softmax in another dtype, any
    intermediate value used elsewhere.

    Exact up to float rounding: SDPA computes the same function, its kernel
    sums in another order (about 1e-6 relative in float32). Run after
    ``fuse-blocks`` (which merges the Q/K/V projections) and before ``cse``
    and ``dce``.
    """

    name = "fuse-attention"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        def fuse(rewriter: RewriteContext, softmax: fx.Node) -> Rewritten | Skip:
            found = _match(softmax)
            if isinstance(found, Skip):
                return found
            with program.graph.inserting_before(found.root):  # the second matmul: Q, K and V are all defined there
                key = found.key
                if key is None:  # Kᵀ is not a visible transpose of K: SDPA wants K itself
                    rank = len(shape_of(found.key_t))
                    dims = list(range(rank - 2)) + [rank - 1, rank - 2]
                    key = program.graph.call_function(aten.permute.default, (found.key_t, dims))
                args = (found.query, key, found.value) + ((found.mask,) if found.mask is not None else ())
                fused = program.graph.call_function(SDPA, args, {"scale": found.scale})
            stamp_provenance([fused] if key is found.key else [key, fused], self.name, found.nodes)
            replace_subgraph(found.root, fused, found.nodes)
            ctx.count("attentions-fused")
            ctx.notes.append(
                f"{describe_node(softmax)}: matmul, scale{', mask' if found.mask is not None else ''}, "
                f"softmax, matmul -> {fused.name} (scale={found.scale:.6g})"
            )
            return Rewritten(fused)

        return ctx.rewrite(program, [Rule("softmax-attention", Pat(_SOFTMAX, name="softmax"), fuse)])


@dataclass
class _Attention:
    root: fx.Node  # the output of the second matmul, replaced by the SDPA
    query: fx.Node
    key: fx.Node | None  # None when only Kᵀ is in the graph
    key_t: fx.Node
    value: fx.Node
    mask: fx.Node | None
    scale: float
    nodes: list[fx.Node]  # everything the SDPA replaces


def _match(softmax: fx.Node) -> _Attention | Skip:
    """The attention around ``softmax``, or why it is not one."""
    rank = len(shape_of(softmax))
    if rank < 3:
        return Skip("scores of rank < 3")
    if softmax.args[1] not in (-1, rank - 1) or softmax.args[2]:
        return Skip("softmax over another dimension or into another dtype")
    nodes = [softmax]
    scores, mask = softmax.args[0], None
    if is_call(scores, aten.add.Tensor) and scores.kwargs.get("alpha", 1) == 1:
        nodes.append(scores)
        left, right = scores.args
        scores, mask = (left, right) if _is_mask(right, softmax) else (right, left)
        if not _is_mask(mask, softmax):
            return Skip("the scores are a sum, but neither term is a mask of the scores' dtype and rank >= 2")
    scale = 1.0
    while (factor := _scale_factor(scores)) is not None:
        nodes.append(scores)
        scale *= factor
        scores = scores.args[0]
    first = _matmul(scores)
    if first is None:
        return Skip("the scores are not a batched matmul")
    query, key_t, first_nodes = first
    while (factor := _scale_factor(query)) is not None and len(query.users) == 1:
        first_nodes.append(query)
        scale *= factor
        query = query.args[0]
    if len(softmax.users) != 1:
        return Skip("the attention probabilities are used elsewhere")
    root = _consumer(softmax)
    second = _matmul(root) if root is not None else None
    if second is None or second[0] is not softmax:
        return Skip("the probabilities are not multiplied by a value tensor")
    _, value, second_nodes = second
    nodes += first_nodes + second_nodes
    key = key_t.args[0] if is_call(key_t, aten.permute.default) and _swaps_last_two(key_t) else None
    if key is not None and len(key_t.users) == 1:
        nodes.append(key_t)
    if read_outside(nodes, root):
        return Skip("an intermediate value of the attention is used elsewhere")
    batch = shape_of(root)[:-2]
    if not shape_of(query)[:-2] == shape_of(key_t)[:-2] == shape_of(value)[:-2] == batch:
        return Skip("Q, K and V have different batch dimensions")
    dtypes = {dtype_of(query), dtype_of(key_t), dtype_of(value)}
    if dtypes != {dtype_of(softmax)} or not dtype_of(softmax).is_floating_point:
        return Skip(f"Q, K, V and the scores have dtypes {sorted(map(str, dtypes | {dtype_of(softmax)}))}")
    return _Attention(root, query, key, key_t, value, mask, scale, nodes)


def _is_mask(term: object, softmax: fx.Node) -> bool:
    """An additive mask: a tensor of the scores' dtype and rank from 2 (SDPA's least) to theirs."""
    value = term.meta.get("val") if isinstance(term, fx.Node) else None
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == dtype_of(softmax)
        and 2 <= value.dim() <= softmax.meta["val"].dim()
        and _matmul(term) is None
        and _scale_factor(term) is None
    )


def _scale_factor(node: object) -> float | None:
    """The number ``node`` multiplies its first argument by, when it is a scaling by a constant."""
    if not is_call(node, *MUL, *DIV):
        return None
    factor = node.args[1]
    if is_constant(factor):
        value = factor.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.numel() != 1:
            return None
        factor = float(getattr(*attribute_owner(factor.graph.owning_module, factor.target)))
    if not is_number(factor) or factor == 0:
        return None
    return float(factor) if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / float(factor)


def _consumer(node: fx.Node) -> fx.Node | None:
    """Follow single-user reshapes from ``node`` to the matmul output they feed (its final view, if any)."""
    while len(node.users) == 1:
        (user,) = node.users
        if is_call(user, aten.bmm.default):
            return _unflattened(user)
        if not is_call(user, *_RESHAPES):
            return None
        node = user
    return None


def _unflattened(bmm: fx.Node) -> fx.Node:
    if len(bmm.users) == 1:
        (user,) = bmm.users
        if is_call(user, aten.view.default, aten._unsafe_view.default, aten.reshape.default):
            return user
    return bmm


def _matmul(out: object):
    """``(a, b, nodes)`` when ``out`` is ``a @ b`` for ``a``, ``b`` of ``out``'s rank, as capture spells it."""
    if not isinstance(out, fx.Node):
        return None
    bmm = out.args[0] if is_call(out, aten.view.default, aten._unsafe_view.default, aten.reshape.default) else out
    if not is_call(bmm, aten.bmm.default) or (bmm is not out and len(bmm.users) != 1):
        return None
    shape = shape_of(out)
    a_flat, b_flat = shape_of(bmm.args[0]), shape_of(bmm.args[1])
    a, a_nodes = _unflatten_operand(bmm.args[0], shape[:-2] + [shape[-2], a_flat[-1]])
    b, b_nodes = _unflatten_operand(bmm.args[1], shape[:-2] + [b_flat[-2], shape[-1]])
    if a is None or b is None:
        return None
    return a, b, list(dict.fromkeys([out, bmm] + a_nodes + b_nodes))


def _unflatten_operand(node: fx.Node, logical: list):
    """The earliest tensor of shape ``logical`` that ``node`` reshapes with nothing else reading the steps."""
    chain: list[fx.Node] = []
    best = (node, []) if shape_of(node) == logical else (None, [])
    while is_call(node, *_RESHAPES) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
        if shape_of(node) == logical:
            best = (node, list(chain))
    return best


def _swaps_last_two(permute: fx.Node) -> bool:
    dims = list(permute.args[1])
    n = len(dims)
    dims = [d % n for d in dims]
    return dims == list(range(n - 2)) + [n - 1, n - 2]
