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
from fxopt.ir.traits import DIV, MUL, SDPA, VIEWS
from fxopt.passes.base import Pass, PassContext

aten = torch.ops.aten

_SOFTMAX = aten._softmax.default
# What capture's decomposition of a batched matmul wraps around its ``bmm`` (broadcast, flatten, unflatten).
_RESHAPES = (*VIEWS, aten.expand.default, aten.clone.default)


@dataclass(frozen=True)
class FuseAttention(Pass):
    """Rewrite ``softmax(Q @ Kᵀ * scale + mask) @ V`` as one ``scaled_dot_product_attention``.

    Eager attention implementations (``transformers``' ``eager`` attention,
    hand-written blocks) reach the graph as two batched matmuls around a
    scale, masks and a softmax over the last dimension; PyTorch runs that as
    five kernels and materializes the score matrix, while SDPA is one fused
    kernel in PyTorch and one attention lowering in the backend. Matched,
    between the first matmul and the softmax, in any order and number:
    reshapes (Falcon and BLOOM scale and mask the flattened ``[batch * heads,
    L, S]`` scores); scale factors (a number or a one-element constant,
    multiplied or divided, on the scores, on Q or on Kᵀ); additive float
    masks of rank 2 or more (padding and causal masks, ALiBi, T5's relative
    position bias: their sum becomes SDPA's mask, each scaled by the factors
    applied after it); ``where``/``masked_fill`` with ``-inf`` or a fill of
    at most -1e30 (GPT-Neo's causal mask, DeBERTa's padding mask: then
    ``s + where(c, 0, fill)``, which rounds to the same value for any score
    below 1e30 in magnitude). Kᵀ given as a transpose of K (or any other
    tensor, which is then transposed); Q/K/V of equal batch dimensions and
    rank at least 3. Not matched (note in the report): a fill that is not
    that negative, a softmax in another dtype, any intermediate value used
    elsewhere. A row whose every key is masked out with ``-inf`` is NaN in
    the softmax and zeros in SDPA (PyTorch's convention, kept by fxopt's
    kernels); with a finite fill both give the softmax of equal scores.

    Exact up to float rounding: SDPA computes the same function, its kernel
    sums in another order (about 1e-6 relative in float32), and several
    masks are added together before the scores. Run after ``fold-constants``
    (which makes computed scale tensors constants), ``fuse-blocks`` (which
    merges the Q/K/V projections), and before ``cse`` and ``dce``.
    """

    name = "fuse-attention"

    def apply(self, program: Program, ctx: PassContext) -> bool:
        def fuse(rewriter: RewriteContext, softmax: fx.Node) -> Rewritten | Skip:
            found = _match(softmax)
            if isinstance(found, Skip):
                return found
            graph = program.graph
            with graph.inserting_before(found.root):  # the second matmul: Q, K, V and the masks are defined there
                created = []
                key = found.key
                if key is None:  # Kᵀ is not a visible transpose of K: SDPA wants K itself
                    rank = len(shape_of(found.key_t))
                    dims = list(range(rank - 2)) + [rank - 1, rank - 2]
                    key = graph.call_function(aten.permute.default, (found.key_t, dims))
                    created.append(key)
                mask = None
                for term in found.masks:  # a mask the model computed is read as it is, not stamped as ours
                    value = term.build(graph, shape_of(softmax), created)
                    if mask is None:
                        mask = value
                    else:
                        mask = graph.call_function(aten.add.Tensor, (mask, value))
                        created.append(mask)
                args = (found.query, key, found.value) + ((mask,) if mask is not None else ())
                fused = graph.call_function(SDPA, args, {"scale": found.scale})
                result = fused
                if any(is_call(user, aten.view.default) for user in found.root.users):
                    # SDPA may return its result transposed in memory (PyTorch's CPU kernel does for batches
                    # over 1); a view of it (Falcon's flatten) needs the matmul's contiguous layout.
                    result = graph.call_function(
                        aten.clone.default, (fused,), {"memory_format": torch.contiguous_format}
                    )
                    created.append(result)
            stamp_provenance([*created, fused], self.name, found.nodes)
            replace_subgraph(found.root, result, found.nodes)
            ctx.count("attentions-fused")
            masks = "".join(f", {term.kind}" for term in found.masks)
            ctx.notes.append(
                f"{describe_node(softmax)}: matmul, scale{masks}, softmax, matmul -> {fused.name} "
                f"(scale={found.scale:.6g})"
            )
            return Rewritten(result)

        return ctx.rewrite(program, [Rule("softmax-attention", Pat(_SOFTMAX, name="softmax"), fuse)])


@dataclass
class _Mask:
    """One additive term of the scores: ``term`` (a ``where``'s condition when ``fill`` is set: then
    ``where(term, 0, fill)``, or ``where(term, fill, 0)`` when ``fill_where_true``) times ``factor`` (the scale
    factors applied after it), added to scores of shape ``shape`` and ``dtype`` (the flattened
    ``[batch * heads, L, S]`` for BLOOM's ALiBi)."""

    term: fx.Node
    factor: float
    shape: list
    dtype: torch.dtype
    fill: float | None = None
    fill_where_true: bool = False

    @property
    def kind(self) -> str:
        return "mask" if self.fill is None else "where-mask"

    def build(self, graph: fx.Graph, scores: list, created: list[fx.Node]) -> fx.Node:
        """The term as a mask of SDPA's scores (of shape ``scores``); its new nodes are appended to ``created``."""

        def call(target, *args, **kwargs) -> fx.Node:
            created.append(graph.call_function(target, args, kwargs))
            return created[-1]

        value = self.term
        if self.fill is not None:
            fill, zero = (call(aten.scalar_tensor.default, x, dtype=self.dtype) for x in (self.fill, 0.0))
            value = call(aten.where.self, value, *((fill, zero) if self.fill_where_true else (zero, fill)))
        if self.factor != 1.0:
            value = call(aten.mul.Tensor, value, self.factor)
        if self.shape != scores:  # added to the flattened scores: the same elements in SDPA's shape
            term = shape_of(self.term)
            if len(term) == len(self.shape) and term[:-2] == self.shape[:-2]:  # every batch dim: regrouped
                value = call(aten.reshape.default, value, scores[:-2] + term[-2:])
            else:
                value = call(aten.expand.default, value, self.shape)
                value = call(aten.view.default, call(aten.clone.default, value), scores)
        return value


@dataclass
class _Attention:
    root: fx.Node  # the output of the second matmul, replaced by the SDPA
    query: fx.Node
    key: fx.Node | None  # None when only Kᵀ is in the graph
    key_t: fx.Node | None  # None when Kᵀ is only the transpose of a flattened K (BLOOM, DeBERTa)
    value: fx.Node
    masks: list[_Mask]
    scale: float
    nodes: list[fx.Node]  # everything the SDPA replaces


#: A fill at most this negative is absorbed by any score below 1e30 in magnitude (float32's, bfloat16's):
#: ``s + fill`` rounds to ``fill``, so ``where(c, s, fill)`` equals ``s + where(c, 0, fill)``.
_ABSORBING_FILL = -1e30


def _match(softmax: fx.Node) -> _Attention | Skip:
    """The attention around ``softmax``, or why it is not one."""
    rank = len(shape_of(softmax))
    if rank < 3:
        return Skip("scores of rank < 3")
    if softmax.args[1] not in (-1, rank - 1) or softmax.args[2]:
        return Skip("softmax over another dimension or into another dtype")
    nodes = [softmax]
    masks: list[_Mask] = []
    scale = 1.0
    scores = softmax.args[0]
    # Down from the softmax to the first matmul: reshapes, scale factors and masks, in any order.
    while isinstance(scores, fx.Node) and len(scores.users) == 1 and not is_call(scores, aten.bmm.default):
        if is_call(scores, *VIEWS):
            inner = scores.args[0]
        elif (factor := _scale_factor(scores)) is not None:
            scale *= factor
            inner = scores.args[0]
        elif isinstance(found := _mask_term(scores, scale), tuple):
            inner, mask = found
            masks.append(mask)
        elif isinstance(found, Skip):
            return found
        else:
            break
        nodes.append(scores)
        scores = inner
    first = _matmul(scores, shape_of(softmax))
    if first is None:
        return Skip("the scores are not a batched matmul")
    key_t, key, first_nodes = first.b, first.b_transposed, first.nodes
    query, factor = _unscaled(first.a, first_nodes)  # BART scales Q before the product
    scale *= first.factor * factor
    if len(softmax.users) != 1:
        return Skip("the attention probabilities are used elsewhere")
    root = _consumer(softmax)
    second = _matmul(root, shape_of(root)) if root is not None else None
    if second is None or second.a is not softmax or second.b is None or second.factor != 1.0:
        return Skip("the probabilities are not multiplied by a value tensor")
    value = second.b
    nodes += first_nodes + second.nodes
    if key_t is not None and is_call(key_t, aten.permute.default) and _swaps_last_two(key_t):
        key = key_t.args[0]
        if len(key_t.users) == 1:
            nodes.append(key_t)
    if read_outside(nodes, root):
        return Skip("an intermediate value of the attention is used elsewhere")
    batch = shape_of(root)[:-2]
    keys = key_t if key_t is not None else key
    if not shape_of(query)[:-2] == shape_of(keys)[:-2] == shape_of(value)[:-2] == batch:
        return Skip("Q, K and V have different batch dimensions")
    dtypes = {dtype_of(query), dtype_of(keys), dtype_of(value)}
    if dtypes != {dtype_of(softmax)} or not dtype_of(softmax).is_floating_point:
        return Skip(f"Q, K, V and the scores have dtypes {sorted(map(str, dtypes | {dtype_of(softmax)}))}")
    return _Attention(root, query, key, key_t, value, masks, scale, nodes)


def _mask_term(node: fx.Node, scale: float) -> tuple[fx.Node, _Mask] | Skip | None:
    """``(the scores inside, the mask)`` when ``node`` adds a mask to scores, a Skip when it is a mask SDPA
    cannot take, None when it is something else. ``scale``: the factors applied to ``node``'s result."""
    shape = shape_of(node)
    if is_call(node, aten.add.Tensor) and node.kwargs.get("alpha", 1) == 1:
        left, right = node.args
        scores, term = (right, left) if _reaches_matmul(right) else (left, right)
        if not _is_mask(term, node):
            return Skip("the scores are a sum, but neither term is a mask of the scores' dtype and rank >= 2")
        return scores, _Mask(term, scale, shape, dtype_of(node))
    if is_call(node, aten.where.self):  # also masked_fill, which capture decomposes into it
        condition, *values = node.args
        fills = [_fill_value(v) for v in values]
        if dtype_of(condition) != torch.bool or not 2 <= len(shape_of(condition)) <= len(shape):
            return Skip("a where over the scores whose condition is not a boolean mask of rank >= 2")
        if fills[0] is not None and fills[1] is None and isinstance(values[1], fx.Node):
            return values[1], _Mask(condition, scale, shape, dtype_of(node), fills[0], fill_where_true=True)
        if fills[1] is not None and fills[0] is None and isinstance(values[0], fx.Node):
            return values[0], _Mask(condition, scale, shape, dtype_of(node), fills[1])
        return Skip(f"a where over the scores whose fill is not -inf or at most {_ABSORBING_FILL:g}")
    return None


def _fill_value(value: object) -> float | None:
    """The number a ``where`` fills in, when it is one absorbing any score (see ``_ABSORBING_FILL``)."""
    number = _number(value)
    return number if number is not None and number <= _ABSORBING_FILL else None


def _number(value: object) -> float | None:
    """``value`` as a number: a literal, a one-element tensor made in forward (``torch.full([], x)``,
    ``torch.tensor(x)``, which export lifts and clones) or a one-element constant; else None."""
    if is_call(value, aten.full.default) and shape_of(value) == [] or is_call(value, aten.scalar_tensor.default):
        value = value.args[-1]
    if is_call(value, aten.clone.default):
        value = value.args[0]
    if is_constant(value):
        tensor = value.meta.get("val")
        if not isinstance(tensor, torch.Tensor) or tensor.numel() != 1:
            return None
        value = float(getattr(*attribute_owner(value.graph.owning_module, value.target)))
    return float(value) if is_number(value) else None


def _is_mask(term: object, scores: fx.Node) -> bool:
    """An additive mask: a tensor of the scores' dtype and rank from 2 (SDPA's least) to theirs, not computed
    from a matmul's product through the ops that lead from the scores to the softmax."""
    value = term.meta.get("val") if isinstance(term, fx.Node) else None
    return (
        isinstance(value, torch.Tensor)
        and value.dtype == dtype_of(scores)
        and 2 <= value.dim() <= scores.meta["val"].dim()
        and not _reaches_matmul(term)
    )


def _reaches_matmul(node: object, depth: int = 8) -> bool:
    """Whether ``node`` is a ``bmm``'s product through at most ``depth`` reshapes, scalings, sums and wheres."""
    if is_call(node, aten.bmm.default):
        return True
    if depth == 0 or not is_call(node, *VIEWS, *MUL, *DIV, aten.add.Tensor, aten.where.self):
        return False
    return any(_reaches_matmul(arg, depth - 1) for arg in node.args)


def _scale_factor(node: object) -> float | None:
    """The number ``node`` multiplies its first argument by, when it is a scaling by a constant."""
    if not is_call(node, *MUL, *DIV):
        return None
    factor = _number(node.args[1])
    if not factor:
        return None
    return factor if node.target in (aten.mul.Tensor, aten.mul.Scalar) else 1.0 / factor


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
        if is_call(user, *VIEWS):
            return user
    return bmm


@dataclass
class _Product:
    """``a @ b * factor``, as :func:`_matmul` finds it."""

    a: fx.Node
    b: fx.Node | None  # None when the graph has only ``b_transposed``
    b_transposed: fx.Node | None  # bᵀ, when b is the transpose of a flattened bᵀ (BLOOM's and DeBERTa's Kᵀ)
    factor: float  # scale factors on the flattened operands
    nodes: list[fx.Node]


def _matmul(out: object, shape: list) -> _Product | None:
    """``out`` (a ``bmm`` or reshapes of one) as a product of operands of rank ``len(shape)``, ``shape`` being
    the product's, as capture spells it."""
    if not isinstance(out, fx.Node):
        return None
    nodes = []
    bmm = out
    while is_call(bmm, *VIEWS):
        nodes.append(bmm)
        bmm = bmm.args[0]
        if len(bmm.users) != 1:
            return None
    if not is_call(bmm, aten.bmm.default) or shape_of(bmm)[-2:] != shape[-2:]:
        return None
    nodes.append(bmm)
    a_flat, a_factor = _unscaled(bmm.args[0], nodes)
    b_flat, b_factor = _unscaled(bmm.args[1], nodes)
    inner = shape_of(bmm.args[0])[-1]
    a, a_nodes = _unflatten_operand(a_flat, shape[:-2] + [shape[-2], inner])
    b, b_nodes = _unflatten_operand(b_flat, shape[:-2] + [inner, shape[-1]])
    b_transposed = None
    if b is None and is_call(b_flat, aten.permute.default) and _swaps_last_two(b_flat) and len(b_flat.users) == 1:
        b_transposed, b_nodes = _unflatten_operand(b_flat.args[0], shape[:-2] + [shape[-1], inner])
        b_nodes.append(b_flat)
    if a is None or (b is None and b_transposed is None):
        return None
    return _Product(a, b, b_transposed, a_factor * b_factor, list(dict.fromkeys(nodes + a_nodes + b_nodes)))


def _unscaled(node: fx.Node, nodes: list[fx.Node]) -> tuple[fx.Node, float]:
    """``node`` before the scalings by constants applied to it last (each read by the next alone) and their
    product; the scalings are appended to ``nodes``."""
    factor = 1.0
    while (f := _scale_factor(node)) is not None and len(node.users) == 1:
        nodes.append(node)
        factor *= f
        node = node.args[0]
    return node, factor


def _unflatten_operand(node: fx.Node, logical: list):
    """The earliest tensor of shape ``logical`` that ``node`` reshapes, and the reshapes in between that the SDPA
    replaces: up to the first one something else reads too (DeBERTa's flattened Q, read by its relative-position
    products as well), which stays with the ones before it."""
    chain: list[fx.Node] = []
    replaced = True
    best = (node, []) if shape_of(node) == logical else (None, [])
    while is_call(node, *_RESHAPES):
        replaced = replaced and len(node.users) == 1
        if replaced:
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
