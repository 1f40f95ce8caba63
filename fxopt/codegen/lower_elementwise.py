"""Lowerings of elementwise ops and normalizations that TVM's importer gets wrong, lacks, or makes slow on CPUs
(scalar libm calls per element, row sums as chains of dependent adds).
"""

from __future__ import annotations

import math

import torch
import torch.fx as fx

from fxopt.codegen.compile import LANE_SUMS
from fxopt.codegen.lower import Lowering, cpu_float32, node_arg, register_lowering, to_relax_constant, tvm_dtype

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt


@register_lowering(aten.cumsum.default)
def _cumsum(node: fx.Node, importer) -> object:
    """TVM keeps the input dtype; PyTorch promotes bool and integer inputs to int64 (GPT-2's position ids)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    out_dtype = tvm_dtype(node.meta["val"].dtype)
    return importer.block_builder.emit(relax.op.cumsum(x, axis=node_arg(node, 1, "dim"), dtype=out_dtype))


@register_lowering(aten.rms_norm.default)
def _rms_norm(node: fx.Node, importer) -> object:
    """``aten.rms_norm`` (absent from TVM's table): eps defaults to the dtype's machine epsilon, as in PyTorch."""
    from tvm import relax

    x = importer.env[node.args[0]]
    shape = list(node_arg(node, 1, "normalized_shape"))
    weight = node_arg(node, 2, "weight")
    eps = node_arg(node, 3, "eps")
    dtype = node.meta["val"].dtype
    eps = torch.finfo(dtype).eps if eps is None else eps
    axes = list(range(-len(shape), 0))
    weight = importer.env[weight] if weight is not None else relax.const(1.0, tvm_dtype(dtype))
    if weight.ty.ndim == 0:
        weight = importer.block_builder.emit(relax.op.broadcast_to(weight, shape))
    return importer.block_builder.emit(relax.op.nn.rms_norm(x, weight, axes=axes, epsilon=eps))


@register_lowering(aten.layer_norm.default)
def _layer_norm(node: fx.Node, importer) -> object:
    """``aten.layer_norm`` without a weight or bias (``elementwise_affine=False``): TVM's importer looked the
    missing ones up and failed (found by tests/property/test_random_dags.py)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    shape = list(node_arg(node, 1, "normalized_shape"))
    dtype = node.meta["val"].dtype
    weight, bias = node_arg(node, 2, "weight"), node_arg(node, 3, "bias")
    gamma = importer.env[weight] if weight is not None else to_relax_constant(torch.ones(shape, dtype=dtype))
    beta = importer.env[bias] if bias is not None else to_relax_constant(torch.zeros(shape, dtype=dtype))
    axes = list(range(-len(shape), 0))
    eps = node_arg(node, 4, "eps", 1e-5)
    if cpu_float32(node, importer) and len(shape) == 1 and shape[0] % importer.isa.lanes() == 0:
        return importer.block_builder.emit_te(
            _layer_norm_in_lanes, x, gamma, beta, eps, importer.isa.lanes(), primfunc_name_hint=node.name
        )
    return importer.block_builder.emit(relax.op.nn.layer_norm(x, gamma, beta, axes=axes, epsilon=eps))


def _layer_norm_in_lanes(x, gamma, beta, eps: float, lanes: int):
    """Layer norm over the last axis with each row's sums taken in ``lanes`` interleaved partial sums (one vector
    register's float32 lanes).

    TOPI's one running sum per row is a chain of dependent adds (its latency, not the adds, sets the speed):
    5x slower than PyTorch on BERT's 128 x 768. Independent sums, added at the end, run at the adds'
    throughput; the two-pass variance is kept (no cancellation).
    """
    from tvm import te

    *rows, width = (int(d) for d in x.shape)
    chunks = width // lanes

    def lane_sums(value, name):
        chunk = te.reduce_axis((0, chunks), f"{name}_chunk")
        partial = te.compute(
            (*rows, lanes),
            lambda *i: te.sum(value(*i[:-1], chunk * lanes + i[-1]), axis=chunk),
            name=name + LANE_SUMS,
        )
        lane = te.reduce_axis((0, lanes), f"{name}_lane")
        total = te.compute(tuple(rows), lambda *i: te.sum(partial(*i, lane), axis=lane), name=f"{name}_sum")
        return te.compute(tuple(rows), lambda *i: total(*i) / width, name=name)

    mean = lane_sums(x, "mean")
    variance = lane_sums(lambda *i: (x(*i) - mean(*i[:-1])) * (x(*i) - mean(*i[:-1])), "variance")
    scale = te.compute(tuple(rows), lambda *i: te.rsqrt(variance(*i) + eps), name="inverse_deviation")
    return te.compute(
        x.shape, lambda *i: (x(*i) - mean(*i[:-1])) * scale(*i[:-1]) * gamma(i[-1]) + beta(i[-1]), name="layer_norm"
    )


@register_lowering(fxopt_ops.crms_norm.default)
def _crms_norm(node: fx.Node, importer) -> object:
    """fxopt's CRMSNorm (:func:`fxopt.ir.ops.crms_norm`): ``x / sqrt((sum(x²) + sum(x)²) / (n + 1) + eps)``."""
    from tvm import relax

    bb = importer.block_builder
    x, eps = importer.env[node.args[0]], node.args[1]
    dtype = node.meta["val"].dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    if compute != dtype:
        x = bb.emit(relax.op.astype(x, tvm_dtype(compute)))
    total = bb.emit(relax.op.sum(x, axis=[-1], keepdims=True))
    squares = bb.emit(relax.op.sum(relax.op.multiply(x, x), axis=[-1], keepdims=True))
    width = node.meta["val"].shape[-1] + 1
    mean_square = relax.op.divide(
        relax.op.add(squares, relax.op.multiply(total, total)), relax.const(float(width), tvm_dtype(compute))
    )
    out = bb.emit(relax.op.multiply(x, relax.op.rsqrt(relax.op.add(mean_square, relax.const(eps, tvm_dtype(compute))))))
    return bb.emit(relax.op.astype(out, tvm_dtype(dtype))) if compute != dtype else out


@register_lowering(aten.gelu.default)
def _gelu(node: fx.Node, importer) -> object:
    """Exact GELU; on CPUs ``erf`` is TVM's polynomial ``fast_erf`` (the GELU stays within 2e-7 of PyTorch's,
    relative to its scale; checked like every lowering): LLVM makes ``erf`` a scalar libm call per element,
    11x slower on MiniLM's MLP."""
    from tvm import relax, topi

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    if node_arg(node, 1, "approximate", "none") == "tanh":
        return bb.emit(relax.op.nn.gelu_tanh(x))
    if not cpu_float32(node, importer):
        return bb.emit(relax.op.nn.gelu(x))
    scaled = bb.emit(relax.op.multiply(x, relax.const(math.sqrt(0.5), "float32")))
    erf = bb.emit_te(topi.fast_erf, scaled, primfunc_name_hint=f"{node.name}_erf")
    half = relax.op.multiply(x, relax.const(0.5, "float32"))
    return bb.emit(relax.op.multiply(half, relax.op.add(erf, relax.const(1.0, "float32"))))


def _fast_on_cpu(op: str, fast: str) -> Lowering:
    """Relax's ``op``, or on CPUs (float32) TOPI's ``fast`` form of it."""

    def lower(node: fx.Node, importer) -> object:
        from tvm import relax, topi

        x = importer.env[node.args[0]]
        if not cpu_float32(node, importer):
            return importer.block_builder.emit(getattr(relax.op, op)(x))
        return importer.block_builder.emit_te(getattr(topi, fast), x, primfunc_name_hint=node.name)

    return lower


# TOPI's polynomial exp and rational tanh, checked against PyTorch like every lowering.
register_lowering(aten.exp.default)(_fast_on_cpu("exp", "fast_exp"))
register_lowering(aten.tanh.default)(_fast_on_cpu("tanh", "fast_tanh"))


@register_lowering(aten.pow.Tensor_Scalar)
def _pow(node: fx.Node, importer) -> object:
    """``x ** n`` for a small whole ``n`` as ``n - 1`` multiplications (GPT-2's ``x ** 3``), else ``power``."""
    from tvm import relax

    bb = importer.block_builder
    x, exponent = importer.env[node.args[0]], node.args[1]
    if not (isinstance(exponent, (int, float)) and float(exponent).is_integer() and 1 <= exponent <= 4):
        return bb.emit(relax.op.power(x, relax.const(exponent, tvm_dtype(node.meta["val"].dtype))))
    result = x
    for _ in range(int(exponent) - 1):
        result = bb.emit(relax.op.multiply(result, x))
    return result


@register_lowering(aten.amax.default)
def _amax(node: fx.Node, importer) -> object:
    """``aten.amax`` (absent from TVM's table; dynamic quantization's per-token range)."""
    from tvm import relax

    dims = node_arg(node, 1, "dim", [])
    axis = list(dims) if dims else None
    return importer.block_builder.emit(
        relax.op.max(importer.env[node.args[0]], axis=axis, keepdims=bool(node_arg(node, 2, "keepdim", False)))
    )
