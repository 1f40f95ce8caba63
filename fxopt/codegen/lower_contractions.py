"""Lowerings of the contractions fxopt's kernel families compute (:mod:`fxopt.codegen.kernels`): ``linear``,
``addmm``, ``mm``/``matmul`` by a constant weight (the float32 GEMM) and ``scaled_dot_product_attention``. Each asks
its family whether it applies to the node's workload on the target's ISA, and builds the family's kernel with the
tuned or default config; where none applies, TVM's own lowering (or a spelled-out one) runs.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import cast

import torch
import torch.fx as fx

from fxopt.codegen.epilogue import Epilogue, find_epilogue
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32, AttentionInputs
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.layout import read_through
from fxopt.codegen.lower import LoweringError, node_arg, register_lowering, to_relax_constant, tvm_dtype
from fxopt.ir.meta import input_node, optional_input_node
from fxopt.quant.ops import attention_mask

aten = torch.ops.aten


@register_lowering(aten.linear.default)
def _linear(node: fx.Node, importer) -> object:
    """``linear`` of float32 values by a constant weight on an AVX2 or AArch64 CPU: :func:`_dense`. Anything else
    as TVM lowers it."""
    x, weight, bias = input_node(node, 0), input_node(node, 1), optional_input_node(node, 2)
    if not _dense_applies(importer, x, weight, bias, transposed=False):
        return importer._linear(node)
    return _dense(node, importer, x, weight, bias, transposed=False)


@register_lowering(aten.addmm.default)
def _addmm(node: fx.Node, importer) -> object:
    """``addmm(bias, x, weight)`` with a constant ``[in, out]`` weight and a ``[out]`` bias (GPT-2's ``Conv1D``),
    float32 on an AVX2 or AArch64 CPU: :func:`_dense` of the weight transposed. Anything else as TVM lowers it."""

    bias, x, weight = (input_node(node, i) for i in range(3))
    plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    if not (plain and bias.meta["val"].dim() == 1 and _dense_applies(importer, x, weight, bias, transposed=True)):
        return importer._addmm(node)
    return _dense(node, importer, x, weight, bias, transposed=True)


@register_lowering(aten.mm.default)
@register_lowering(aten.matmul.default)
def _matmul(node: fx.Node, importer) -> object:
    """``x @ weight`` with a constant 2-D ``[in, out]`` weight (any leading dims of ``x``), float32 on an AVX2 or
    AArch64 CPU: :func:`_dense` of the weight transposed. Anything else as TVM lowers it (matmul by MetaSchedule)."""
    from tvm import relax

    x, weight = input_node(node, 0), input_node(node, 1)
    if not (weight.meta["val"].dim() == 2 and _dense_applies(importer, x, weight, None, transposed=True)):
        matmul = functools.partial(relax.op.linear_algebra.matmul, out_dtype="float32")
        return importer._binary_op(matmul, operator.matmul)(node)
    return _dense(node, importer, x, weight, None, transposed=True)


def _dense_applies(importer, x: fx.Node, weight: fx.Node, bias: fx.Node | None, transposed: bool) -> bool:
    """Whether ``x`` by the constant ``weight`` is the float32 GEMM family's on the target."""
    values = [a.meta["val"] for a in (x, weight, bias) if isinstance(a, fx.Node)]
    float32 = all(v.dtype == torch.float32 for v in values)
    if importer.isa is None or weight.op != "get_attr" or not float32:
        return False
    return GEMM_F32.applies(_gemm_workload(x, weight, transposed), importer.isa)


def _gemm_workload(x: fx.Node, weight: fx.Node, transposed: bool) -> tuple[int, int, int]:
    """``(rows, in_features, out_features)`` of ``x`` by ``weight`` (``[out, in]``, or ``[in, out]`` when
    ``transposed``)."""
    in_features = x.meta["val"].shape[-1]
    out_features = weight.meta["val"].shape[-1 if transposed else 0]
    return x.meta["val"].numel() // in_features, in_features, out_features


def _dense(node: fx.Node, importer, x: fx.Node, weight: fx.Node, bias: fx.Node | None, transposed: bool) -> object:
    """One call of the float32 GEMM family's kernel (:mod:`fxopt.codegen.kernels.gemm_f32`) over ``x``'s rows by
    ``weight`` (``[out, in]``, or ``[in, out]`` when ``transposed``), packed into panels (output channels short of a
    whole panel zero-padded): a constant weight here, by PyTorch (TVM's constant folding compiled and ran the
    packing ops one by one, 8 s of BERT-base's build); a weight parameter by Relax ops, which an export lifts into
    its weight transform. The elementwise ops after it that the kernel can apply on its tile
    (:func:`fxopt.codegen.epilogue.find_epilogue`) are computed there: the kernel's result is bound to the run's
    last op and nothing to the ops inside it (``importer.absorbed``)."""
    from tvm import relax

    bb = importer.block_builder
    workload = _gemm_workload(x, weight, transposed)
    rows, in_features, out_features = workload
    config = importer.templates.config(GEMM_F32, workload, importer.isa)
    panel = config.tile.panel
    if weight in importer.constants:
        value = importer.constants[weight]
        packed = to_relax_constant(GEMM_F32.pack(value.t() if transposed else value, config))
    else:
        matrix = relax.op.permute_dims(importer.env[weight], [1, 0]) if transposed else importer.env[weight]
        panels = -(-out_features // panel)
        padded = relax.op.nn.pad(matrix, [0, panels * panel - out_features, 0, 0])
        packed = bb.emit(relax.op.permute_dims(relax.op.reshape(padded, [panels, panel, in_features]), [0, 2, 1]))
    epilogue = find_epilogue(node, lambda value: value in importer.env)
    kernel = GEMM_F32.build(workload, config, epilogue)
    args = [
        bb.emit(relax.op.reshape(importer.env[x], [rows, in_features])),
        packed,
        to_relax_constant(torch.zeros(out_features)) if bias is None else importer.env[bias],
    ]
    return call_gemm(node, importer, kernel, args, epilogue)


def call_gemm(node: fx.Node, importer, kernel, args: list, epilogue: Epilogue | None) -> object:
    """Call a float32 GEMM ``kernel`` (added to the module under ``node``'s name) on ``args`` and the epilogue's
    operands; its ``[rows, out]`` result is ``node``'s value or, with an epilogue, the value of the run's last op,
    and nothing that of the ops inside it (``importer.absorbed``: ``node`` too, read by none but the run)."""
    from tvm import relax

    bb = importer.block_builder
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    args += epilogue_operands(importer, epilogue)
    result = epilogue.exit if epilogue else node
    rows = node.meta["val"].numel() // node.meta["val"].shape[-1]
    y = bb.emit(relax.call_tir(kernel, args, relax.TensorType([rows, node.meta["val"].shape[-1]], "float32")))
    y = bb.emit(relax.op.reshape(y, [*result.meta["val"].shape]))
    if epilogue is None:
        return y
    importer.absorbed.update({inner: None for inner in epilogue.nodes[:-1]})
    importer.absorbed[epilogue.exit] = y
    return None


def epilogue_operands(importer, epilogue: Epilogue | None, whole_shape: list[int] | None = None) -> list:
    """The lowered values of ``epilogue``'s operands as its kernel takes them: in their operand shapes, whole
    ones in ``whole_shape`` where given (a convolution's result layout)."""
    from tvm import relax

    bb = importer.block_builder
    values = []
    for operand, shape in zip(epilogue.operands, epilogue.operand_shapes) if epilogue else ():
        whole = whole_shape is not None and len(shape) == 2
        values.append(bb.emit(relax.op.reshape(importer.env[operand], whole_shape if whole else list(shape))))
    return values


@register_lowering(aten.scaled_dot_product_attention.default)
def _sdpa(node: fx.Node, importer) -> object:
    """Float32 4-D attention where the attention family applies (:mod:`fxopt.codegen.kernels.attention_f32`): one
    kernel, the masks (bool, additive, causal) turned into one additive mask first. Anything else spelled out as
    matmul-softmax-matmul.

    TVM's own rule rejects boolean masks (every ``transformers`` model passes
    one), ignores ``scale`` and ``enable_gqa``; this one handles all three and
    ``is_causal``.
    """
    from tvm import relax

    if node_arg(node, 4, "dropout_p", 0.0):
        raise LoweringError(node, "dropout in attention is not deterministic; captured in eval mode it should be 0")
    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    mask = node_arg(node, 3, "attn_mask")
    is_causal = node_arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale")
    operands = [input_node(node, i) for i in range(3)]
    q_val, k_val = operands[0].meta["val"], operands[1].meta["val"]
    dtype = tvm_dtype(q_val.dtype)
    repeats = 0
    if node.kwargs.get("enable_gqa") and q_val.shape[-3] != k_val.shape[-3]:
        repeats = q_val.shape[-3] // k_val.shape[-3]
        k = bb.emit(relax.op.repeat(k, repeats, axis=-3))
        v = bb.emit(relax.op.repeat(v, repeats, axis=-3))
    scale = 1.0 / math.sqrt(q_val.shape[-1]) if scale is None else float(cast(float, scale))
    float32 = all(a.meta["val"].dtype == torch.float32 for a in operands)
    workload = attention_workload(node) if q_val.dim() == 4 else ()
    if importer.isa is not None and workload and float32 and ATTENTION_F32.applies(workload, importer.isa):
        return attention_call(node, importer, (q, k, v), mask, is_causal, scale, repeated=bool(repeats))
    length, source = q_val.shape[-2], k_val.shape[-2]
    neg_inf = relax.const(float("-inf"), dtype)
    axes = list(range(k_val.dim()))
    axes[-1], axes[-2] = axes[-2], axes[-1]
    scores = bb.emit(relax.op.matmul(q, bb.emit(relax.op.permute_dims(k, axes))))
    scores = bb.emit(relax.op.multiply(scores, relax.const(scale, dtype)))
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool).tril()
        scores = bb.emit(relax.op.where(to_relax_constant(causal), scores, neg_inf))
    if mask is not None:
        m = importer.env[mask]
        if mask.meta["val"].dtype == torch.bool:
            scores = bb.emit(relax.op.where(m, scores, neg_inf))
        else:
            scores = bb.emit(relax.op.add(scores, m))
    probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
    return bb.emit(relax.op.matmul(probs, v))


def attention_workload(node: fx.Node) -> tuple[int, ...]:
    """The attention kernel's workload for 4-D attention ``node`` (Q, K, V its first inputs): ``(batch, heads,
    queries, keys, head size)``."""
    q_val, k_val = input_node(node, 0).meta["val"], input_node(node, 1).meta["val"]
    return (*q_val.shape[:3], k_val.shape[-2], q_val.shape[3])


def attention_call(
    node: fx.Node,
    importer,
    values: tuple,
    mask: fx.Node | None,
    is_causal: bool,
    scale: float,
    repeated: bool = False,
    levels: tuple = (),
) -> object:
    """``node``'s attention as one call of the attention kernel (:mod:`fxopt.codegen.kernels.attention_f32`), its
    Q, K and V its first three inputs, lowered as ``values`` (K and V ``repeated`` for grouped queries: then read
    as they are). The masks (bool, additive, causal) become one additive mask; Q, K and V are read where their
    chains of views start; the result is written with the heads merged where only the transpose merging them
    reads it. ``levels``: int8 attention's per-head scales of Q, K and V (lowered values; ``fxopt::attention_q``)."""
    from tvm import relax

    bb = importer.block_builder
    operands = [input_node(node, i) for i in range(3)]
    q_val = operands[0].meta["val"]
    workload = _, _, length, source, _ = attention_workload(node)
    mask_shape = [1, 1, *(mask.meta["val"].shape if mask is not None else ())][-4:]
    bias_shape = [q_val.shape[0] if mask_shape[0] > 1 else 1, q_val.shape[1] if mask_shape[1] > 1 else 1]
    bias_shape += [length, source]
    if mask is None or mask in importer.constants:
        # Computed here: TVM's constant folding compiles and runs each op on constants (0.1 s per layer).
        constant = None if mask is None else importer.constants[mask]
        bias = to_relax_constant(attention_mask(bias_shape, constant, is_causal))
    else:
        m = importer.env[mask]
        neg_inf = relax.const(float("-inf"), "float32")
        bias = bb.emit(relax.op.where(m, relax.const(0.0), neg_inf)) if mask.meta["val"].dtype == torch.bool else m
        if is_causal:
            causal = attention_mask((length, source), None, is_causal=True)
            bias = bb.emit(relax.op.add(bias, to_relax_constant(causal)))
        bias = bb.emit(relax.op.broadcast_to(bias, bias_shape))
    # Q, K and V read where their chains of views, splits and permutes start (a fused projection's result),
    # so the chains' copies go unread and are dropped; not where K and V were repeated for GQA.
    reads = [read_through(a) for a in operands]
    gathers = [g if g.source is not g.node and not (repeated and i) else None for i, g in enumerate(reads)]
    q, k, v = (importer.env[g.source] if g else value for g, value in zip(gathers, values))
    # Written heads inside when all that reads it is the transpose merging the heads: that is then free.
    (reader,) = node.users if len(node.users) == 1 else (None,)
    merge = reader is not None and _swaps_heads_and_rows(reader)
    shape = [q_val.shape[i] for i in ((0, 2, 1, 3) if merge else range(4))]
    config = importer.templates.config(ATTENTION_F32, workload, importer.isa)
    vnni = bool(levels) and importer.isa.vnni
    if vnni and length % min(config.rows, length):  # VNNI's dot products take whole tiles: the largest that divides
        whole = [c for c in ATTENTION_F32.space(workload, importer.isa) if length % c.rows == 0]
        config = max(whole, key=lambda c: c.rows * c.vectors, default=config)
    inputs = AttentionInputs(tuple(bias_shape), scale, tuple(gathers), merge, quantized=bool(levels), vnni=vnni)
    kernel = ATTENTION_F32.build(workload, config, inputs)
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    out = bb.emit(relax.call_tir(kernel, [q, k, v, bias, *levels], relax.TensorType(shape, "float32")))
    if not merge:
        return out
    importer.absorbed[reader] = out
    return bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))  # read by none but the transpose: left unused


def _swaps_heads_and_rows(node: fx.Node) -> bool:
    """``node`` is ``transpose(x, 1, 2)`` or ``permute(x, [0, 2, 1, 3])`` of a 4-D ``x``."""
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in cast(tuple[int, int], node.args[1:3])) == [1, 2]
    return node.target is aten.permute.default and [d % 4 for d in cast(list[int], node.args[1])] == [0, 2, 1, 3]
