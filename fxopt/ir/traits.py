"""Op classes several analyses and passes share: one definition each, so that a new op is taught once.

Each is a tuple of ATen overloads (``node.target`` values), for ``is_call(node, *CLASS)`` and ``in`` tests.
"""

import torch

aten = torch.ops.aten

__all__ = ["VIEWS", "SDPA", "ALONG_DIM", "REDUCTIONS"]

#: Same elements, another shape.
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
#: Scaled dot-product attention, what fuse-attention produces and the backends lower as one op.
SDPA = aten.scaled_dot_product_attention.default
#: Ops whose every output along ``dim`` depends on every input along it (a softmax's denominator, running sums).
ALONG_DIM = (aten._softmax.default, aten._log_softmax.default, aten.cumsum.default)
#: Reductions over the dims in their second argument (all dims when it is empty or None).
REDUCTIONS = (aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction)
