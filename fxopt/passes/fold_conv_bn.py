"""Folding of eval-mode BatchNorm and per-channel affine constants into convolutions and linear layers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, inline_function, replace_subgraph
from fxopt.ir.layers import Affine, Layer, as_affine, as_layer, is_call
from fxopt.ir.meta import describe_node, propagate_meta, stamp_provenance
from fxopt.ir.program import Program
from fxopt.ir.traits import BATCH_STATISTICS
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten

# A fold's result: ("folded", statistic), ("skipped", reason), or None when no layer is there.
_Outcome = tuple[str, str] | None


def _folded(outcome: _Outcome) -> bool:
    return outcome is not None and outcome[0] == "folded"


@dataclass(frozen=True)
class FoldConvBN(Pass):
    """Fold eval-mode BatchNorm, and multiplications/additions by per-channel constants, into convs and linears.

    After a layer: ``BN(conv(x))`` becomes one ``conv`` with scaled weights and
    a new bias, for Conv1d/2d/3d, transposed convs (whose weights hold output
    channels in dim 1, per group), grouped and depthwise convs, with or without
    bias, and ``BatchNorm1d`` after ``Linear`` (also through the
    ``transpose`` that puts a sequence's features on dim 1). ``conv(x) * c``,
    ``/ c``, ``+ c`` and ``- c`` with ``c`` a scalar or per-output-channel
    constant fold the same way.

    Before a layer: ``conv(BN(x))`` folds the scale into the weights and the
    shift into the bias, exactly only when the conv pads nothing: a padded
    border sees zeros rather than the shifted input, so with padding the fold
    would change the border and is skipped. ``linear(BN(x))`` always folds
    (features on the last dim). Transposed convs are not folded before: their
    border outputs sum fewer taps of the shift.

    Exact up to float rounding: the fold computes the same products in another
    order. Arithmetic runs in float32 and the results are cast back, so fp16 and
    bf16 models lose no precision to folding. Skips, with the reason in the
    pass statistics: a layer output that other nodes also read, BatchNorm that
    uses batch statistics (no running stats), non-constant parameters, a
    channel or dtype mismatch, folded fp16 weights that would overflow.

    ``mode=deploy`` folds into new constant weights. ``mode=tune`` (Efficient
    ConvBN Blocks, Huang et al. 2023) keeps weights trainable: the layer
    computes its weight and bias from the original layer and BatchNorm
    parameters at run time, costing about one conv while gradients reach every
    parameter; do not follow it with ``fold-constants`` if you mean to train.

    Run after ``remove-noops`` and ``fold-constants`` (which expose the
    patterns) and before ``cse`` and ``dce`` (which drop the replaced constants).
    """

    name = "fold-conv-bn"
    before = ("quantize",)  # it folds into float layers only
    mode: Literal["deploy", "tune"] = option("deploy", "deploy: constant weights; tune: weights computed at run time")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        changed = False
        # One fold per scan: a fold can expose the next one (conv -> BN -> scale).
        while self._fold_one(program, ctx):
            changed = True
        if changed:
            program.graph_module.recompile()
            propagate_meta(program.graph_module)
        return changed

    def _fold_one(self, program: Program, ctx: PassContext) -> bool:
        for node in program.graph.nodes:
            if node.op == "call_function" and node.target in BATCH_STATISTICS and _next_to_a_layer(node):
                ctx.skip(describe_node(node), "BatchNorm normalizes with batch statistics (no running stats)")
                continue
            affine = as_affine(program, node)
            if affine is None:
                continue
            outcomes = [self._fold_after(program, affine)]
            if not _folded(outcomes[0]):
                outcomes.append(self._fold_before(program, affine))
            if _folded(outcomes[-1]):
                ctx.count(outcomes[-1][1])
                return True
            reasons = [reason for _, reason in filter(None, outcomes)]
            if reasons or affine.kind == "batch-norm":  # a constant scale only matters next to a layer
                reason = reasons[0] if reasons else "no conv or linear next to it to fold into"
                ctx.skip(describe_node(affine.out), reason)
        return False

    # ------------------------------------------------------------------ layer(x) -> affine

    def _fold_after(self, program: Program, affine: Affine) -> _Outcome:
        """Fold into the layer producing the affine's input."""
        chain, source = [], affine.x
        while is_call(source, aten.permute.default):
            chain.append(source)
            source = source.args[0]
        layer = as_layer(source)
        if layer is None:
            return None
        if any(len(n.users) > 1 for n in [layer.node, *chain]):
            return "skipped", f"the {layer.kind} output has other users"
        ndim, channel = layer.node.meta["val"].dim(), layer.channel_dim
        dim = affine.dim
        for permute in chain:  # map the affine's channel dim back through the permutes
            dim = None if dim is None else permute.args[1][dim] % ndim
        if dim is not None and dim != channel:
            return "skipped", f"{affine.kind} scales dim {affine.dim}, the {layer.kind}'s channels are another dim"
        if (problem := _dtype_problem(affine, layer)) is not None:
            return "skipped", problem
        channels = layer.node.meta["val"].shape[channel]
        coefficients, transposed, groups = affine.coefficients, layer.transposed, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w = weight.float()
            if transposed:  # weight [in, out/groups, *k]: the output channel is (group, dim 1)
                shape = (groups, 1, channels // groups) + (1,) * (w.dim() - 2)
                w = (w.reshape(groups, w.shape[0] // groups, *w.shape[1:]) * scale.reshape(shape)).reshape(w.shape)
            else:
                w = w * scale.reshape((-1,) + (1,) * (w.dim() - 1))
            b = shift if bias is None else bias.float() * scale + shift
            return w.to(weight.dtype), b.to(weight.dtype)

        if overflow := self._replace(program, affine, layer, fold, chain):
            return "skipped", overflow
        return "folded", f"{affine.kind}-into-{layer.kind}"

    # ------------------------------------------------------------------ affine -> layer(x)

    def _fold_before(self, program: Program, affine: Affine) -> _Outcome:
        """Fold into the layer reading the affine's output."""
        if len(affine.out.users) != 1:
            return None
        (consumer,) = affine.out.users
        layer = as_layer(consumer)
        if layer is None or consumer.args[0] is not affine.out:
            return None
        if layer.transposed:
            return "skipped", "a transposed conv after it sums fewer taps at the border"
        if any(layer.padding):
            return "skipped", "the conv after it pads its input, so the border would change"
        channel = layer.channel_dim
        if affine.dim is not None and affine.dim != channel:
            return "skipped", f"{affine.kind} scales dim {affine.dim}, the {layer.kind} reads channels on dim {channel}"
        if (problem := _dtype_problem(affine, layer)) is not None:
            return "skipped", problem
        channels = affine.x.meta["val"].shape[channel]
        coefficients, groups = affine.coefficients, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w = weight.float()
            out, per_group = w.shape[0], channels // groups
            # weight [out, in/groups, *k]: input channel ci of output o's group g is g * in/groups + ci
            grouped = w.reshape(groups, out // groups, per_group, -1)
            w_scaled = grouped * scale.reshape(groups, 1, per_group, 1)
            b = (grouped * shift.reshape(groups, 1, per_group, 1)).sum((2, 3)).reshape(out)
            if bias is not None:
                b = b + bias.float()
            return w_scaled.reshape(w.shape).to(weight.dtype), b.to(weight.dtype)

        if overflow := self._replace(program, affine, layer, fold, [], layer_input=affine.x):
            return "skipped", overflow
        return "folded", f"{affine.kind}-into-following-{layer.kind}"

    # ------------------------------------------------------------------ rewriting

    def _replace(self, program: Program, affine: Affine, layer: Layer, fold, chain: list[fx.Node],
                 layer_input: fx.Node | None = None) -> str | None:
        """Emit the layer with folded weight and bias in place of the layer, ``chain`` and the affine.

        Returns why not, leaving the graph alone, when the folded weights overflow their dtype.
        """
        graph = program.graph
        inputs = [layer.weight, layer.bias, *affine.params]
        root = affine.out if layer_input is None else layer.node  # the later of the two
        emitted = self._emit(program, fold, inputs, root)
        if isinstance(emitted, str):
            return emitted
        weight, bias, created = emitted
        args = layer.args_with(layer.node.args[0] if layer_input is None else layer_input, weight, bias)
        with graph.inserting_before(root):
            result = graph.call_function(layer.node.target, args, dict(layer.node.kwargs))
            # Shapes are unchanged; later folds in this pass read them before metadata is re-propagated.
            result.meta["val"] = layer.node.meta["val"]
            created.append(result)
            for permute in reversed(chain):
                result = graph.call_function(aten.permute.default, (result, *permute.args[1:]))
                result.meta["val"] = permute.meta["val"]
                created.append(result)
        replaced = [layer.node, *chain, *affine.nodes]
        stamp_provenance(created, self.name, replaced)
        replace_subgraph(root, result, replaced + [n for n in inputs if n is not None])
        return None

    def _emit(self, program: Program, fold, inputs: list[fx.Node | None],
              root: fx.Node) -> tuple[fx.Node, fx.Node, list[fx.Node]] | str:
        """Nodes for the folded weight and bias (constants, or in tune mode ops on ``inputs``), and all nodes made;
        or why not: folded half-precision weights can overflow (a tiny running variance scales by thousands)
        where the unfolded model's activations did not."""
        present = [n for n in inputs if n is not None]

        def fold_present(*tensors):
            it = iter(tensors)
            return fold(*(None if n is None else next(it) for n in inputs))

        values = [program.get_constant(n.target) for n in present]
        with torch.no_grad():
            tensors = fold_present(*values)
        if not all(bool(t.isfinite().all()) for t in tensors):
            return f"the folded weights overflow {tensors[0].dtype}"
        if self.mode == "tune":
            (weight, bias), created = inline_function(program.graph, fold_present, present, values, root)
            return weight, bias, created
        created = []
        with program.graph.inserting_before(root):
            for tensor, hint in zip(tensors, ("weight", "bias")):
                created.append(program.graph.get_attr(add_constant(program, tensor.contiguous(), f"folded_{hint}")))
        return created[0], created[1], created


# ---------------------------------------------------------------------- recognizing the pieces


def _next_to_a_layer(node: fx.Node) -> bool:
    return as_layer(node.args[0]) is not None or any(as_layer(u) is not None for u in node.users)


def _dtype_problem(affine: Affine, layer: Layer) -> str | None:
    """Why folding would change a dtype (an fp32 constant promoting an fp16 activation), if it would."""
    out, x = affine.out.meta["val"].dtype, affine.x.meta["val"].dtype
    if out != x or x != layer.node.meta["val"].dtype:
        return f"dtype mismatch ({x} in, {out} out)"
    return None

