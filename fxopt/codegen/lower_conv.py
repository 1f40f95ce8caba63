"""Lowerings of the blocked layout's ops (:mod:`fxopt.ir.ops`, made by the ``convert-layout`` pass): layout
conversions, pools, and convolutions by the direct and depthwise kernel families
(:mod:`fxopt.codegen.kernels.conv2d_f32`, :mod:`~fxopt.codegen.kernels.depthwise_f32`,
:mod:`~fxopt.codegen.kernels.winograd_f32`) where they apply, with the
elementwise ops after them (ReLU, a residual add) on their tiles; elsewhere (other targets, other dtypes) the
convolution converts to NCHW and back around TVM's own."""

from __future__ import annotations

from typing import cast

import torch
import torch.fx as fx

from fxopt.codegen.epilogue import find_epilogue
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels import kernel_attrs
from fxopt.codegen.kernels.base import parse_workload_key, workload_key
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32, Conv2dF32, ConvShape
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32, DepthwiseF32, max_pool
from fxopt.codegen.kernels.winograd_f32 import WINOGRAD_F32, WinogradF32
from fxopt.codegen.lower import register_lowering, to_relax_constant
from fxopt.codegen.lower_contractions import epilogue_operands
from fxopt.ir.meta import input_node, optional_input_node

fxopt_ops = torch.ops.fxopt


def _to_blocked(bb, x, block: int):
    from tvm import relax

    n, c, *spatial = [int(d) for d in x.ty.shape.values]
    if block == 1:  # NCHW itself: no copy
        return bb.emit(relax.op.reshape(x, [n, c, *spatial, 1]))
    split = bb.emit(relax.op.reshape(x, [n, c // block, block, *spatial]))
    return bb.emit(relax.op.permute_dims(split, [0, 1, *range(3, 3 + len(spatial)), 2]))


def _from_blocked(bb, x):
    from tvm import relax

    n, blocks, *spatial, block = [int(d) for d in x.ty.shape.values]
    if block == 1:
        return bb.emit(relax.op.reshape(x, [n, blocks, *spatial]))
    moved = bb.emit(relax.op.permute_dims(x, [0, 1, 2 + len(spatial), *range(2, 2 + len(spatial))]))
    return bb.emit(relax.op.reshape(moved, [n, blocks * block, *spatial]))


@register_lowering(fxopt_ops.to_blocked.default)
def _lower_to_blocked(node: fx.Node, importer) -> object:
    return _to_blocked(importer.block_builder, importer.env[input_node(node, 0)], cast(int, node.args[1]))


@register_lowering(fxopt_ops.from_blocked.default)
def _lower_from_blocked(node: fx.Node, importer) -> object:
    return _from_blocked(importer.block_builder, importer.env[input_node(node, 0)])


@register_lowering(fxopt_ops.pool2d_blocked.default)
def _pool(node: fx.Node, importer) -> object:
    """Max pools of float32 on CPUs with a convolution ISA: the depthwise kernel taking its taps' maximum
    (:func:`~fxopt.codegen.kernels.depthwise_f32.max_pool`; Relax's ran ResNet-50's 3.2x slower than ONNX
    Runtime's); others Relax's pools in the layout ``NCHW{x}c``."""
    from tvm import relax

    _, kind, kernel, stride, padding, dilation, ceil_mode, count_include_pad = node.args
    block = node.meta["val"].shape[-1]
    x = importer.env[input_node(node, 0)]
    isa = importer.isa
    if kind == "max" and isa is not None and (isa.avx2 or isa.neon) and node.meta["val"].dtype == torch.float32:
        shape = _pool_shape(node)
        func = max_pool(shape, DEPTHWISE_F32.default(shape.workload, isa)).with_attr("global_symbol", node.name)
        pool = relax.call_tir(
            importer.block_builder.add_func(func, node.name),
            [x],
            relax.TensorType(list(node.meta["val"].shape), "float32"),
        )
        return importer.block_builder.emit(pool)
    layout = f"NCHW{block}c"
    if kind == "max":
        pool = relax.op.nn.max_pool2d(x, kernel, stride, padding, dilation, ceil_mode, layout=layout)
    else:
        pool = relax.op.nn.avg_pool2d(x, kernel, stride, padding, dilation, ceil_mode, count_include_pad, layout=layout)
    return importer.block_builder.emit(pool)


def _pool_shape(node: fx.Node) -> ConvShape:
    """A blocked pool's window as a depthwise convolution's workload: its bottom and right padding extended to
    the windows a ceil-mode output reads past the input."""
    _, _, kernel, stride, padding, dilation, _, _ = cast(tuple, node.args)
    batch, blocks, height, width, block = input_node(node, 0).meta["val"].shape
    out_height, out_width = node.meta["val"].shape[2:4]
    bottom = (out_height - 1) * stride[0] + (kernel[0] - 1) * dilation[0] + 1 - height - padding[0]
    right = (out_width - 1) * stride[1] + (kernel[1] - 1) * dilation[1] + 1 - width - padding[1]
    channels = blocks * block
    return ConvShape(
        batch, channels, height, width, channels, kernel[0], kernel[1], stride[0], stride[1],
        padding[0], padding[1], max(bottom, 0), max(right, 0), dilation[0], dilation[1], block, block, channels,
    )  # fmt: skip


def conv_shape(node: fx.Node) -> ConvShape:
    """The workload of an ``fxopt::conv2d_blocked`` node."""
    x, weight = input_node(node, 0), input_node(node, 1)
    _, _, _, stride, padding, dilation, groups, block = node.args
    batch, _, height, width, in_block = x.meta["val"].shape
    out_channels, _, kernel_h, kernel_w = weight.meta["val"].shape
    channels = x.meta["val"].shape[1] * in_block
    spatial = [*cast(list[int], stride), *cast(list[int], padding), *cast(list[int], dilation)]
    return ConvShape._make(
        [batch, channels, height, width, out_channels, kernel_h, kernel_w, *spatial, in_block, block, groups]
    )


ConvFamily = Conv2dF32 | DepthwiseF32 | WinogradF32

#: The PrimFunc attribute of a convolution kernel holding the convolution's own shape (its workload key, groups
#: unmerged), which its family's workload may not: tuning times its blocks from it (:func:`conv_shapes`).
CONV_SHAPE_ATTR = "fxopt_conv_shape"


def conv_shapes(mod) -> list[ConvShape]:
    """The shapes of the convolutions whose kernels Relax module ``mod`` holds (once each), the most work first."""
    found = {ConvShape(*parse_workload_key(key)) for key in kernel_attrs(mod, CONV_SHAPE_ATTR)}
    return sorted(found, key=lambda shape: (-shape.pixels * shape.channels * shape.out_channels, shape))


def conv_kernel(shape: ConvShape, isa: Isa) -> tuple[ConvFamily, ConvShape] | None:
    """The kernel family computing a blocked float32 convolution on ``isa`` and the workload it computes, or None:
    the depthwise family for depthwise convolutions; else the groups merged as :func:`merged_groups` merges them,
    then Winograd for 3x3 stride-1 convolutions with enough output tiles
    (:meth:`~fxopt.codegen.kernels.winograd_f32.WinogradF32.worthwhile`), else the direct family."""
    if shape.groups == shape.channels == shape.out_channels and shape.groups > 1:
        return (DEPTHWISE_F32, shape) if DEPTHWISE_F32.applies(shape.workload, isa) else None
    merged = shape._replace(groups=merged_groups(shape))
    if WINOGRAD_F32.applies(merged.workload, isa) and WINOGRAD_F32.worthwhile(merged):
        return WINOGRAD_F32, merged
    return (CONV2D_F32, merged) if CONV2D_F32.applies(merged.workload, isa) else None


def merged_groups(shape: ConvShape) -> int:
    """The most groups, dividing ``shape``'s, whose input and output channels its blocks divide: a block wider than
    a group's channels (ResNeXt-50 32x4d's four a group in blocks of 8 or 16) computes the groups it spans as one,
    its weight zero between them (:func:`block_diagonal`). That multiplies the multiply-adds by the groups merged,
    and an infinite input reaches the other merged groups' outputs as NaN (0 x inf), as Winograd's transforms
    spread one to a tile's pixels; PyTorch's grouped convolution keeps it within its group."""
    divisors = [merged for merged in range(1, shape.groups + 1) if shape.groups % merged == 0]
    return max(merged for merged in divisors if shape._replace(groups=merged).whole_blocks)


def block_diagonal(weight: torch.Tensor, groups: int, merged: int) -> torch.Tensor:
    """A grouped convolution's ``[O, C/groups, KH, KW]`` weight as the same convolution's in ``merged`` groups:
    ``[O, C/merged, KH, KW]``, zero where an output channel's group does not read (``weight`` itself when
    ``merged == groups``)."""
    if merged == groups:
        return weight
    spans = groups // merged  # groups a merged one holds
    out_channels, group_channels, kh, kw = weight.shape
    grouped = weight.reshape(merged, spans, out_channels // groups, 1, group_channels, kh, kw)
    mask = torch.eye(spans, dtype=weight.dtype).reshape(1, spans, 1, spans, 1, 1, 1)
    return (grouped * mask).reshape(out_channels, spans * group_channels, kh, kw)


def _kernel(node: fx.Node, shape: ConvShape, importer) -> tuple[ConvFamily, ConvShape] | None:
    values = [a.meta["val"] for a in node.all_input_nodes]
    if importer.isa is None or not all(v.dtype == torch.float32 for v in values):
        return None
    return conv_kernel(shape, importer.isa)


@register_lowering(fxopt_ops.conv2d_blocked.default)
def _conv(node: fx.Node, importer) -> object:
    """One call of the direct or depthwise family's kernel on the blocked input, the weight packed at build time
    (a constant; a weight parameter is packed by Relax ops, which an export lifts into its weight transform), the
    elementwise ops after it that its tile can apply computed there (``importer.absorbed``, as the GEMM's)."""
    from tvm import relax

    bb = importer.block_builder
    x, weight, bias = input_node(node, 0), input_node(node, 1), optional_input_node(node, 2)
    shape = conv_shape(node)
    chosen = _kernel(node, shape, importer)
    if chosen is None:
        return _conv_through_nchw(node, importer, shape)
    family, computed = chosen
    workload = computed.workload
    config = importer.templates.config(family, workload, importer.isa)
    if weight in importer.constants:
        merged = block_diagonal(importer.constants[weight], shape.groups, computed.groups)
        packed = to_relax_constant(family.pack(merged, computed))
    else:
        packed = _packed_by_relax(bb, importer.env[weight], shape, computed, depthwise=family is DEPTHWISE_F32)
    epilogue = find_epilogue(node, lambda value: value in importer.env)
    kernel = family.build(workload, config, epilogue).with_attr(CONV_SHAPE_ATTR, workload_key(shape.workload))
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    flat = list(family.result_shape(computed))
    args = [
        importer.env[x],
        packed,
        to_relax_constant(torch.zeros(shape.out_channels)) if bias is None else importer.env[bias],
    ]
    args += epilogue_operands(importer, epilogue, flat)
    y = bb.emit(relax.call_tir(kernel, args, relax.TensorType(flat, "float32")))
    result = bb.emit(relax.op.reshape(y, [*node.meta["val"].shape]))
    if epilogue is None:
        return result
    importer.absorbed.update({inner: None for inner in epilogue.nodes[:-1]})
    importer.absorbed[epilogue.exit] = bb.emit(relax.op.reshape(y, [*epilogue.exit.meta["val"].shape]))
    return result  # read by none but the run: left unused


def _packed_by_relax(bb, weight, shape: ConvShape, computed: ConvShape, depthwise: bool):
    """A weight parameter packed as the family's ``pack`` packs a constant (for ``computed``'s groups, merged from
    ``shape``'s as :func:`block_diagonal` merges them)."""
    from tvm import relax

    o, c, kh, kw = [int(d) for d in weight.ty.shape.values]
    x, y = shape.in_block, shape.out_block
    if depthwise:
        split = bb.emit(relax.op.reshape(weight, [o // y, y, kh, kw]))
        return bb.emit(relax.op.permute_dims(split, [0, 2, 3, 1]))
    if computed.groups < shape.groups:
        spans = shape.groups // computed.groups
        grouped = bb.emit(relax.op.reshape(weight, [computed.groups, spans, o // shape.groups, 1, c, kh, kw]))
        mask = to_relax_constant(torch.eye(spans).reshape(1, spans, 1, spans, 1, 1, 1))
        weight, c = bb.emit(relax.op.reshape(relax.op.multiply(grouped, mask), [o, spans * c, kh, kw])), spans * c
    split = bb.emit(relax.op.reshape(weight, [o // y, y, c // x, x, kh, kw]))
    return bb.emit(relax.op.permute_dims(split, [0, 2, 4, 5, 3, 1]))


def _conv_through_nchw(node: fx.Node, importer, shape: ConvShape) -> object:
    """TVM's own convolution, converted to NCHW and back (targets and dtypes no family serves)."""
    from tvm import relax

    bb = importer.block_builder
    x, weight, bias = input_node(node, 0), input_node(node, 1), optional_input_node(node, 2)
    plain = _from_blocked(bb, importer.env[x])
    conv = bb.emit(
        relax.op.nn.conv2d(
            plain,
            importer.env[weight],
            strides=[shape.stride_h, shape.stride_w],
            padding=[shape.pad_top, shape.pad_left, shape.pad_bottom, shape.pad_right],
            dilation=[shape.dilation_h, shape.dilation_w],
            groups=cast(int, node.args[6]),
            out_dtype=str(node.meta["val"].dtype).removeprefix("torch."),
        )
    )
    if bias is not None:
        conv = bb.emit(relax.op.add(conv, relax.op.reshape(importer.env[bias], [1, shape.out_channels, 1, 1])))
    return _to_blocked(bb, conv, shape.out_block)
