"""Hand-written normalization chains become one ``rms_norm`` or ``layer_norm`` op."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, read_outside, replace_subgraph
from fxopt.ir.folding import absorb_input_affine
from fxopt.ir.layers import as_layer, is_call, is_constant, is_number
from fxopt.ir.meta import dtype_of, shape_of, stamp_provenance
from fxopt.ir.pattern import Pat, RewriteContext, Rewritten, Rule, Skip
from fxopt.ir.program import Program
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten

_MEAN = aten.mean.dim
_CAST = aten._to_copy.default
_MUL, _DIV, _ADD, _SUB = aten.mul.Tensor, aten.div.Tensor, aten.add.Tensor, aten.sub.Tensor


@dataclass(frozen=True)
class FuseNorms(Pass):
    """Replace spelled-out RMSNorm and LayerNorm chains by one ``aten.rms_norm`` / ``aten.layer_norm``.

    RMSNorm (LLaMA, T5, Mistral...): ``x * rsqrt(mean(x², -1) + eps)`` or
    ``x / sqrt(...)``, on ``x`` itself or on a float32 upcast of it that is
    cast back afterwards, then optionally times a weight vector. LayerNorm:
    ``(x - mean(x)) * rsqrt(var + eps)`` with the variance as
    ``mean((x - mean(x))², -1)`` or a biased ``var(x, -1)``, then optionally
    ``* weight`` and ``+ bias``. Only normalization over the last dimension,
    with the statistics kept (``keepdim``) and a numeric eps; an
    intermediate value used outside the chain leaves it alone (noted).

    Exact up to float rounding: the fused op computes the same formula in
    one kernel (in float32 for half inputs, as the upcast spelling does).
    ``absorb=true`` then folds the elementwise affine of every norm (fused
    here or not) into the linear layers that read it, SliceGPT-style:
    ``linear(norm(x) * w + b)`` becomes ``linear'(norm(x))`` with the weight's
    columns scaled by ``w`` and ``W @ b`` added to its bias; exact up to
    rounding (computed in float64), done only when every reader of the norm
    is a linear with constant weights (noted otherwise).

    Run after ``remove-noops`` (which drops casts to the same dtype) and
    before ``cse`` and ``dce``; ``layernorm-to-rmsnorm`` sees the fused ops.
    """

    name = "fuse-norms"
    before = ("layernorm-to-rmsnorm", "quantize")
    absorb: bool = option(False, "fold each norm's weight and bias into the linear layers reading it")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        def fuse(rewriter: RewriteContext, scaled: fx.Node) -> Rewritten | Skip | None:
            found = _match(scaled)
            if found is None or isinstance(found, Skip):
                return found
            target, root, args, nodes = found
            with program.graph.inserting_before(root):
                fused = program.graph.call_function(target, args)
            stamp_provenance([fused], self.name, nodes)
            replace_subgraph(root, fused, nodes)
            ctx.count(f"{'rms-norms' if target is aten.rms_norm.default else 'layer-norms'}-fused")
            return Rewritten(fused)

        def absorb(rewriter: RewriteContext, norm: fx.Node) -> Rewritten | Skip | None:
            return _absorb_affine(program, norm, ctx, self.name)

        changed = ctx.rewrite(program, [Rule("norm-chain", Pat((_MUL, _DIV), name="scaled"), fuse)])
        if self.absorb:
            norms = (aten.rms_norm.default, aten.layer_norm.default)
            changed = ctx.rewrite(program, [Rule("absorb-norm-affine", Pat(norms, name="norm"), absorb)]) or changed
        return changed


def _absorb_affine(program: Program, norm: fx.Node, ctx: PassContext, pass_name: str) -> Rewritten | Skip | None:
    """Fold the norm's weight and bias into the linears reading it."""
    graph = program.graph
    affine = [
        (i, norm.args[i])
        for i in ((2,) if norm.target is aten.rms_norm.default else (2, 3))
        if len(norm.args) > i and norm.args[i] is not None
    ]
    if not affine:
        return None
    layers = [as_layer(user) for user in norm.users]
    if (
        not all(is_constant(p) for _, p in affine)
        or not layers
        or any(layer is None or not layer.is_linear or layer.node.args[0] is not norm for layer in layers)
    ):
        return Skip("its affine stays: not every reader is a linear layer with constant weights")
    width = norm.args[1][-1]  # fused nodes have no metadata yet
    values = {i: program.get_constant(p.target).double() for i, p in affine}
    scale, shift = values.get(2, torch.ones(width, dtype=torch.float64)), values.get(3)
    for layer in layers:
        weight = program.get_constant(layer.weight.target)
        bias = program.get_constant(layer.bias.target) if layer.bias is not None else None
        scaled, new_bias = absorb_input_affine(weight, bias, scale, shift, in_dim=1)
        constants = [add_constant(program, scaled.to(weight.dtype), f"{layer.weight.target}_absorbed")]
        if new_bias is not None:
            constants.append(add_constant(program, new_bias.to(weight.dtype), f"{layer.node.name}_absorbed_bias"))
        with graph.inserting_before(layer.node):
            nodes = [graph.get_attr(name) for name in constants]
        stamp_provenance(nodes, pass_name, [norm, layer.node])
        layer.node.args = layer.args_with(norm, nodes[0], nodes[1] if len(nodes) > 1 else None)
    for index, _ in affine:
        norm.update_arg(index, None)
    ctx.count("norm-affines-absorbed")
    return Rewritten(norm)


def _match(scaled: fx.Node):
    """``(op, root, args, nodes)`` when ``scaled`` divides by a standard deviation; ``None`` when it does not
    (not a norm at all); :class:`Skip` with the reason when it looks like a norm that cannot be fused."""
    parts = _inverse_std(scaled)
    if parts is None:
        return None
    numerator, variance, eps, nodes = parts
    last = len(shape_of(scaled)) - 1
    # A centred input first: the RMS of x - mean(x) is a LayerNorm, and fuses as one.
    if (centered := _centered(numerator, last)) is not None:
        x, mean_nodes = centered
        stat_nodes = _variance(variance, numerator, x, last)
        if stat_nodes is None:
            return Skip("the denominator is not the variance of the centred input")
        stat_nodes += mean_nodes
        target = aten.layer_norm.default
    elif (rms := _mean_of_square(variance, last)) is not None and rms[0] is numerator:
        x, stat_nodes = rms
        target = aten.rms_norm.default
    else:
        return None
    nodes = [scaled, *nodes, *stat_nodes]
    source, upcast = x, None
    if is_call(x, _CAST) and x.kwargs.get("dtype") == torch.float32 and set(x.kwargs) <= {"dtype"}:
        source, upcast = x.args[0], x
        nodes.append(upcast)
    root = scaled
    if upcast is not None:
        back = _only_user(root)
        if not (
            is_call(back, _CAST) and back.kwargs.get("dtype") == dtype_of(source) and set(back.kwargs) <= {"dtype"}
        ):
            return Skip("the float32 statistics are not cast back to the input dtype")
        nodes.append(back)
        root = back
    weight = bias = None
    if (factor := _affine_operand(_only_user(root), root, _MUL)) is not None:
        weight, root = factor, _only_user(root)
        nodes.append(root)
    if target is aten.layer_norm.default and (term := _affine_operand(_only_user(root), root, _ADD)) is not None:
        bias, root = term, _only_user(root)
        nodes.append(root)
    if read_outside(nodes, root):
        return Skip("an intermediate value of the normalization is used elsewhere")
    if dtype_of(root) != dtype_of(source):
        return Skip(f"the result is {dtype_of(root)}, the input {dtype_of(source)} (a weight of another dtype)")
    shape = [shape_of(source)[-1]]
    if target is aten.rms_norm.default:
        args = (source, shape, weight, eps)
    else:
        args = (source, shape, weight, bias, eps)
    return target, root, args, list(dict.fromkeys(nodes))


def _inverse_std(node: fx.Node):
    """``(numerator, variance, eps, nodes)`` for ``n * rsqrt(v + eps)`` or ``n / sqrt(v + eps)``."""
    if is_call(node, _MUL):
        for numerator, other in (node.args, reversed(node.args)):
            if is_call(other, aten.rsqrt.default):
                root_node = other
                break
        else:
            return None
    elif is_call(node, _DIV) and is_call(node.args[1], aten.sqrt.default):
        numerator, root_node = node.args
    else:
        return None
    shifted = root_node.args[0]
    if not is_call(shifted, _ADD, aten.add.Scalar) or not is_number(shifted.args[1]):
        return None
    return numerator, shifted.args[0], float(shifted.args[1]), [root_node, shifted]


def _reduces_last(node: object, last: int) -> bool:
    """``mean(t, [-1], keepdim=True)``."""
    return (
        is_call(node, _MEAN)
        and [d % (last + 1) for d in node.args[1]] == [last]
        and (node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False))
        and node.kwargs.get("dtype") is None
    )


def _square_of(node: object) -> fx.Node | None:
    if is_call(node, aten.pow.Tensor_Scalar) and node.args[1] == 2:
        return node.args[0]
    if is_call(node, _MUL) and node.args[0] is node.args[1]:
        return node.args[0]
    return None


def _mean_of_square(variance: object, last: int):
    """``(x, nodes)`` when ``variance`` is ``mean(x², -1)``."""
    if not _reduces_last(variance, last):
        return None
    x = _square_of(variance.args[0])
    return None if x is None else (x, [variance, variance.args[0]])


def _centered(node: object, last: int):
    """``(x, nodes)`` when ``node`` is ``x - mean(x, -1)``."""
    if not is_call(node, _SUB) or node.kwargs.get("alpha", 1) != 1:
        return None
    x, mean = node.args
    if not (_reduces_last(mean, last) and mean.args[0] is x):
        return None
    return x, [node, mean]


def _variance(variance: object, centered: fx.Node, x: fx.Node, last: int) -> list[fx.Node] | None:
    """The nodes computing ``variance`` as the biased variance of ``x`` over the last dim, or ``None``."""
    if _reduces_last(variance, last) and _square_of(variance.args[0]) is centered:
        return [variance, variance.args[0]]
    if (
        is_call(variance, aten.var.correction)
        and variance.args[0] is x
        and [d % (last + 1) for d in (variance.args[1] or [])] == [last]
        and variance.kwargs.get("correction") == 0
        and variance.kwargs.get("keepdim")
    ):
        return [variance]
    return None


def _affine_operand(user: fx.Node | None, value: fx.Node, op) -> fx.Node | None:
    """The constant vector ``user`` multiplies or adds ``value`` by, when it is one of the last dim's size."""
    if not is_call(user, op) or (op is _ADD and user.kwargs.get("alpha", 1) != 1):
        return None
    other = user.args[1] if user.args[0] is value else user.args[0]
    if not is_constant(other) or shape_of(other) != [shape_of(value)[-1]]:
        return None
    return other


def _only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None
