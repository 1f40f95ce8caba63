"""Folding of eval-mode BatchNorm and per-channel affine constants into convolutions and linear layers."""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.fx as fx

from fxopt.ir.edit import add_constant, inline_function, replace_subgraph
from fxopt.ir.folding import fold_input_affine, fold_output_affine
from fxopt.ir.layers import Affine, Layer, as_affine, as_layer, is_call
from fxopt.ir.meta import stamp_provenance
from fxopt.ir.pattern import Pat, RewriteContext, Rewritten, Rule, RuleSet, Skip
from fxopt.ir.program import Program
from fxopt.ir.traits import ADD, BATCH_STATISTICS, DIV, MUL, SUB
from fxopt.passes.base import Pass, PassContext, option

aten = torch.ops.aten


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
        return ctx.rewrite(program, self._rules(program, ctx))

    def _rules(self, program: Program, ctx: PassContext) -> RuleSet:
        def fold(rewriter: RewriteContext) -> Rewritten | Skip | None:
            affine = as_affine(program, rewriter.root)
            if affine is None:
                return None
            outcomes = [self._fold_after(program, affine, ctx)]
            if not isinstance(outcomes[0], Rewritten):
                outcomes.append(self._fold_before(program, affine, ctx))
            if isinstance(outcomes[-1], Rewritten):
                return outcomes[-1]
            skips = [o for o in outcomes if isinstance(o, Skip)]
            if skips or affine.kind == "batch-norm":  # a constant scale only matters next to a layer
                return skips[0] if skips else Skip("no conv or linear next to it to fold into")
            return None

        return RuleSet(
            [
                Rule(
                    "batch-statistics",
                    Pat(BATCH_STATISTICS, where=_next_to_a_layer),
                    lambda _: Skip("BatchNorm normalizes with batch statistics (no running stats)"),
                ),
                Rule("fold-affine", Pat((*MUL, *DIV, *ADD, *SUB, operator.getitem)), fold),
            ]
        )

    # ------------------------------------------------------------------ layer(x) -> affine

    def _fold_after(self, program: Program, affine: Affine, ctx: PassContext) -> Rewritten | Skip | None:
        """Fold into the layer producing the affine's input."""
        chain, source = [], affine.x
        while is_call(source, aten.permute.default):
            chain.append(source)
            source = source.args[0]
        layer = as_layer(source)
        if layer is None:
            return None
        if any(len(n.users) > 1 for n in [layer.node, *chain]):
            return Skip(f"the {layer.kind} output has other users")
        ndim, channel = layer.node.meta["val"].dim(), layer.channel_dim
        dim = affine.dim
        for permute in chain:  # map the affine's channel dim back through the permutes
            dim = None if dim is None else permute.args[1][dim] % ndim
        if dim is not None and dim != channel:
            return Skip(f"{affine.kind} scales dim {affine.dim}, the {layer.kind}'s channels are another dim")
        if (problem := _dtype_problem(affine, layer)) is not None:
            return Skip(problem)
        channels = layer.node.meta["val"].shape[channel]
        coefficients, transposed, groups = affine.coefficients, layer.transposed, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w, b = fold_output_affine(weight, bias, scale, shift, transposed=transposed, groups=groups)
            return w.to(weight.dtype), b.to(weight.dtype)

        return self._replace(program, affine, layer, fold, chain, ctx, f"{affine.kind}-into-{layer.kind}")

    # ------------------------------------------------------------------ affine -> layer(x)

    def _fold_before(self, program: Program, affine: Affine, ctx: PassContext) -> Rewritten | Skip | None:
        """Fold into the layer reading the affine's output."""
        if len(affine.out.users) != 1:
            return None
        (consumer,) = affine.out.users
        layer = as_layer(consumer)
        if layer is None or consumer.args[0] is not affine.out:
            return None
        if layer.transposed:
            return Skip("a transposed conv after it sums fewer taps at the border")
        if any(layer.padding):
            return Skip("the conv after it pads its input, so the border would change")
        channel = layer.channel_dim
        if affine.dim is not None and affine.dim != channel:
            return Skip(f"{affine.kind} scales dim {affine.dim}, the {layer.kind} reads channels on dim {channel}")
        if (problem := _dtype_problem(affine, layer)) is not None:
            return Skip(problem)
        channels = affine.x.meta["val"].shape[channel]
        coefficients, groups = affine.coefficients, layer.groups

        def fold(weight, bias, *params):
            scale, shift = coefficients(weight.new_zeros(channels, dtype=torch.float32), *params)
            w, b = fold_input_affine(weight, bias, scale, shift, groups=groups)
            return w.to(weight.dtype), b.to(weight.dtype)

        return self._replace(
            program, affine, layer, fold, [], ctx, f"{affine.kind}-into-following-{layer.kind}", layer_input=affine.x
        )

    # ------------------------------------------------------------------ rewriting

    def _replace(
        self,
        program: Program,
        affine: Affine,
        layer: Layer,
        fold,
        chain: list[fx.Node],
        ctx: PassContext,
        statistic: str,
        layer_input: fx.Node | None = None,
    ) -> Rewritten | Skip:
        """Emit the layer with folded weight and bias in place of the layer, ``chain`` and the affine, counted as
        ``statistic``. Skips, leaving the graph alone, when the folded weights overflow their dtype.
        """
        graph = program.graph
        inputs = [layer.weight, layer.bias, *affine.params]
        root = affine.out if layer_input is None else layer.node  # the later of the two
        emitted = self._emit(program, fold, inputs, root)
        if isinstance(emitted, Skip):
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
        ctx.count(statistic)
        return Rewritten(result)

    def _emit(
        self, program: Program, fold, inputs: list[fx.Node | None], root: fx.Node
    ) -> tuple[fx.Node, fx.Node, list[fx.Node]] | Skip:
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
            return Skip(f"the folded weights overflow {tensors[0].dtype}")
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
