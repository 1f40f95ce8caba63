"""Pre-LN → Pre-RMSNorm: recentre everything that writes into a residual stream; its LayerNorms become RMSNorms."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.dims import result_dim, source_dim
from fxopt.ir.edit import add_constant, erase_if_dead, replace_node
from fxopt.ir.folding import absorb_input_affine
from fxopt.ir.layers import as_layer, is_call, is_constant, is_number
from fxopt.ir.meta import describe_node, shape_of, stamp_provenance
from fxopt.ir.program import Program
from fxopt.ir.traits import VIEWS
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten

_LAYER_NORM = aten.layer_norm.default
# Ops that move or copy features without mixing them.
_SHAPE_OPS = (
    *VIEWS,
    aten.permute.default,
    aten.transpose.int,
    aten.expand.default,
    aten.slice.Tensor,
    aten.select.int,
    aten.clone.default,
    aten.alias.default,
)
# Ops that carry stream values into stream values: the mean over the features of the result is zero when it
# is zero for every stream operand (sums, concatenations along other dims, scaling by a number, shape ops).
_COMBINERS = (aten.add.Tensor, aten.cat.default, aten.mul.Tensor, aten.div.Tensor, aten._to_copy.default, *_SHAPE_OPS)


@dataclass(frozen=True)
class LayerNormToRMSNorm(Pass):
    """Turn the LayerNorms of a Pre-LN transformer into RMSNorms, exactly (Pre-RMSNorm, Jiang et al. 2023).

    A LayerNorm removes the mean over the features before scaling. In a
    Pre-LN transformer every LayerNorm reads the residual stream, the sum of
    what embeddings and blocks write into it; if every writer writes a vector
    whose features have zero mean, the stream has zero mean and the LayerNorm
    is an RMSNorm with the same weight, bias and eps. The pass traces each
    stream (the adds, concatenations and shape ops between writers and the
    LayerNorms that read it), recentres its writers (the weight rows and bias
    of a linear, addmm or convolution, the vectors of an embedding table, a
    constant such as a position table: each minus its mean over the
    features), and replaces each LayerNorm by one ``aten.rms_norm`` plus the
    bias. A weight shared with a reader outside the stream (an embedding tied
    to the output head) is untied: the writer gets a recentred copy, the
    head keeps the original.

    ``variant=crms`` (Pre-CRMSNorm) also stores the zero-mean stream in one
    feature less: its last feature is minus the sum of the others. Writers
    keep the first ``d - 1`` features of their recentred weights, views in
    the stream produce ``d - 1``, and each LayerNorm becomes
    ``fxopt::crms_norm``; the norm's weight and bias and the dropped feature
    fold into the linear or addmm layers that read it (through shape ops),
    or, when something else reads it, the whole vector is rebuilt there.

    Exact in real arithmetic; in floats the outputs agree up to rounding. A
    stream is left alone, with the reason in the pass notes, when the
    rewrite would not be exact: a writer that is not a linear map of
    something outside the stream (a LayerNorm's output, as in Post-LN models
    such as BERT; an activation; a model input), a grouped convolution, or
    anything other than a LayerNorm reading the stream (a head without a
    final norm, the stream returned as an output). Models with RMSNorm
    already (LLaMA) have no LayerNorm and are untouched.

    Run after ``fold-constants`` (position tables become constants) and
    ``fuse-norms`` (spelled-out LayerNorms become ``aten.layer_norm``), and
    before ``fold-conv-bn``, which folds the bias that follows each RMSNorm
    into the linear after it. Not in the default pipeline: PyTorch's CPU
    ``rms_norm`` is a composite of several kernels, 2-3x slower in eager
    mode than the fused ``layer_norm`` kernel (benchmarks/README.md);
    compiled backends emit it as one kernel.
    """

    name = "layernorm-to-rmsnorm"
    before = ("quantize",)  # it rewrites the float weights reading each norm
    variant: Literal["rms", "crms"] = option(
        "rms", "rms: Pre-RMSNorm, the stream keeps its width; crms: Pre-CRMSNorm, the stream loses one feature"
    )

    def apply(self, program: Program, ctx: PassContext) -> bool:
        changed = False
        compress = self.variant == "crms"
        for stream in residual_streams(program.graph):
            if compress and stream.width < 2:
                stream.refuse("a stream of one feature has nothing to compress (use variant=rms)")
            if stream.problem is not None:
                ctx.skip(stream.describe(), stream.problem)
                continue
            self._recentre_writers(program, stream, ctx, keep=stream.width - compress)
            for norm in stream.norms:
                if compress:
                    self._replace_by_crms_norm(program, norm, ctx)
                else:
                    _replace_by_rms_norm(norm, self.name)
            if compress:
                _narrow_sizes(stream.values, stream.width)
            ctx.count("layer-norms-converted", len(stream.norms))
            changed = True
        return changed

    def _recentre_writers(self, program: Program, stream: Stream, ctx: PassContext, keep: int) -> None:
        """Recentre every writer of ``stream`` and keep the first ``keep`` of its output features."""
        graph = program.graph
        centred: dict[tuple[str, int], fx.Node] = {}  # one recentred copy per (constant, dim), however many writers

        def recentred(constant: fx.Node, dim: int) -> fx.Node:
            tensor = program.get_constant(constant.target)
            key = (constant.target, dim % tensor.dim())
            if key not in centred:
                wide = tensor.double()
                centred_tensor = (wide - wide.mean(dim, keepdim=True)).narrow(dim, 0, keep)
                name = add_constant(program, centred_tensor.to(tensor.dtype), f"{constant.target}_centred")
                with graph.inserting_after(constant):
                    centred[key] = graph.get_attr(name)
                stamp_provenance([centred[key]], self.name, [constant])
            return centred[key]

        for writer, dim in stream.writers.items():
            if writer.op == "get_attr":
                new = recentred(writer, dim)
                for user in list(writer.users):
                    if user in stream.values:
                        user.replace_input_with(writer, new)
                replaced = [writer]
            else:
                replaced = []
                for index, param_dim in _writer_parameters(writer):
                    constant = writer.args[index] if index < len(writer.args) else None  # linear(x, w): no bias
                    if constant is not None:
                        writer.update_arg(index, recentred(constant, param_dim))
                        replaced.append(constant)
            ctx.count("writers-recentred")
            for constant in replaced:
                if constant.users:
                    ctx.count("weights-untied")  # the stream reads a recentred copy, the other readers the original
                else:
                    erase_if_dead(constant)

    def _replace_by_crms_norm(self, program: Program, norm: fx.Node, ctx: PassContext) -> None:
        """``layer_norm`` of the compressed stream → ``crms_norm``, its affine and the missing feature folded
        into the linear layers reading it, or, when something else reads it, the full vector rebuilt."""
        x, _, weight, bias, eps = _layer_norm_args(norm)
        graph = program.graph
        with graph.inserting_before(norm):
            normed = graph.call_function(torch.ops.fxopt.crms_norm.default, (x, eps))
        created = [normed]
        readers = _linear_readers(norm)
        if readers is not None and all(p is None or is_constant(p) for p in (weight, bias)):
            layers, shape_ops = readers
            width = int(norm.args[1][0])
            gamma = program.get_constant(weight.target).double() if weight is not None else torch.ones(width).double()
            beta = program.get_constant(bias.target).double() if bias is not None else None
            for layer in layers:
                created += _absorb_into(program, layer, gamma, beta)
            _narrow_sizes({op: len(shape_of(op)) - 1 for op in shape_ops}, width)
            norm.replace_all_uses_with(normed, propagate_meta=False)
            graph.erase_node(norm)
            ctx.count("norms-absorbed-into-linears")
        else:
            with graph.inserting_before(norm):
                missing = graph.call_function(
                    aten.neg.default, (graph.call_function(aten.sum.dim_IntList, (normed, [-1], True)),)
                )
                full = graph.call_function(aten.cat.default, ([normed, missing], -1))
                created += [missing.args[0], missing, full]
                if weight is not None:
                    created.append(full := graph.call_function(aten.mul.Tensor, (full, weight)))
                if bias is not None:
                    created.append(full := graph.call_function(aten.add.Tensor, (full, bias)))
            replace_node(norm, full)
            ctx.count("norms-decompressed")
        stamp_provenance(created, self.name, [norm])


@dataclass
class Stream:
    """A residual stream: the values LayerNorms of one width read, back to the nodes that write into it.

    ``values`` holds every node computing (a view of) part of the stream,
    writers included, each with the dim holding the features; ``writers``
    the nodes outside the stream whose outputs it adds up; ``norms`` the
    LayerNorms reading it; ``problem`` the first reason the stream cannot
    be recentred exactly.
    """

    width: int
    norms: list[fx.Node] = field(default_factory=list)
    values: dict[fx.Node, int] = field(default_factory=dict)
    writers: dict[fx.Node, int] = field(default_factory=dict)
    problem: str | None = None

    def refuse(self, reason: str, root_cause: bool = False) -> None:
        """Record why the stream stays; a root cause (Post-LN) explains the others, so it is the one kept."""
        if self.problem is None or root_cause:
            self.problem = reason

    def describe(self) -> str:
        others = len(self.norms) - 1
        more = f" and {others} other LayerNorm{'s' * (others > 1)}" if others else ""
        return f"the residual stream read by {describe_node(self.norms[0])}{more}"


def residual_streams(graph: fx.Graph) -> list[Stream]:
    """The residual streams LayerNorms over the last dim read, each traced back to its writers."""
    streams: list[Stream] = []
    claimed: set[fx.Node] = set()
    for node in graph.nodes:
        if _normalizes_last_dim(node) and node not in claimed:
            stream = _trace(node)
            claimed.update(stream.norms)
            streams.append(stream)
    return streams


def _normalizes_last_dim(node: fx.Node) -> bool:
    return is_call(node, _LAYER_NORM) and len(node.args[1]) == 1


def _trace(norm: fx.Node) -> Stream:
    stream = Stream(width=int(norm.args[1][0]))
    todo = [(norm.args[0], len(shape_of(norm)) - 1)]
    while todo:
        node, dim = todo.pop()
        if node in stream.values:
            if stream.values[node] != dim:
                stream.refuse(f"{describe_node(node)} holds the features in two different dims")
            continue
        stream.values[node] = dim
        if not _combines(node):
            stream.writers[node] = dim
            if (problem := _writer_problem(node, dim)) is not None:
                stream.refuse(problem, root_cause=is_call(node, _LAYER_NORM, aten.rms_norm.default))
        for source in node.all_input_nodes if _combines(node) else ():
            if (source_feature_dim := source_dim(node, dim, source)) is None:
                stream.refuse(
                    f"{describe_node(node)} splits, merges or broadcasts the features of {describe_node(source)}"
                )
            else:
                todo.append((source, source_feature_dim))
        if node.op == "get_attr":
            continue  # a constant's other readers keep the original; the stream reads a recentred copy
        for user in node.users:
            if _normalizes_last_dim(user) and user.args[0] is node and dim == len(shape_of(node)) - 1:
                if int(user.args[1][0]) != stream.width:
                    stream.refuse(
                        f"{describe_node(user)} normalizes {user.args[1][0]} features, the stream has {stream.width}"
                    )
                if user not in stream.norms:
                    stream.norms.append(user)
            elif (forward := _carried(user, node, dim)) is not None:
                todo.append((user, forward))
            elif user.op == "output":
                stream.refuse(f"the model returns {describe_node(node)}, a value of the residual stream")
            else:
                stream.refuse(
                    f"{describe_node(user)} reads the residual stream, and only LayerNorms may "
                    f"(it would see the stream without its mean)"
                )
    return stream


def _combines(node: fx.Node) -> bool:
    """Whether ``node`` keeps the features' mean zero when its tensor inputs have it (see ``_COMBINERS``)."""
    if not is_call(node, *_COMBINERS):
        return False
    if is_call(node, aten.add.Tensor):
        return node.kwargs.get("alpha", 1) == 1 and all(isinstance(a, fx.Node) for a in node.args[:2])
    if is_call(node, aten.mul.Tensor, aten.div.Tensor):
        return is_number(node.args[1]) or (is_call(node, aten.mul.Tensor) and is_number(node.args[0]))
    if is_call(node, aten._to_copy.default):
        return set(node.kwargs) <= {"dtype"}
    return True


def _carried(user: fx.Node, node: fx.Node, dim: int) -> int | None:
    """The dim of ``user``'s output holding the features when ``user`` combines ``node`` into the stream."""
    return result_dim(user, node, dim) if _combines(user) else None


def _writer_parameters(writer: fx.Node) -> list[tuple[int, int]]:
    """``(argument index, feature dim)`` of the constants to recentre in a writer :func:`_writer_problem` accepts."""
    if is_call(writer, aten.addmm.default):
        return [(0, -1), (2, 1)]
    if is_call(writer, aten.embedding.default):
        return [(0, 1)]
    return [(1, 0), (2, 0)]  # linear and convolution: weight rows and bias


def _writer_problem(writer: fx.Node, dim: int) -> str | None:
    """Why recentring the output of ``writer`` along ``dim`` is impossible, or ``None`` when it is not."""
    last = len(shape_of(writer)) - 1
    if writer.op == "get_attr":
        return None
    if is_call(writer, aten.embedding.default) and is_constant(writer.args[0]) and dim == last:
        return None
    if (
        is_call(writer, aten.addmm.default)
        and dim == 1
        and all(map(is_constant, writer.args[0::2]))
        and not writer.kwargs
    ):
        return None
    layer = as_layer(writer)
    if layer is not None and dim == layer.channel_dim:
        if layer.groups != 1 or layer.transposed:
            return (
                f"{describe_node(writer)} writes into the residual stream and is a "
                f"{'transposed' if layer.transposed else 'grouped'} convolution: its output channels "
                f"cannot be recentred through its weights"
            )
        return None
    if is_call(writer, _LAYER_NORM, aten.rms_norm.default):
        return (
            f"{describe_node(writer)} writes its output into the residual stream: the model normalizes "
            f"after the residual add (Post-LN, as BERT does), and only Pre-LN models convert exactly"
        )
    return (
        f"{describe_node(writer)} writes into the residual stream and is not a linear layer, an embedding "
        f"or a constant, so its output cannot be recentred"
    )


def _layer_norm_args(norm: fx.Node) -> tuple:
    """``(x, normalized_shape, weight, bias, eps)`` of a ``layer_norm`` node, defaults filled in."""
    return tuple((list(norm.args) + [None, None, 1e-5][len(norm.args) - 2 :])[:5])


def _replace_by_rms_norm(norm: fx.Node, pass_name: str) -> None:
    """``layer_norm(x, shape, w, b, eps)`` → ``rms_norm(x, shape, w, eps) + b``, for a zero-mean ``x``."""
    x, shape, weight, bias, eps = _layer_norm_args(norm)
    graph = norm.graph
    with graph.inserting_before(norm):
        rms = graph.call_function(aten.rms_norm.default, (x, shape, weight, eps))
        new = [rms]
        if bias is not None:
            new.append(graph.call_function(aten.add.Tensor, (rms, bias)))
    stamp_provenance(new, pass_name, [norm])
    replace_node(norm, new[-1])


def _narrow_sizes(values: dict[fx.Node, int], width: int) -> None:
    """Make the views and expands among ``values`` (node → feature dim) produce ``width - 1`` features."""
    for node, dim in values.items():
        if is_call(node, *VIEWS, aten.expand.default) and node.args[1][dim] == width:
            sizes = list(node.args[1])
            sizes[dim] = width - 1
            node.update_arg(1, sizes)


def _linear_readers(norm: fx.Node) -> tuple[list[fx.Node], list[fx.Node]] | None:
    """The linear and addmm layers (constant weights) reading ``norm``'s output, through shape ops that keep
    the features last, and those shape ops; ``None`` when anything else reads it."""
    layers, shape_ops, todo = [], [], [norm]
    while todo:
        node = todo.pop()
        last = len(shape_of(node)) - 1
        for user in node.users:
            if is_call(user, *_SHAPE_OPS) and result_dim(user, node, last) == len(shape_of(user)) - 1:
                shape_ops.append(user)
                todo.append(user)
            elif (layer := as_layer(user)) is not None and layer.is_linear and user.args[0] is node:
                layers.append(user)
            elif (
                is_call(user, aten.addmm.default)
                and user.args[1] is node
                and not user.kwargs
                and is_constant(user.args[0])
                and is_constant(user.args[2])
            ):
                layers.append(user)
            else:
                return None
    return layers, shape_ops


def _absorb_into(program: Program, layer: fx.Node, gamma: torch.Tensor, beta: torch.Tensor | None) -> list[fx.Node]:
    """Make ``layer``, which read ``gamma * x̂ + beta`` with the full normalized ``x̂``, read the compressed ``x̂``.

    The last feature of ``x̂`` is minus the sum of the others, so its weight column is subtracted from
    theirs; ``beta`` goes into the bias. Returns the new constant nodes.
    """
    if is_call(layer, aten.addmm.default):  # addmm(bias, x, w): w is [in, out]
        bias_index, weight_index, weight_dim = 0, 2, 0
    else:  # linear(x, w, bias): w is [out, in]
        bias_index, weight_index, weight_dim = 2, 1, 1
    weight = program.get_constant(layer.args[weight_index].target)
    old_bias = layer.args[bias_index] if len(layer.args) > bias_index else None
    bias = program.get_constant(old_bias.target) if old_bias is not None else None
    scaled, new_bias = absorb_input_affine(weight, bias, gamma, beta, in_dim=weight_dim)
    kept, last = scaled.narrow(weight_dim, 0, len(gamma) - 1), scaled.narrow(weight_dim, len(gamma) - 1, 1)
    constants = {weight_index: ((kept - last).to(weight.dtype), f"{layer.args[weight_index].target}_compressed")}
    if new_bias is not None:
        constants[bias_index] = (new_bias.to(weight.dtype), f"{layer.name}_compressed_bias")
    args = list(layer.args) + [None] * (3 - len(layer.args))
    nodes = []
    with layer.graph.inserting_before(layer):
        for index, (tensor, name) in constants.items():
            args[index] = layer.graph.get_attr(add_constant(program, tensor, name))
            nodes.append(args[index])
    layer.args = tuple(args)
    return nodes
