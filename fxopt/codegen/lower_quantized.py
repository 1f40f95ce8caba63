"""Lowerings of fxopt's quantized ops (:mod:`fxopt.quant.ops`) to Relax: integer kernels, float only at the edges.

int8 ``linear_q`` becomes the int8 GEMM family's kernel (:mod:`fxopt.codegen.kernels.gemm_int8`) where it applies, else
Relax's integer matmul; ``conv_q`` the int8 convolution family's (:mod:`fxopt.codegen.kernels.conv2d_int8`; depthwise:
:mod:`~fxopt.codegen.kernels.depthwise_int8`), else an int32-accumulating conv; ``linear_wq`` the weight-only GEMM
family's (:mod:`fxopt.codegen.kernels.gemm_wq`: integer weights converted in registers), else a dequantize fused
into a TE matmul; ``attention_q`` the attention kernel on integer levels;
``linear_bf16`` the bfloat16 GEMM family's kernel (:mod:`fxopt.codegen.kernels.gemm_bf16`) on CPUs with AVX-512
BF16, else a float32 matmul of the activations rounded to bfloat16 by the weights widened at build time.
Registered in :data:`fxopt.codegen.lower.OVERRIDES` when :mod:`fxopt.codegen` is imported.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.fx as fx

from fxopt.codegen.epilogue import find_epilogue
from fxopt.codegen.intrinsics.x86 import bf16_bits, bf16_value
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32
from fxopt.codegen.kernels.conv2d_f32 import ConvShape
from fxopt.codegen.kernels.conv2d_int8 import CONV2D_INT8, CONV2D_INT8_7BIT, Conv2dInt8, Conv2dInt8Variant, input_block
from fxopt.codegen.kernels.depthwise_int8 import DEPTHWISE_INT8, DepthwiseInt8
from fxopt.codegen.kernels.gemm_bf16 import GEMM_BF16
from fxopt.codegen.kernels.gemm_int8 import (
    GEMM_INT8,
    GEMM_INT8_7BIT,
    GemmInt8,
    GemmInt8Variant,
    dot_instruction,
    seven_bit,
)
from fxopt.codegen.kernels.gemm_wq import GEMM_WQ
from fxopt.codegen.kernels.winograd_int8 import WINOGRAD_INT8, WinogradInt8
from fxopt.codegen.lower import LoweringError, register_lowering, to_relax_constant, tvm_dtype
from fxopt.codegen.lower_contractions import attention_call, attention_workload, call_gemm, epilogue_operands
from fxopt.ir.meta import input_node, optional_input_node
from fxopt.ir.program import attribute_owner
from fxopt.quant import ops as _quant_ops  # noqa: F401  (registers the fxopt:: quantized ops lowered here)
from fxopt.quant.formats import unpack_int4
from fxopt.quant.ops import EXACT_ATTENTION_DIM, EXACT_ATTENTION_KEYS

fxopt_ops = torch.ops.fxopt

Int8ConvFamily = Conv2dInt8 | DepthwiseInt8 | WinogradInt8


def _int8_only(node: fx.Node) -> None:
    if any(isinstance(a, fx.Node) and a.meta["val"].dtype == torch.float8_e4m3fn for a in node.args):
        raise LoweringError(node, "fp8 has no TVM kernels here; fp8 layers run (simulated) in PyTorch")


def _float32(arg: fx.Node, importer) -> object:
    """The lowered value of ``arg`` as float32 (quantized ops compute in float32 whatever the model's dtype)."""
    from tvm import relax

    value = importer.env[arg]
    if arg.meta["val"].dtype == torch.float32:
        return value
    return importer.block_builder.emit(relax.op.astype(value, "float32"))


@register_lowering(fxopt_ops.quantize.default)
def _quantize(node: fx.Node, importer) -> object:
    """``clamp(floor(x / scale + 0.5) + zero_point, -128, 127)`` as int8, rounding exactly as the reference does."""
    from tvm import relax

    if node.args[3] != "int8":
        raise LoweringError(node, f"{node.args[3]} has no TVM kernels here; it runs in PyTorch")
    bb = importer.block_builder
    x = _float32(input_node(node, 0), importer)
    scale, zero_point = importer.env[node.args[1]], importer.env[node.args[2]]
    q = bb.emit(relax.op.floor(relax.op.add(relax.op.divide(x, scale), relax.const(0.5, "float32"))))
    q = bb.emit(relax.op.add(q, relax.op.astype(zero_point, "float32")))
    return bb.emit(relax.op.astype(relax.op.clip(q, -128, 127), "int8"))


def _in_output_dtype(node: fx.Node, bb, y) -> object:
    """Float32 result ``y`` cast to the node's dtype (float16/bfloat16 models)."""
    from tvm import relax

    out_dtype = tvm_dtype(node.meta["val"].dtype)
    return bb.emit(relax.op.astype(y, out_dtype)) if out_dtype != "float32" else y


def _dequantize_accumulator(node: fx.Node, importer, acc, channel_shape: list[int]) -> object:
    """int32 sums → ``out_dtype``: ``acc * (x_scale * w_scale) + bias``, the scales broadcast along
    ``channel_shape``."""
    from tvm import relax

    bb = importer.block_builder
    x_scale, w_scale = importer.env[node.args[1]], importer.env[node.args[4]]
    if input_node(node, 4).meta["val"].dim():
        w_scale = bb.emit(relax.op.reshape(w_scale, channel_shape))
    y = bb.emit(relax.op.multiply(relax.op.astype(acc, "float32"), relax.op.multiply(x_scale, w_scale)))
    bias = optional_input_node(node, 5)
    if bias is not None:
        y = bb.emit(relax.op.add(y, relax.op.reshape(_float32(bias, importer), channel_shape)))
    return _in_output_dtype(node, bb, y)


@register_lowering(fxopt_ops.linear_q.default)
def _linear_q(node: fx.Node, importer) -> object:
    """int8 × int8 → int32 matmul; the activation zero point is subtracted as ``zp * Σ_k w[n, k]`` (a constant).

    Where the int8 GEMM family applies, its kernel with the epilogue inside: the seven-bit one where the weights
    fit it and it applies (AVX2 without VNNI: ``vpmaddubsw``), else the full-range one.
    """
    from tvm import relax

    _int8_only(node)
    weight = _constant(input_node(node, 3))
    out_features, in_features = input_node(node, 3).meta["val"].shape
    x_meta = input_node(node, 0).meta["val"]
    workload = (x_meta.numel() // x_meta.shape[-1], in_features, out_features)
    if importer.isa is not None and weight is not None:
        narrow = GEMM_INT8_7BIT.applies(workload, importer.isa) and seven_bit(weight)
        family = GEMM_INT8_7BIT if narrow else GEMM_INT8
        if family.applies(workload, importer.isa):
            return _linear_q_kernel(node, importer, family, weight, workload)
    bb = importer.block_builder
    xq, zero_point, wq = importer.env[node.args[0]], importer.env[node.args[2]], importer.env[node.args[3]]
    acc = bb.emit(relax.op.matmul(xq, relax.op.permute_dims(wq, [1, 0]), out_dtype="int32"))
    column_sums = relax.op.sum(relax.op.astype(wq, "int32"), axis=[1])
    acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(zero_point, column_sums)))
    return _dequantize_accumulator(node, importer, acc, [-1])


def _constant(node: fx.Node) -> torch.Tensor | None:
    """The tensor a ``get_attr`` node reads, or ``None`` for a computed value."""
    if node.op != "get_attr":
        return None
    return getattr(*attribute_owner(cast(fx.GraphModule, node.graph.owning_module), str(node.target)))


def _linear_q_kernel(
    node: fx.Node, importer, family: GemmInt8, weight: torch.Tensor, workload: tuple[int, int, int]
) -> object:
    """``linear_q`` as one call of int8 GEMM ``family``'s kernel over the rows of the activation, with the float
    ops after it that its tile can apply (:func:`fxopt.codegen.epilogue.find_epilogue`) and, where all that reads
    their result is a per-tensor int8 ``quantize`` (the next quantized layer's input), that quantization too: the
    kernel then writes int8, bound to the ``quantize``, and nothing to the ops inside (``importer.absorbed``)."""
    from tvm import relax

    bb = importer.block_builder
    rows, in_features, out_features = workload
    per_row = input_node(node, 1).meta["val"].numel() > 1 or input_node(node, 2).meta["val"].numel() > 1

    def per_activation(arg: fx.Node, dtype: str):
        value = relax.op.reshape(importer.env[arg], [-1])
        if per_row and arg.meta["val"].numel() == 1:
            value = relax.op.broadcast_to(value, [rows])
        return bb.emit(relax.op.astype(value, dtype))

    w_scale = input_node(node, 4)
    bias = optional_input_node(node, 5)
    float32 = node.meta["val"].dtype == torch.float32
    epilogue = find_epilogue(node, lambda value: value in importer.env) if float32 else None
    requantize = _requantizing(epilogue.exit if epilogue else node, importer) if float32 else None
    variant = GemmInt8Variant(per_row, w_scale.meta["val"].numel() > 1, epilogue, requantize is not None)
    config = importer.templates.config(family, workload, importer.isa)
    kernel = family.build(workload, config, variant)
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    args = [
        bb.emit(relax.op.reshape(importer.env[node.args[0]], [rows, in_features])),
        to_relax_constant(family.pack(weight, config)),
        to_relax_constant(weight.to(torch.int32).sum(1, dtype=torch.int32)),
        per_activation(input_node(node, 2), "int32"),
        per_activation(input_node(node, 1), "float32"),
        bb.emit(relax.op.astype(relax.op.reshape(importer.env[w_scale], [-1]), "float32")),
        to_relax_constant(torch.zeros(out_features)) if bias is None else _float32(bias, importer),
    ]
    args += epilogue_operands(importer, epilogue)
    if requantize is not None:
        args += _requantize_args(requantize, importer)
    dtype = "int8" if requantize is not None else "float32"
    y = bb.emit(relax.call_tir(kernel, args, relax.TensorType([rows, out_features], dtype)))
    if epilogue is None and requantize is None:
        return _in_output_dtype(node, bb, bb.emit(relax.op.reshape(y, [*node.meta["val"].shape])))
    inside = epilogue.nodes if epilogue else []
    writes = requantize if requantize is not None else inside[-1]
    importer.absorbed.update({n: None for n in inside if n is not writes})
    importer.absorbed[writes] = bb.emit(relax.op.reshape(y, [*writes.meta["val"].shape]))
    return None  # read by none but the ops the kernel computed


def _requantizing(result: fx.Node, importer, shared: bool = False) -> fx.Node | None:
    """The ``quantize`` to int8 with one scale and zero point (lowered already, or constants) that reads
    ``result``: all that reads it or, ``shared``, one of its readers; else None."""
    readers = [user for user in result.users if user.target is fxopt_ops.quantize.default and user.args[3] == "int8"]
    if len(readers) != 1 or (len(result.users) > 1 and not shared):
        return None
    params = [input_node(readers[0], 1), input_node(readers[0], 2)]
    known = all(p.meta["val"].numel() == 1 and (p in importer.env or _constant(p) is not None) for p in params)
    return readers[0] if known else None


def _requantize_args(quantize: fx.Node, importer) -> list:
    """The output scale (float32) and zero point (int32), ``[1]`` each, of the ``quantize`` a kernel computes."""
    from tvm import relax

    bb = importer.block_builder
    return [
        bb.emit(relax.op.astype(relax.op.reshape(_value_or_constant(arg, importer), [1]), dtype))
        for arg, dtype in ((input_node(quantize, 1), "float32"), (input_node(quantize, 2), "int32"))
    ]


def _value_or_constant(node: fx.Node, importer) -> object:
    """``node``'s lowered value, or the constant it reads where the graph reads it later (a quantization's
    parameters sit just before the layer reading them)."""
    if node in importer.env:
        return importer.env[node]
    return to_relax_constant(cast(torch.Tensor, _constant(node)))


@register_lowering(fxopt_ops.conv_q.default)
def _conv_q(node: fx.Node, importer) -> object:
    """int8 2-D convolution into int32: the int8 convolution family's kernel where it applies
    (:func:`_conv_q_kernel`), else Relax's conv2d, the zero point's contribution (border-dependent, since padding
    pads the real 0) taken off as ``zp * conv(ones, w)``, a constant."""
    _int8_only(node)
    if input_node(node, 3).meta["val"].dim() != 4:
        raise LoweringError(node, "only 2-D quantized convolutions have a TVM kernel")
    kernel = _conv_q_kernel(node, importer)
    if kernel is not None:
        return kernel
    padding = cast(list[int], node.args[7])
    shape = list(input_node(node, 0).meta["val"].shape)
    return _conv_q_relax(node, importer, importer.env[node.args[0]], shape, [*padding, *padding])


def _conv_q_relax(node: fx.Node, importer, xq, shape: list[int], padding: list[int]) -> object:
    """``conv_q`` of the NCHW int8 ``xq`` of ``shape`` by Relax's int32 conv2d, ``padding`` ``[top, left, bottom,
    right]``: the dequantized NCHW result."""
    from tvm import relax

    bb = importer.block_builder
    zero_point, wq = importer.env[node.args[2]], importer.env[node.args[3]]
    stride, dilation, groups = node.args[6], node.args[8], node.args[9]

    def conv(data):
        return relax.op.nn.conv2d(
            data, wq, strides=stride, padding=padding, dilation=dilation, groups=groups, out_dtype="int32"
        )

    acc = bb.emit(conv(xq))
    ones = to_relax_constant(torch.ones([1, *shape[1:]], dtype=torch.int8))  # one image: the same border
    acc = bb.emit(relax.op.subtract(acc, relax.op.multiply(zero_point, conv(ones))))
    return _dequantize_accumulator(node, importer, acc, [1, -1, 1, 1])


def _conv_q_kernel(node: fx.Node, importer) -> object | None:
    """``conv_q`` as the int8 convolution family's kernel (:func:`_int8_conv_call`), its input blocked NCHW[x]c on
    the way in and its float result NCHW on the way out (int8 copies, then float ones: ``convert-layout``, which
    keeps a network's values blocked, was not run), or None where the family does not apply (grouped, channels
    without a block, a weight computed at run time, a scale per token). Fewer than 4 input channels are read as
    they are (blocks of 1: the kernel re-blocks them)."""
    from tvm import relax

    weight = _constant(input_node(node, 3))
    batch, channels, height, width = input_node(node, 0).meta["val"].shape
    isa = importer.isa
    x_block = input_block(channels, isa) if isa is not None else None
    if weight is None or x_block is None:
        return None
    (pad_h, pad_w) = cast(list[int], node.args[7])
    geometry = (batch, channels, height, width, x_block)
    kernel = _int8_conv_kernel(node, importer, weight, geometry, [pad_h, pad_w] * 2)
    if kernel is None:
        return None
    family, shape = kernel
    bb = importer.block_builder
    blocked = relax.op.reshape(importer.env[node.args[0]], [batch, channels // x_block, x_block, height, width])
    blocked = bb.emit(relax.op.permute_dims(blocked, [0, 1, 3, 4, 2]))
    (y,) = _int8_conv_call(node, importer, family, shape, weight, blocked)
    out_height, out_width, out_block = shape.out_height, shape.out_width, shape.out_block
    y = relax.op.reshape(y, [batch, shape.out_channels // out_block, out_height, out_width, out_block])
    y = bb.emit(relax.op.reshape(relax.op.permute_dims(y, [0, 1, 4, 2, 3]), [*node.meta["val"].shape]))
    return _in_output_dtype(node, bb, y)


@register_lowering(fxopt_ops.conv_q_blocked.default)
def _conv_q_blocked(node: fx.Node, importer) -> object:
    """``conv_q`` in the blocked layout (``convert-layout``'s): the int8 convolution family's kernel (or, with a
    group per channel, the int8 depthwise family's) reading and writing blocked values as they are, where it
    applies; else Relax's int32 conv2d between conversions."""
    from tvm import relax

    _int8_only(node)
    weight = _constant(input_node(node, 3))
    batch, in_blocks, height, width, x_block = input_node(node, 0).meta["val"].shape
    padding, block = cast(list[int], node.args[7]), cast(int, node.args[11])
    geometry = (batch, in_blocks * x_block, height, width, x_block)
    kernel = None if weight is None else _int8_conv_kernel(node, importer, weight, geometry, padding, block)
    bb = importer.block_builder
    if weight is not None and kernel is not None:
        return _int8_conv_with_tail(node, importer, *kernel, weight)
    xq = relax.op.permute_dims(importer.env[node.args[0]], [0, 1, 4, 2, 3])
    plain = [batch, in_blocks * x_block, height, width]
    y = _conv_q_relax(node, importer, bb.emit(relax.op.reshape(xq, plain)), plain, padding)
    _, out_blocks, out_height, out_width, _ = node.meta["val"].shape
    y = relax.op.reshape(y, [batch, out_blocks, block, out_height, out_width])
    return bb.emit(relax.op.permute_dims(y, [0, 1, 3, 4, 2]))


def _int8_conv_kernel(
    node: fx.Node, importer, weight: torch.Tensor, geometry: tuple, padding: list[int], out_block: int | None = None
) -> tuple[Int8ConvFamily, ConvShape] | None:
    """The int8 kernel family for ``conv_q`` (or ``conv_q_blocked``) ``node`` on input ``(N, C, H, W, input
    block)`` padded ``[top, left, bottom, right]`` and its workload: the depthwise family for a group per channel
    (its output in the input's block), else a convolution family (its output in ``out_block``, or unless given,
    the ISA's dot instruction's lanes, else 8): the Winograd one where it is worthwhile and exact, the seven-bit one
    where the weights fit it (``quantize{weight-bits=7}``) and it applies, else the direct one. None where none
    applies (or the activation's scale is not one)."""
    isa = importer.isa
    per_tensor = all(input_node(node, i).meta["val"].numel() == 1 for i in (1, 2))
    if isa is None or not per_tensor:
        return None
    batch, channels, height, width, x_block = geometry
    out_channels, _, kernel_h, kernel_w = weight.shape
    (stride_h, stride_w), (dilation_h, dilation_w) = cast(tuple[list[int], list[int]], (node.args[6], node.args[8]))
    top, left, bottom, right = padding
    groups = cast(int, node.args[9])
    depthwise = groups == channels == out_channels > 1
    family: Int8ConvFamily = DEPTHWISE_INT8 if depthwise else CONV2D_INT8
    lanes = dot_instruction(isa)[0]
    writes = x_block if depthwise else out_block or (lanes if out_channels % lanes == 0 else 8)
    shape = ConvShape(
        batch, channels, height, width, out_channels, kernel_h, kernel_w, stride_h, stride_w, top, left, bottom,
        right, dilation_h, dilation_w, x_block, writes, groups,
    )  # fmt: skip
    applies = family.applies(shape.workload, isa) and out_block in (None, writes)
    winograd = WINOGRAD_INT8.applies(shape.workload, isa) and WINOGRAD_INT8.worthwhile(shape)
    if applies and winograd and WINOGRAD_INT8.exact(weight):
        return WINOGRAD_INT8, shape
    if applies and not depthwise and CONV2D_INT8_7BIT.applies(shape.workload, isa) and seven_bit(weight):
        return CONV2D_INT8_7BIT, shape
    return (family, shape) if applies else None


def _int8_conv_with_tail(
    node: fx.Node, importer, family: Int8ConvFamily, shape: ConvShape, weight: torch.Tensor
) -> object:
    """``conv_q_blocked`` as an int8 convolution family's kernel with the float ops after it that its tile can
    apply (:func:`fxopt.codegen.epilogue.find_epilogue`: ReLU, a residual add) and the per-tensor int8
    ``quantize`` that reads their result, if any: the kernel writes that int8 value (bound to the ``quantize``),
    and the float one too where others read it (a residual block's output, which the next block adds)."""
    bb = importer.block_builder
    float32 = node.meta["val"].dtype == torch.float32
    epilogue = find_epilogue(node, lambda value: value in importer.env) if float32 else None
    inside = epilogue.nodes if epilogue else []
    exit = inside[-1] if inside else node
    requantize = _requantizing(exit, importer, shared=True) if float32 else None
    variant = Conv2dInt8Variant(epilogue, requantize is not None, requantize is not None and len(exit.users) > 1)
    xq = importer.env[node.args[0]]
    results = _int8_conv_call(node, importer, family, shape, weight, xq, variant, requantize)
    if requantize is not None:
        importer.absorbed[requantize] = bb.emit(_blocked_result(results[-1], requantize))
    written = _blocked_result(results[0], exit) if variant.writes_float else None
    if exit is node:
        return written if written is None else _in_output_dtype(node, bb, bb.emit(written))
    importer.absorbed.update({n: None for n in inside[:-1]})
    importer.absorbed[exit] = None if written is None else bb.emit(written)
    return None  # read by none but the ops the kernel computed


def _blocked_result(flat, node: fx.Node) -> object:
    """A kernel's result ``flat`` (``[N, O/y, OH * OW, y]``, or blocked already) in ``node``'s shape: a view,
    never fused (TVM 0.27's FuseTIR failed on a fused reshape reading one result of a kernel with two)."""
    from tvm import relax

    return relax.op.memory.view(flat, [*node.meta["val"].shape])


def _int8_conv_call(
    node: fx.Node,
    importer,
    family: Int8ConvFamily,
    shape: ConvShape,
    weight: torch.Tensor,
    blocked_xq,
    variant: Conv2dInt8Variant | None = None,
    requantize: fx.Node | None = None,
) -> list:
    """``family``'s kernel for ``shape`` on the blocked int8 input ``blocked_xq``, ``weight`` (``[O, C/groups, KH,
    KW]``) packed at build time, with ``variant``'s tail (its requantization that of ``requantize``): its results
    in the family's result shape (float32, int8 or both: :meth:`~fxopt.codegen.kernels.conv2d_int8.Conv2dInt8.build`,
    :meth:`~fxopt.codegen.kernels.depthwise_int8.DepthwiseInt8.build`)."""
    from tvm import relax

    bb = importer.block_builder
    isa = importer.isa
    variant = variant or Conv2dInt8Variant()
    config = importer.templates.config(family, shape.workload, isa)
    kernel = family.build(shape.workload, config, variant)
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    out_channels, w_scale, bias = shape.out_channels, input_node(node, 4), optional_input_node(node, 5)
    per_channel = relax.op.broadcast_to(relax.op.reshape(importer.env[w_scale], [-1]), [out_channels])
    flat = list(family.result_shape(shape))
    if family is DEPTHWISE_INT8:
        weights = [DEPTHWISE_INT8.pack(weight, shape)]
    else:  # and each output channel's weight sum, for the zero point
        if isinstance(family, Conv2dInt8):
            packed = family.pack(weight, shape, family.instruction(isa)[1])
        else:
            packed = WINOGRAD_INT8.pack(weight, shape)
        weights = [packed, weight.to(torch.int32).sum((1, 2, 3), dtype=torch.int32)]
    args = [
        blocked_xq,
        *map(to_relax_constant, weights),
        bb.emit(relax.op.astype(relax.op.reshape(importer.env[node.args[2]], [1]), "int32")),
        bb.emit(relax.op.astype(relax.op.reshape(importer.env[node.args[1]], [1]), "float32")),
        bb.emit(relax.op.astype(per_channel, "float32")),
        to_relax_constant(torch.zeros(out_channels)) if bias is None else _float32(bias, importer),
    ]
    args += epilogue_operands(importer, variant.epilogue, flat)
    if requantize is not None:
        args += _requantize_args(requantize, importer)
    dtypes = (["float32"] if variant.writes_float else []) + (["int8"] if variant.requantized else [])
    types = [relax.TensorType(flat, dtype) for dtype in dtypes]
    call = bb.emit(relax.call_tir(kernel, args, types if len(types) > 1 else types[0]))
    return [bb.emit(relax.TupleGetItem(call, i)) for i in range(len(types))] if len(types) > 1 else [call]


@register_lowering(fxopt_ops.linear_wq.default)
def _linear_wq(node: fx.Node, importer) -> object:
    """Weight-only ``linear``: the weight-only GEMM family's kernel (:mod:`fxopt.codegen.kernels.gemm_wq`: the
    float GEMM's tiles on the integer weights, each group's sums scaled once, or each task's panels dequantized
    once), with the float ops after it that its tile can apply, where it applies (float32 activations, constant
    weights); else one TE kernel that dequantizes each weight element inside the matmul's reduction as the
    reference does, ``(q - zero_point) * scale`` in float32.

    Either way the integer weights stay in the library (int8, or two 4-bit values per byte): a separate
    dequantize op would be folded back into a float weight by ``FoldConstant``, so the dequantization is inside
    the kernel.
    """
    from tvm import relax, te, tirx

    bb = importer.block_builder
    wq, scale, zero_point = (importer.env[a] for a in node.args[1:4])
    bias, bits = optional_input_node(node, 4), cast(int, node.args[5])
    out_features, groups = input_node(node, 2).meta["val"].shape
    x = input_node(node, 0)
    in_features = x.meta["val"].shape[-1]
    group_size = in_features // groups
    workload = (x.meta["val"].numel() // in_features, in_features, out_features, group_size, bits)
    constants = [_constant(input_node(node, i)) for i in (1, 2, 3)]
    float32 = x.meta["val"].dtype == torch.float32
    applies = float32 and importer.isa is not None and GEMM_WQ.applies(workload, importer.isa)
    if applies and all(c is not None for c in constants):
        return _linear_wq_kernel(node, importer, workload, cast(list[torch.Tensor], constants))
    rows = bb.emit(relax.op.reshape(_float32(x, importer), [-1, in_features]))

    def dequantize_matmul(x, wq, scale, zero_point):
        def weight(n, k):
            if bits == 4:  # low nibble first (fxopt.quant.formats.pack_int4)
                nibble = tirx.shift_right(wq[n, k // 2], ((k % 2) * 4).astype("uint8"))
                q = tirx.bitwise_and(nibble, tirx.const(15, "uint8"))
            else:
                q = wq[n, k]
            group = k // group_size
            return (q.astype("float32") - zero_point[n, group]) * scale[n, group]

        k = te.reduce_axis((0, in_features), "k")
        return te.compute(
            (x.shape[0], out_features), lambda i, n: te.sum(x[i, k] * weight(n, k), axis=k), name="dequantize_matmul"
        )

    y = bb.emit_te(dequantize_matmul, rows, wq, scale, zero_point, primfunc_name_hint=node.name)
    if bias is not None:
        y = bb.emit(relax.op.add(y, _float32(bias, importer)))
    y = bb.emit(relax.op.reshape(y, [*node.meta["val"].shape]))
    return _in_output_dtype(node, bb, y)


def _linear_wq_kernel(node: fx.Node, importer, workload: tuple, constants: list[torch.Tensor]) -> object:
    """``linear_wq`` as one call of the weight-only GEMM family's kernel over the activation's rows, its integer
    weights, scales and zero points packed at build time."""
    from tvm import relax

    rows, in_features, out_features, _, bits = workload
    wq, scale, zero_point = constants
    q = unpack_int4(wq) if bits == 4 else wq
    config = importer.templates.config(GEMM_WQ, workload, importer.isa)
    epilogue = find_epilogue(node, lambda value: value in importer.env)
    bias = optional_input_node(node, 4)
    args = [
        importer.block_builder.emit(relax.op.reshape(importer.env[input_node(node, 0)], [rows, in_features])),
        *map(to_relax_constant, GEMM_WQ.pack(q, scale, zero_point, config, bits)),
        to_relax_constant(torch.zeros(out_features)) if bias is None else _float32(bias, importer),
    ]
    return call_gemm(node, importer, GEMM_WQ.build(workload, config, epilogue), args, epilogue)


@register_lowering(fxopt_ops.linear_bf16.default)
def _linear_bf16(node: fx.Node, importer) -> object:
    """bfloat16 ``linear`` with float32 sums: the bfloat16 GEMM family's kernel, with the float ops after it that
    its tile can apply, where it applies (float32 activations, a constant weight, a CPU with AVX-512 BF16). Else
    the same arithmetic in float32: the activations rounded to bfloat16 (and back), times the weights widened to
    float32 (exact), summed in float32 by TVM's matmul."""
    from tvm import relax, te

    bb = importer.block_builder
    x, weight_node, bias = input_node(node, 0), input_node(node, 1), optional_input_node(node, 2)
    out_features, in_features = weight_node.meta["val"].shape
    rows = x.meta["val"].numel() // in_features
    weight = _constant(weight_node)
    float32 = x.meta["val"].dtype == torch.float32
    workload = (rows, in_features, out_features)
    if not (float32 and importer.isa is not None and weight is not None and GEMM_BF16.applies(workload, importer.isa)):
        rounded = bb.emit_te(
            lambda t: te.compute(t.shape, lambda *i: bf16_value(bf16_bits(t(*i))), name="bf16_rounded"),
            _float32(x, importer),
        )
        widened = relax.op.astype(importer.env[weight_node], "float32")
        y = bb.emit(relax.op.matmul(rounded, relax.op.permute_dims(widened, [1, 0])))
        if bias is not None:
            y = bb.emit(relax.op.add(y, _float32(bias, importer)))
        return _in_output_dtype(node, bb, y)
    epilogue = find_epilogue(node, lambda value: value in importer.env)
    config = importer.templates.config(GEMM_BF16, workload, importer.isa)
    args = [
        bb.emit(relax.op.reshape(importer.env[x], [rows, in_features])),
        to_relax_constant(GEMM_BF16.pack(weight, config)),
        to_relax_constant(torch.zeros(out_features)) if bias is None else _float32(bias, importer),
    ]
    return call_gemm(node, importer, GEMM_BF16.build(workload, config, epilogue), args, epilogue)


@register_lowering(fxopt_ops.attention_q.default)
def _attention_q(node: fx.Node, importer) -> object:
    """int8 attention as the attention kernel on int8 levels (:class:`~.kernels.attention_f32.AttentionInputs`
    ``quantized``), where it applies and its sums are exact in float32: x86 with AVX2, float32 Q, K and V, heads of
    at most :data:`~fxopt.quant.ops.EXACT_ATTENTION_DIM` values and :data:`~fxopt.quant.ops.EXACT_ATTENTION_KEYS`
    keys. Else PyTorch runs the reference."""
    q, k, v = (input_node(node, i) for i in range(3))
    mask = optional_input_node(node, 3)
    workload = attention_workload(node)
    source, dim = workload[3:]
    float32 = all(a.meta["val"].dtype == torch.float32 for a in (q, k, v))
    exact = dim <= EXACT_ATTENTION_DIM and source <= EXACT_ATTENTION_KEYS
    if not (float32 and exact and importer.isa is not None and ATTENTION_F32.applies(workload, importer.isa)):
        raise LoweringError(
            node,
            f"int8 attention has a TVM kernel for float32 heads of at most {EXACT_ATTENTION_DIM} values and "
            f"{EXACT_ATTENTION_KEYS} keys on x86 CPUs with AVX2",
        )
    values = tuple(importer.env[a] for a in (q, k, v))
    levels = tuple(importer.env[input_node(node, i)] for i in (4, 5, 6))
    scale, is_causal = float(cast(float, node.args[7])), bool(node.args[8])
    return attention_call(node, importer, values, mask, is_causal, scale, levels=levels)
