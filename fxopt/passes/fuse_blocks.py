"""Structural re-parameterization: multi-branch conv blocks, chains and parallel groups of layers become one layer."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.analysis import node_flops
from fxopt.ir.edit import add_constant, erase_if_dead, replace_subgraph
from fxopt.ir.folding import compose_layers
from fxopt.ir.layers import Layer, as_affine, as_layer, is_call
from fxopt.ir.meta import describe_node, propagate_meta_to, stamp_provenance
from fxopt.ir.pattern import Pat, Rewritten, Rule, Skip
from fxopt.ir.program import Program
from fxopt.ir.traits import AVG_POOLS
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten

_ADD = aten.add.Tensor


@dataclass(frozen=True)
class FuseBlocks(Pass):
    """Merge multi-branch conv blocks, chains of linear layers, and parallel layers into fewer, larger layers.

    Branches (RepVGG, ACNet, DBB): a sum of branches that all read the same
    input, each a conv with constant weights, the input itself (identity), a
    per-channel affine of it (an identity-branch BatchNorm) or an average pool
    (``count_include_pad``), becomes one conv. Smaller kernels are zero-padded
    into the largest at the offset their own padding implies (so 1x3 and 3x1
    branches land in the middle row and column of a 3x3), grouped branches are
    expanded to the coarsest common grouping; only when every branch has the
    same stride and no dilation, and only when the merged conv costs no more
    FLOPs than the branches (a depthwise 3x3 plus a dense 1x1 would not).

    Serial: ``linear(linear(x))``, ``conv1x1(conv(x))`` and ``conv(conv1x1(x))``
    with nothing between them become one layer when that lowers the FLOP count
    (a bottleneck, narrower in the middle, is cheaper left alone). A conv after
    a 1x1 conv that pads merges only when the 1x1 has no bias: its padded border
    would otherwise see the bias rather than zeros.

    Parallel: linears, or convs of the same shape parameters, reading the same
    input (Q/K/V and gate/up projections, Inception 1x1 branches) become one
    wider layer whose output is sliced, when the merged width is at least
    ``min-width``.

    Exact up to float rounding (merged weights are sums and products computed
    in float32 and cast back). Statistics count each kind of fusion; notes name
    the nodes fused and the FLOP change, or why a candidate was left alone. Run
    after ``fold-conv-bn`` (which turns conv+BN branches into plain convs) and
    before ``cse`` and ``dce``.
    """

    name = "fuse-blocks"
    before = ("quantize",)  # it merges float layers only
    branches: bool = option(True, "merge sums of conv/identity/affine/avg-pool branches of one input into one conv")
    serial: bool = option(True, "merge back-to-back linear or 1x1-conv layers when that lowers FLOPs")
    parallel: bool = option(True, "merge layers that read the same input into one wider layer")
    min_width: int = option(0, "merge parallel layers only when their total output width is at least this")

    def __post_init__(self):
        if self.min_width < 0:
            raise ValueError("min-width must be >= 0")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        # In this order, each to a fixed point: two convs that are branches of one block merge into
        # one conv rather than into a wider conv and slices, and a chain merges before its first
        # layer joins a parallel group.
        phases = [
            (
                self.branches,
                Rule(
                    "merge-branches", Pat(_ADD, name="node"), lambda _, node: self._merge_branches(program, node, ctx)
                ),
            ),
            (
                self.serial,
                Rule("merge-serial", Pat.any("node"), lambda _, node: self._merge_serial(program, node, ctx)),
            ),
            # Rooted at each layer: the layers reading the same input as it.
            (
                self.parallel,
                Rule(
                    "merge-parallel",
                    Pat.any("node", where=lambda n: as_layer(n) is not None),
                    lambda _, node: self._merge_parallel(program, node.args[0], ctx),
                ),
            ),
        ]
        changed = False
        for on, rule in phases:
            if on:
                changed = ctx.rewrite(program, [rule]) or changed
        return changed

    # ------------------------------------------------------------------ branches

    def _merge_branches(self, program: Program, node: fx.Node, ctx: PassContext) -> Rewritten | Skip | None:
        if not _is_sum(node) or any(_is_sum(u) and len(node.users) == 1 for u in node.users):
            return None  # not the root of a sum tree
        terms, adds = _sum_terms(node)
        convs = [layer for layer in map(as_layer, terms) if layer is not None and layer.kind == "conv"]
        # The block input: the one every term reads. A residual connection (a conv of the block's
        # last layer plus its input) or a sum of unrelated values has none.
        anchor = next(
            (
                c
                for c in convs
                if all(t is c.node.args[0] or _branch_input(program, t) is c.node.args[0] for t in terms)
            ),
            None,
        )
        if anchor is None:
            return None
        x = anchor.node.args[0]
        where = describe_node(node)
        branches = [_branch(program, t, x) for t in terms]
        if skip := next((b for b in branches if isinstance(b, Skip)), None):
            return skip
        if any(len(t.users) > 1 for t in terms if t is not x):
            return Skip("a branch output has other users")
        strides = {b.stride for b in branches}
        if len(strides) > 1:
            return Skip("the branches have different strides")
        merged = _merge_kernels(branches, node.meta["val"], x.meta["val"], strides.pop())
        if isinstance(merged, Skip):
            return merged
        weight, bias, padding, groups = merged
        out = node.meta["val"]
        after = 2 * out.numel() * math.prod(weight.shape[1:])
        before = sum(node_flops(t) for t in terms)
        if after > before:
            return Skip(f"one conv would cost {after} FLOPs, the branches {before}")
        like = program.get_constant(anchor.weight.target)
        dims = len(padding)
        args = (x, None, None, list(branches[0].stride), list(padding), [1] * dims, False, [0] * dims, groups)
        replaced = [n for b in branches for n in b.nodes] + adds
        merged_conv = self._emit(
            program, node, aten.convolution.default, args, weight.to(like), bias.to(like), replaced
        )
        ctx.count("branches-merged")
        ctx.notes.append(f"merged {len(terms)} branches into one conv at {where}: FLOPs {before} -> {after}")
        return Rewritten(merged_conv)

    # ------------------------------------------------------------------ serial

    def _merge_serial(self, program: Program, node: fx.Node, ctx: PassContext) -> Rewritten | Skip | None:
        second = as_layer(node)
        first = as_layer(node.args[0]) if second is not None else None
        if first is None or len(first.node.users) != 1 or first.is_linear != second.is_linear:
            return None
        w1, w2 = (program.get_constant(layer.weight.target) for layer in (first, second))
        b1, b2 = (None if layer.bias is None else program.get_constant(layer.bias.target) for layer in (first, second))
        if second.is_linear:
            kind, shape_from = "linear", first
        else:
            kind = _serial_conv_kind(first, second, w1, w2, b1)
            if kind is None or isinstance(kind, Skip):
                return kind
            shape_from = second if kind == "pointwise-first" else first
        weight, bias = compose_layers(w1, b1, w2, b2, kind)
        before = node_flops(first.node) + node_flops(second.node)
        out = node.meta["val"]
        rows = out.numel() // out.shape[second.channel_dim]
        after = 2 * rows * weight.shape[0] * math.prod(weight.shape[1:])
        if after >= before:
            return Skip(f"merging with the layer before would raise FLOPs from {before} to {after}")
        dtype = w2.dtype
        args = shape_from.args_with(first.node.args[0], None, None)
        ctx.notes.append(f"merged {first.node.name} into {describe_node(node)}: FLOPs {before} -> {after}")
        merged = self._emit(
            program,
            node,
            node.target,
            args,
            weight.to(dtype),
            None if bias is None else bias.to(dtype),
            [first.node, node],
        )
        ctx.count(f"serial-{second.kind}s-merged")
        return Rewritten(merged)

    # ------------------------------------------------------------------ parallel

    def _merge_parallel(self, program: Program, x: fx.Node, ctx: PassContext) -> Rewritten | Skip | None:
        groups: dict[tuple, list[Layer]] = {}
        for user in x.users:
            layer = as_layer(user)
            if layer is not None and user.args[0] is x and not layer.transposed and layer.groups == 1:
                weight = program.get_constant(layer.weight.target)
                key = (user.target, tuple(weight.shape[1:]), weight.dtype, layer.stride, layer.padding, layer.dilation)
                groups.setdefault(key, []).append(layer)
        for group in groups.values():
            # Twins (the same weight and bias applied twice) are cse's to merge: stacking them would
            # only grow the graph. They share the slice of the layer they repeat.
            twins: dict[tuple, list[Layer]] = {}
            for layer in group:
                twins.setdefault((layer.weight, layer.bias), []).append(layer)
            if len(twins) < 2:
                continue
            layers = [copies[0] for copies in twins.values()]
            widths = [program.get_constant(layer.weight.target).shape[0] for layer in layers]
            if sum(widths) < self.min_width:
                ctx.skip(
                    describe_node(layers[0].node),
                    f"{len(layers)} parallel layers are {sum(widths)} wide, less than min-width={self.min_width}",
                )
                continue
            names = ", ".join(layer.node.name for layer in layers)
            merged = self._emit_parallel(program, x, list(twins.values()), widths)
            ctx.count(f"parallel-{layers[0].kind}s-merged", len(layers))
            ctx.notes.append(f"merged {names} into one {layers[0].kind} {sum(widths)} wide")
            return Rewritten(merged)
        return None

    def _emit_parallel(self, program: Program, x: fx.Node, twins: list[list[Layer]], widths: list[int]) -> fx.Node:
        graph = program.graph
        layers = [copies[0] for copies in twins]
        weights = [program.get_constant(layer.weight.target) for layer in layers]
        weight = torch.cat(weights)
        if all(layer.bias is None for layer in layers):
            bias = None
        else:
            bias = torch.cat(
                [
                    torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
                    if layer.bias is None
                    else program.get_constant(layer.bias.target)
                    for w, layer in zip(weights, layers)
                ]
            )
        order = {n: i for i, n in enumerate(graph.nodes)}
        first = min((layer.node for copies in twins for layer in copies), key=order.__getitem__)
        weight_node, bias_node = self._constants(program, first, weight, bias)
        dim = layers[0].channel_dim
        with graph.inserting_before(first):
            merged = graph.call_function(
                first.target, layers[0].args_with(x, weight_node, bias_node), dict(first.kwargs)
            )
            created = [weight_node, merged] + ([bias_node] if bias_node is not None else [])
            start = 0
            for copies, width in zip(twins, widths):
                piece = graph.call_function(aten.slice.Tensor, (merged, dim, start, start + width))
                created.append(piece)
                start += width
                for layer in copies:
                    layer.node.replace_all_uses_with(piece, propagate_meta=False)
        replaced = [layer.node for copies in twins for layer in copies]
        stamp_provenance(created, self.name, replaced)
        for layer in (layer for copies in twins for layer in copies):
            for node in (layer.node, layer.weight, layer.bias):
                if node is not None:
                    erase_if_dead(node)
        # The slices' shapes are needed by later merges in this pass (they may be a block's input).
        propagate_meta_to(program.graph_module, created)
        return merged

    # ------------------------------------------------------------------ rewriting

    def _constants(
        self, program: Program, before: fx.Node, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> tuple[fx.Node, fx.Node | None]:
        nodes = []
        with program.graph.inserting_before(before):
            for tensor, hint in ((weight, "weight"), (bias, "bias")):
                nodes.append(
                    None
                    if tensor is None
                    else program.graph.get_attr(add_constant(program, tensor.contiguous(), f"fused_{hint}"))
                )
        return nodes[0], nodes[1]

    def _emit(
        self,
        program: Program,
        root: fx.Node,
        target,
        args: tuple,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        replaced: list[fx.Node],
    ) -> fx.Node:
        """Replace ``root`` (and the now unused ``replaced`` nodes and their constants) by one layer."""
        weight_node, bias_node = self._constants(program, root, weight, bias)
        with program.graph.inserting_before(root):
            layer = program.graph.call_function(target, (args[0], weight_node, bias_node, *args[3:]))
        layer.meta["val"] = root.meta["val"]  # the same shape: later merges in this pass read it
        stamp_provenance([n for n in (weight_node, bias_node, layer) if n is not None], self.name, replaced)
        constants = [a for n in replaced for a in n.all_input_nodes if a.op == "get_attr"]
        replace_subgraph(root, layer, replaced + constants)
        return layer


# ---------------------------------------------------------------------- branch analysis


@dataclass
class _Branch:
    """One branch as a conv over the block input: ``weight`` [out, in/groups, *k] (float32, on the CPU)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    groups: int
    padding: tuple[int, ...]
    stride: tuple[int, ...]
    nodes: list[fx.Node]  # what merging removes


def _is_sum(node: object) -> bool:
    return (
        is_call(node, _ADD) and node.kwargs.get("alpha", 1) == 1 and all(isinstance(a, fx.Node) for a in node.args[:2])
    )


def _sum_terms(root: fx.Node) -> tuple[list[fx.Node], list[fx.Node]]:
    """The terms of the sum tree at ``root`` (adds read only by the tree are expanded) and its add nodes."""
    terms, adds, stack = [], [root], list(root.args[:2])
    while stack:
        node = stack.pop()
        if _is_sum(node) and len(node.users) == 1:
            adds.append(node)
            stack.extend(node.args[:2])
        else:
            terms.append(node)
    return terms, adds


def _branch_input(program: Program, term: fx.Node) -> fx.Node:
    """The value a branch computes from: a layer's, affine's or pool's input, else the term itself (identity)."""
    if as_layer(term) is not None or is_call(term, *AVG_POOLS):
        return term.args[0]
    affine = as_affine(program, term)
    return affine.x if affine is not None else term


def _branch(program: Program, term: fx.Node, x: fx.Node) -> _Branch | Skip:
    """``term`` (which reads ``x``) as a conv kernel over ``x``, or why it is not one."""
    val = x.meta["val"]
    channels, dims = val.shape[1], val.dim() - 2
    if term is x:
        return _depthwise(torch.ones(channels), None, dims, [])
    layer = as_layer(term)
    if layer is not None:
        if layer.is_linear or layer.transposed:
            return Skip(f"branch {term.name} is not a convolution")
        if any(d != 1 for d in layer.dilation):
            return Skip(f"branch {term.name} is dilated")
        weight = program.get_constant(layer.weight.target).float().cpu()
        bias = None if layer.bias is None else program.get_constant(layer.bias.target).float().cpu()
        return _Branch(weight, bias, layer.groups, layer.padding, layer.stride, [term])
    affine = as_affine(program, term)
    if affine is not None:
        if affine.dim not in (None, 1):
            return Skip(f"branch {term.name} scales dim {affine.dim}, not the channels")
        scale, shift = affine.evaluate(program, channels, torch.device("cpu"))
        return _depthwise(scale, shift, dims, affine.nodes)
    if is_call(term, *AVG_POOLS):
        return _avg_pool(term, channels, dims)
    return Skip(f"branch {term.name} is not a conv, identity, per-channel affine or average pool of the block input")


def _depthwise(scale: torch.Tensor, shift: torch.Tensor | None, dims: int, nodes: list[fx.Node]) -> _Branch:
    """A per-channel ``x * scale + shift`` as a depthwise 1x1 conv of stride 1."""
    weight = scale.float().reshape(-1, 1, *[1] * dims)
    return _Branch(weight, shift, scale.numel(), (0,) * dims, (1,) * dims, nodes)


def _avg_pool(node: fx.Node, channels: int, dims: int) -> _Branch | Skip:
    defaults = [None, None, None, (0,) * dims, False, True, None]  # x, kernel, stride, padding, ceil, include, div
    args = list(node.args) + defaults[len(node.args) :]
    kernel, stride, padding, ceil_mode, count_include_pad, divisor = args[1:7]

    def per_dim(values) -> tuple[int, ...]:
        return tuple(values) * (dims if len(values) == 1 else 1)

    kernel = per_dim(kernel)
    stride, padding = per_dim(stride or kernel), per_dim(padding)
    if ceil_mode or (any(padding) and not count_include_pad) or divisor is not None:
        return Skip(f"average pool {node.name} does not divide every window by its size")
    weight = torch.full((channels, 1, *kernel), 1 / math.prod(kernel))
    return _Branch(weight, None, channels, padding, stride, [node])


def _merge_kernels(branches: list[_Branch], out: torch.Tensor, x: torch.Tensor, stride: tuple[int, ...]):
    """``(weight, bias, padding, groups)`` of the one conv computing the sum of ``branches``, or why not."""
    channels_in, channels_out = x.shape[1], out.shape[1]
    if any(b.weight.shape[0] != channels_out for b in branches):
        return Skip("an identity-like branch would change the channel count")
    groups = math.gcd(*(b.groups for b in branches))
    padding = tuple(max(b.padding[d] for b in branches) for d in range(len(stride)))
    offsets = [tuple(padding[d] - b.padding[d] for d in range(len(stride))) for b in branches]
    kernel = tuple(max(o[d] + b.weight.shape[2 + d] for o, b in zip(offsets, branches)) for d in range(len(stride)))
    size = tuple((x.shape[2 + d] + 2 * padding[d] - kernel[d]) // stride[d] + 1 for d in range(len(stride)))
    if size != tuple(out.shape[2:]):
        return Skip("the branches' kernels and paddings do not align on one grid")
    weight = torch.zeros(channels_out, channels_in // groups, *kernel)
    bias = torch.zeros(channels_out)
    for branch, offset in zip(branches, offsets):
        window = tuple(slice(o, o + k) for o, k in zip(offset, branch.weight.shape[2:]))
        weight[(slice(None), slice(None), *window)] += _regroup(branch.weight, branch.groups, groups, channels_in)
        if branch.bias is not None:
            bias += branch.bias
    return weight, bias, padding, groups


def _regroup(weight: torch.Tensor, groups: int, coarser: int, channels_in: int) -> torch.Tensor:
    """A grouped conv's weight [out, in/groups, *k] as the same conv with ``coarser`` groups (zeros elsewhere)."""
    out = weight.shape[0]
    result = torch.zeros(out, channels_in // coarser, *weight.shape[2:])
    per_group_in, per_group_out = channels_in // groups, out // groups
    for g in range(groups):
        first_in = g * per_group_in % (channels_in // coarser)  # where group g's inputs start in its coarse group
        rows = slice(g * per_group_out, (g + 1) * per_group_out)
        result[rows, first_in : first_in + per_group_in] = weight[rows]
    return result


# ---------------------------------------------------------------------- serial analysis


def _serial_conv_kind(
    first: Layer, second: Layer, w1: torch.Tensor, w2: torch.Tensor, first_bias: torch.Tensor | None
) -> Literal["pointwise-first", "pointwise-second"] | Skip | None:
    """How two back-to-back convs merge: "pointwise-first" or "pointwise-second"; else :class:`Skip` (why not), or
    ``None`` (they do not chain that way)."""
    if first.transposed or second.transposed or first.groups != 1 or second.groups != 1:
        return None

    def pointwise(layer: Layer, weight: torch.Tensor) -> bool:
        return all(k == 1 for k in weight.shape[2:]) and not any(layer.padding) and all(s == 1 for s in layer.stride)

    if pointwise(second, w2):
        return "pointwise-second"
    if pointwise(first, w1):
        if any(second.padding) and first_bias is not None and bool(first_bias.any()):
            return Skip("the conv pads the output of a 1x1 conv with a bias (its border would see the bias)")
        return "pointwise-first"
    return None
