"""fxopt's hand-scheduled kernel templates, one family per module (the protocol: :mod:`.base`).

Lowering asks a family whether it :meth:`~.base.KernelFamily.applies` to a node's workload on the target's
:class:`~fxopt.codegen.isa.Isa` and builds its kernel with the tuned or default config
(:class:`fxopt.codegen.templates.TemplateChoices`); tuning (:func:`fxopt.codegen.tune.tune`) finds each family's
kernels in a module by their :data:`~.base.TEMPLATE_ATTR` and times their :meth:`~.base.KernelFamily.space`.
A new family is one module and one line in :data:`FAMILIES`.
"""

from __future__ import annotations

import math

from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32
from fxopt.codegen.kernels.base import TEMPLATE_ATTR, KernelFamily, Workload, parse_workload_key
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32
from fxopt.codegen.kernels.conv2d_int8 import CONV2D_INT8, CONV2D_INT8_7BIT
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32
from fxopt.codegen.kernels.depthwise_int8 import DEPTHWISE_INT8
from fxopt.codegen.kernels.gemm_bf16 import GEMM_BF16
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.kernels.gemm_int8 import GEMM_INT8, GEMM_INT8_7BIT
from fxopt.codegen.kernels.gemm_wq import GEMM_WQ
from fxopt.codegen.kernels.winograd_f32 import WINOGRAD_F32
from fxopt.codegen.kernels.winograd_int8 import WINOGRAD_INT8

__all__ = ["FAMILIES", "template_workloads", "kernel_attrs"]

#: Every kernel family, by name.
FAMILIES: dict[str, KernelFamily] = {
    family.name: family
    for family in (
        GEMM_F32,
        GEMM_INT8,
        GEMM_INT8_7BIT,
        GEMM_BF16,
        GEMM_WQ,
        ATTENTION_F32,
        CONV2D_F32,
        CONV2D_INT8,
        CONV2D_INT8_7BIT,
        DEPTHWISE_F32,
        DEPTHWISE_INT8,
        WINOGRAD_F32,
        WINOGRAD_INT8,
    )
}


def template_workloads(mod) -> list[tuple[KernelFamily, Workload]]:
    """The family and workload of each template kernel in module ``mod`` (once each), the most work first (the
    product of the workload's dimensions)."""
    found = {(name, parse_workload_key(key)) for name, key in map(str.split, kernel_attrs(mod, TEMPLATE_ATTR))}
    return [(FAMILIES[name], workload) for name, workload in sorted(found, key=lambda f: (-math.prod(f[1]), f))]


def kernel_attrs(mod, attr: str) -> set[str]:
    """The values of PrimFunc attribute ``attr`` in module ``mod``, once each."""
    from tvm import tirx

    values = (
        func.attrs.get(attr) for _, func in mod.functions_items() if isinstance(func, tirx.PrimFunc) and func.attrs
    )
    return {str(value) for value in values if value is not None}
