"""Op classes that analyses, passes and the backend share: one definition each, so that a new op is taught once.

Each is a tuple of ATen overloads (``node.target`` values), for ``is_call(node, *CLASS)`` and ``in`` tests, or one
overload. A class one file alone uses, with a meaning only that file needs, stays there.
"""

import operator

import torch

aten = torch.ops.aten

__all__ = [
    "VIEWS",
    "COPIES",
    "DATA_MOVEMENT",
    "SDPA",
    "ALONG_DIM",
    "REDUCTIONS",
    "ADD",
    "SUB",
    "MUL",
    "DIV",
    "ARITHMETIC",
    "ACTIVATIONS",
    "POOLS",
    "AVG_POOLS",
    "CONTRACTIONS",
    "BATCH_NORM",
    "BATCH_STATISTICS",
]

#: Same elements, another shape.
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
#: Same elements, same shape: copies and casts.
COPIES = (aten.clone.default, aten.alias.default, aten._to_copy.default)
#: Ops that only move or relabel data (no arithmetic).
DATA_MOVEMENT = (
    *VIEWS,
    aten.permute.default,
    aten.expand.default,
    aten.unsqueeze.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.select.int,
    aten.slice.Tensor,
    aten.alias.default,
    aten.clone.default,
    aten.t.default,
    aten.transpose.int,
    operator.getitem,
)
#: Scaled dot-product attention, what fuse-attention produces and the backends lower as one op.
SDPA = aten.scaled_dot_product_attention.default
#: Ops whose every output along ``dim`` depends on every input along it (a softmax's denominator, running sums).
ALONG_DIM = (aten._softmax.default, aten._log_softmax.default, aten.cumsum.default)
#: Reductions over the dims in their second argument (all dims when it is empty or None).
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction)
#: Binary arithmetic, by tensor or by number.
ADD = (aten.add.Tensor, aten.add.Scalar)
SUB = (aten.sub.Tensor, aten.sub.Scalar)
MUL = (aten.mul.Tensor, aten.mul.Scalar)
DIV = (aten.div.Tensor, aten.div.Scalar)
#: Elementwise arithmetic of two tensors (broadcasting).
ARITHMETIC = (aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor)
#: Elementwise activations a kernel can apply to its result.
ACTIVATIONS = (
    aten.relu.default,
    aten.gelu.default,
    aten.silu.default,
    aten.sigmoid.default,
    aten.tanh.default,
    aten.hardtanh.default,
    aten.clamp.default,
    aten.leaky_relu.default,
    aten.hardswish.default,
    aten.hardsigmoid.default,
    aten.elu.default,
)
#: Pooling and resizing: the spatial dims change, each channel stays apart.
POOLS = (
    aten.max_pool2d_with_indices.default,
    aten.avg_pool2d.default,
    aten._adaptive_avg_pool2d.default,
    aten.avg_pool1d.default,
    aten.upsample_nearest2d.vec,
    aten.upsample_bilinear2d.vec,
)
AVG_POOLS = (aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default)
#: Matmuls and convolutions: the ops that hold a model's FLOPs.
CONTRACTIONS = (
    aten.convolution.default,
    aten.linear.default,
    aten.mm.default,
    aten.bmm.default,
    aten.addmm.default,
    aten.baddbmm.default,
)
#: Inference BatchNorm, with running statistics: an affine map per channel.
BATCH_NORM = aten._native_batch_norm_legit_no_training.default
#: BatchNorm variants that normalize with the batch's own statistics: nothing constant to fold.
BATCH_STATISTICS = (
    aten._native_batch_norm_legit.default,
    aten._native_batch_norm_legit.no_stats,
    aten._native_batch_norm_legit_functional.default,
    aten.native_batch_norm.default,
)
