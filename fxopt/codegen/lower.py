"""FX → Relax lowering: an op-keyed table on top of TVM's PyTorch importer.

TVM's ``ExportedProgramImporter`` knows most core ATen ops; fxopt keeps its
own table of *overrides* for the ones it gets wrong or lacks (each one tested
numerically in ``tests/codegen/test_lower.py``) and checks every lowered value
against the node's ``meta["val"]`` (shape and dtype), so an importer bug shows
up as a named :class:`LoweringError` and the segment runs in PyTorch instead
of computing something quietly wrong.

Users extend the table with :func:`register_lowering`; the quantized ops' lowerings are in
:mod:`fxopt.codegen.lower_quantized`.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable

import torch
import torch.fx as fx

from fxopt.codegen import x86
from fxopt.codegen.compile import LANE_SUMS
from fxopt.codegen.epilogue import find_epilogue
from fxopt.codegen.isa import Isa
from fxopt.codegen.layout import read_through
from fxopt.codegen.templates import TemplateChoices
from fxopt.errors import CodegenError
from fxopt.ir.meta import describe_node
from fxopt.ir.program import attribute_owner
from fxopt.targets import Target

__all__ = [
    "LoweringError",
    "OVERRIDES",
    "register_lowering",
    "lowering_key",
    "is_lowerable",
    "lower_graph",
    "graph_weights",
    "tensor_var",
    "tvm_dtype",
]

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt

# fn(node, importer) -> relax expression; the importer is TVM's ExportedProgramImporter (env, block_builder).
Lowering = Callable[[fx.Node, object], object]

#: fxopt's lowerings, keyed by op overload; they win over TVM's (whose table is keyed by ``"cumsum.default"``).
OVERRIDES: dict[torch._ops.OpOverload, Lowering] = {}


class LoweringError(CodegenError):
    """One node could not be lowered to Relax; the segment holding it runs in PyTorch."""

    def __init__(self, node: fx.Node, reason: str):
        super().__init__(f"cannot lower {describe_node(node)}: {reason}")
        self.node = node
        self.reason = reason


def register_lowering(op: torch._ops.OpOverload) -> Callable[[Lowering], Lowering]:
    """Register ``fn(node, importer) -> relax expr`` as the lowering of ``op`` (``torch.ops.aten.rms_norm.default``)."""
    if not isinstance(op, torch._ops.OpOverload):
        raise TypeError(f"register_lowering takes an op overload such as torch.ops.aten.cumsum.default, got {op!r}")

    def decorate(fn: Lowering) -> Lowering:
        OVERRIDES[op] = fn
        return fn

    return decorate


def lowering_key(node: fx.Node) -> str:
    """The table key of a ``call_function`` node: ``"<op>.<overload>"`` for ATen ops."""
    return getattr(node.target, "__name__", str(node.target))


def _importer_keys() -> frozenset[str]:
    """The ops TVM's own importer lowers (fxopt's :data:`OVERRIDES` are checked apart: they can change)."""
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    return frozenset(ExportedProgramImporter().convert_map)


_KEYS: frozenset[str] | None = None


def is_lowerable(node: fx.Node) -> str | None:
    """``None`` when ``node`` can go to TVM, else the reason it cannot."""
    global _KEYS
    if node.op != "call_function":
        return None
    if _KEYS is None:
        _KEYS = _importer_keys()
    if node.target not in OVERRIDES and lowering_key(node) not in _KEYS:
        return f"no lowering for '{lowering_key(node)}'"
    for value in _tensor_values(node):
        if any(not isinstance(d, int) for d in value.shape):
            return "symbolic shape (the TVM backend builds static shapes)"
        if value.dtype not in _DTYPES:
            return f"dtype {value.dtype} has no TVM equivalent here"
    return None


_DTYPES = {
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int16,
    torch.int8,
    torch.uint8,
    torch.bool,
}


def tvm_dtype(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _tensor_values(node: fx.Node):
    values = node.meta.get("val")
    for value in values if isinstance(values, (tuple, list)) else [values]:
        if isinstance(value, torch.Tensor):
            yield value


@functools.cache
def _segment_importer():
    """TVM's importer of exported programs, extended for fxopt's segments (built once TVM is imported)."""
    from tvm import relax
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class SegmentImporter(ExportedProgramImporter):
        """Lowers a flat segment graph with fxopt's lowerings in place of TVM's (:data:`OVERRIDES`), half-precision
        matmuls accumulating in float32, and every result checked against PyTorch's shape and dtype. Lowerings
        read ``target`` (``None`` when the module is not for one target) and, for CPU targets, its ``isa`` to pick
        target-specific kernels."""

        def __init__(self, target: Target | None, templates: TemplateChoices):
            super().__init__()
            self.target = target
            self.isa = Isa.of(target) if target is not None and target.kind == "llvm" else None
            self.templates = templates
            # Ops a GEMM before them computed on its tile (epilogue.py): the exit's value, None inside the run.
            self.absorbed: dict[fx.Node, object] = {}
            # The tensors of get_attr nodes bound as Relax constants (not parameters): lowerings may pre-pack them.
            self.constants: dict[fx.Node, torch.Tensor] = {}
            self.block_builder = relax.BlockBuilder()
            for op, fn in OVERRIDES.items():
                self.convert_map[op.__name__] = (lambda f: lambda node: f(node, self))(fn)
            for key, bias_index in _FLOAT32_ACCUMULATING.items():
                if key in self.convert_map:
                    self.convert_map[key] = _half_accumulating_in_float32(self.convert_map[key], bias_index, self)
            for key, fn in list(self.convert_map.items()):
                self.convert_map[key] = self._unless_absorbed(_checked(fn))

        def _unless_absorbed(self, convert: Callable) -> Callable:
            return lambda node: self.absorbed[node] if node in self.absorbed else convert(node)

        def lower(self, gm: fx.GraphModule, name: str, weights_as_params: bool):
            bb = self.block_builder
            params, inputs, nodes = [], {}, []
            weights = (
                {target: tensor_var(f"w_{i}", value) for i, (target, value) in enumerate(graph_weights(gm).items())}
                if weights_as_params
                else {}
            )
            for node in gm.graph.nodes:
                if node.op == "placeholder":  # translated too: the importer binds it to its variable in inputs
                    var = tensor_var(node.name, node.meta["val"])
                    params.append(var)
                    inputs[node.name] = var
                    nodes.append(node)
                    self.env[node] = var  # now too: a GEMM's epilogue may read an input placed after the GEMM
                elif node.op == "get_attr":
                    # Bound here: the importer's get_attr path expects submodules, not tensors.
                    if weights_as_params:
                        self.env[node] = weights[node.target]
                    else:
                        self.constants[node] = getattr(*attribute_owner(gm, node.target))
                        self.env[node] = to_relax_constant(self.constants[node])
                else:
                    nodes.append(node)
            with bb.function(name, params=params + list(weights.values())):
                with bb.dataflow():
                    outputs = self._translate_fx_graph(gm, nodes, inputs)
                    result = bb.emit_output(relax.Tuple(list(outputs)))
                bb.emit_func_output(result)
            return bb.get()

    return SegmentImporter


def to_relax_constant(tensor: torch.Tensor):
    """A Relax constant holding a copy of ``tensor`` (through DLPack, so bfloat16 works too)."""
    import tvm
    from tvm import relax

    return relax.const(tvm.runtime.from_dlpack(tensor.detach().cpu().contiguous().clone()))


def lower_graph(
    gm: fx.GraphModule,
    name: str,
    target: Target | None = None,
    weights_as_params: bool = False,
    templates: TemplateChoices | None = None,
):
    """Lower a flat segment graph (placeholders → tensor ops → output tuple) to an ``IRModule``: Relax function
    ``name`` and the TIR kernels fxopt's lowerings wrote for it (named after their nodes, which the
    segments of one program do not share).

    Placeholders become the function's parameters; ``get_attr`` constants become Relax constants, or with
    ``weights_as_params`` further parameters after the placeholders, in :func:`graph_weights` order (a library
    of kernels alone, whatever the model's size). Lowerings read ``importer.target`` (``target``, or ``None``
    when the module is not for one target) to pick target-specific kernels, and ``templates`` (tuned template
    parameters; ``None``: the defaults) to schedule them. Raises :class:`LoweringError` naming the node that
    failed.
    """
    try:
        return _segment_importer()(target, templates or TemplateChoices()).lower(gm, name, weights_as_params)
    except LoweringError:
        raise
    except Exception as exc:  # an importer assertion outside any one op (e.g. the output tuple)
        raise CodegenError(f"cannot lower segment {name}: {type(exc).__name__}: {exc}") from None


def graph_weights(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """The constants a graph reads, by name, in the order ``lower_graph(weights_as_params=True)`` takes them."""
    return {node.target: getattr(*attribute_owner(gm, node.target)) for node in gm.graph.nodes if node.op == "get_attr"}


def tensor_var(name: str, value: torch.Tensor):
    """A Relax variable typed like ``value`` (shape and dtype)."""
    from tvm import relax

    return relax.Var(name, relax.TensorType([int(d) for d in value.shape], tvm_dtype(value.dtype)))


# Ops TVM's importer gives ``out_dtype="float32"`` whatever their inputs' dtype, with the index of their bias
# operand (None: none). On float16/bfloat16 values they accumulate in float32, as PyTorch's kernels do (and as
# DLight's tensor-core matmul rule takes them), but the importer adds the half-precision bias to the float32 result,
# which Relax refuses, and returns float32 where PyTorch returns the input's dtype.
_FLOAT32_ACCUMULATING = {
    "linear.default": 2,
    "convolution.default": 2,
    "conv1d.default": 2,
    "conv2d.default": 2,
    "conv3d.default": 2,
    "addmm.default": 0,
    "baddbmm.default": 0,
    "matmul.default": None,
    "mm.default": None,
    "bmm.default": None,
}


def _half_accumulating_in_float32(rule: Callable, bias_index: int | None, importer) -> Callable:
    """``rule`` on half-precision values: the bias read as float32 while it runs, and the float32 result rounded
    once to the node's dtype, after the bias."""
    from tvm import relax

    def run(node: fx.Node):
        value = node.meta.get("val")
        if not isinstance(value, torch.Tensor) or value.dtype not in (torch.float16, torch.bfloat16):
            return rule(node)
        bias = node.args[bias_index] if bias_index is not None and len(node.args) > bias_index else None
        saved = importer.env.get(bias) if isinstance(bias, fx.Node) else None
        if saved is not None:
            importer.env[bias] = importer.block_builder.emit(relax.op.astype(saved, "float32"))
        try:
            result = rule(node)
        finally:
            if saved is not None:
                importer.env[bias] = saved
        if isinstance(result.ty, relax.TensorType) and str(result.ty.dtype) == "float32":
            result = importer.block_builder.emit(relax.op.astype(result, tvm_dtype(value.dtype)))
        return result

    return run


def _checked(convert: Callable) -> Callable:
    """Wrap an importer rule: name the node on failure and check the result's shape and dtype."""

    def run(node: fx.Node):
        try:
            result = convert(node)
        except LoweringError:
            raise
        except Exception as exc:
            raise LoweringError(node, f"{type(exc).__name__}: {exc}") from None
        _check_type(node, result)
        return result

    return run


def _check_type(node: fx.Node, result) -> None:
    from tvm import relax

    expected = node.meta.get("val")
    if not isinstance(expected, torch.Tensor) or not isinstance(result, relax.Expr):
        return
    info = result.ty
    if not isinstance(info, relax.TensorType):
        return
    got_dtype, want_dtype = str(info.dtype), tvm_dtype(expected.dtype)
    if got_dtype != want_dtype:
        raise LoweringError(node, f"TVM's lowering gives dtype {got_dtype}, PyTorch gives {want_dtype}")
    if info.shape is not None and hasattr(info.shape, "values"):
        got = [int(d) if hasattr(d, "value") else d for d in info.shape.values]
        if got != list(expected.shape):
            raise LoweringError(node, f"TVM's lowering gives shape {got}, PyTorch gives {list(expected.shape)}")


# --- overrides ---------------------------------------------------------------------------------------------


def _arg(node: fx.Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _cpu_float32(node: fx.Node, importer) -> bool:
    """Whether ``node`` computes float32 for a CPU target: where fxopt's CPU forms apply (LLVM makes ``expf``/
    ``tanhf``/``erff`` of a vector one scalar libm call per element; row sums want vector lanes)."""
    return importer.isa is not None and node.meta["val"].dtype == torch.float32


@register_lowering(aten.linear.default)
def _linear(node: fx.Node, importer) -> object:
    """``linear`` of float32 values by a constant weight on an AVX2 or AArch64 CPU: :func:`_dense`. Anything else
    as TVM lowers it."""
    x, weight = node.args[0], node.args[1]
    bias = node.args[2] if len(node.args) > 2 else None
    if not _dense_applies(importer, x, weight, bias):
        return importer._linear(node)
    return _dense(node, importer, x, weight, bias, transposed=False)


@register_lowering(aten.addmm.default)
def _addmm(node: fx.Node, importer) -> object:
    """``addmm(bias, x, weight)`` with a constant ``[in, out]`` weight and a ``[out]`` bias (GPT-2's ``Conv1D``),
    float32 on an AVX2 or AArch64 CPU: :func:`_dense` of the weight transposed. Anything else as TVM lowers it."""

    bias, x, weight = node.args[:3]
    plain = node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1
    if not (
        plain
        and isinstance(bias, fx.Node)
        and bias.meta["val"].dim() == 1
        and _dense_applies(importer, x, weight, bias)
    ):
        return importer._addmm(node)
    return _dense(node, importer, x, weight, bias, transposed=True)


@register_lowering(aten.mm.default)
@register_lowering(aten.matmul.default)
def _matmul(node: fx.Node, importer) -> object:
    """``x @ weight`` with a constant 2-D ``[in, out]`` weight (any leading dims of ``x``), float32 on an AVX2 or
    AArch64 CPU: :func:`_dense` of the weight transposed. Anything else as TVM lowers it (matmul by MetaSchedule)."""
    from tvm import relax

    x, weight = node.args[:2]
    if not (weight.meta["val"].dim() == 2 and _dense_applies(importer, x, weight, None)):
        matmul = functools.partial(relax.op.linear_algebra.matmul, out_dtype="float32")
        return importer._binary_op(matmul, operator.matmul)(node)
    return _dense(node, importer, x, weight, None, transposed=True)


def _dense_applies(importer, x, weight, bias) -> bool:
    values = [a.meta["val"] for a in (x, weight, bias) if isinstance(a, fx.Node)]
    float32 = all(v.dtype == torch.float32 for v in values)
    return importer.isa is not None and x86.has_dense_f32(importer.isa) and weight.op == "get_attr" and float32


def _dense(node: fx.Node, importer, x: fx.Node, weight: fx.Node, bias: fx.Node | None, transposed: bool) -> object:
    """One call of :func:`fxopt.codegen.x86.dense_f32` over ``x``'s rows by ``weight`` (``[out, in]``, or
    ``[in, out]`` when ``transposed``), packed into panels (output channels short of a whole panel zero-padded):
    a constant weight here, by PyTorch (TVM's constant folding compiled and ran the packing ops one by one,
    8 s of BERT-base's build); a weight parameter by Relax ops, which an export lifts into its weight
    transform. The elementwise ops after it that the kernel can apply on its tile
    (:func:`fxopt.codegen.epilogue.find_epilogue`) are computed there: the kernel's result is bound to the run's
    last op and nothing to the ops inside it (``importer.absorbed``)."""
    from tvm import relax

    bb = importer.block_builder
    out_features = node.meta["val"].shape[-1]
    in_features = x.meta["val"].shape[-1]
    rows = x.meta["val"].numel() // in_features
    schedule = importer.templates.dense_schedule(rows, in_features, out_features, importer.isa)
    tile = schedule.tile
    if weight in importer.constants:
        value = importer.constants[weight]
        packed = to_relax_constant(x86.pack_dense_weight(value.t() if transposed else value, tile.panel))
    else:
        matrix = relax.op.permute_dims(importer.env[weight], [1, 0]) if transposed else importer.env[weight]
        panels = -(-out_features // tile.panel)
        padded = relax.op.nn.pad(matrix, [0, panels * tile.panel - out_features, 0, 0])
        packed = bb.emit(relax.op.permute_dims(relax.op.reshape(padded, [panels, tile.panel, in_features]), [0, 2, 1]))
    epilogue = find_epilogue(node, lambda value: value in importer.env)
    kernel = x86.dense_f32(rows, in_features, out_features, tile, schedule.panels_per_task, epilogue)
    kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
    args = [
        bb.emit(relax.op.reshape(importer.env[x], [rows, in_features])),
        packed,
        to_relax_constant(torch.zeros(out_features)) if bias is None else importer.env[bias],
    ]
    for operand, shape in zip(epilogue.operands, epilogue.operand_shapes) if epilogue else ():
        args.append(bb.emit(relax.op.reshape(importer.env[operand], list(shape))))
    y = bb.emit(relax.call_tir(kernel, args, relax.TensorType([rows, out_features], "float32")))
    if epilogue is None:
        return bb.emit(relax.op.reshape(y, [*node.meta["val"].shape]))
    importer.absorbed.update({inner: None for inner in epilogue.nodes[:-1]})
    importer.absorbed[epilogue.exit] = bb.emit(relax.op.reshape(y, [*epilogue.exit.meta["val"].shape]))
    return bb.emit(relax.op.reshape(y, [*node.meta["val"].shape]))  # read by none but the run: left unused


@register_lowering(aten.cumsum.default)
def _cumsum(node: fx.Node, importer) -> object:
    """TVM keeps the input dtype; PyTorch promotes bool and integer inputs to int64 (GPT-2's position ids)."""
    from tvm import relax

    x = importer.env[node.args[0]]
    out_dtype = tvm_dtype(node.meta["val"].dtype)
    return importer.block_builder.emit(relax.op.cumsum(x, axis=_arg(node, 1, "dim"), dtype=out_dtype))


@register_lowering(aten.rms_norm.default)
def _rms_norm(node: fx.Node, importer) -> object:
    """``aten.rms_norm`` (absent from TVM's table): eps defaults to the dtype's machine epsilon, as in PyTorch."""
    from tvm import relax

    x = importer.env[node.args[0]]
    shape = list(_arg(node, 1, "normalized_shape"))
    weight = _arg(node, 2, "weight")
    eps = _arg(node, 3, "eps")
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
    shape = list(_arg(node, 1, "normalized_shape"))
    dtype = node.meta["val"].dtype
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    gamma = importer.env[weight] if weight is not None else to_relax_constant(torch.ones(shape, dtype=dtype))
    beta = importer.env[bias] if bias is not None else to_relax_constant(torch.zeros(shape, dtype=dtype))
    axes = list(range(-len(shape), 0))
    eps = _arg(node, 4, "eps", 1e-5)
    if _cpu_float32(node, importer) and len(shape) == 1 and shape[0] % importer.isa.lanes() == 0:
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


@register_lowering(aten.scaled_dot_product_attention.default)
def _sdpa(node: fx.Node, importer) -> object:
    """Float32 4-D attention on an AVX2 CPU: one :func:`fxopt.codegen.x86.attention_f32` kernel, the masks (bool,
    additive, causal) turned into one additive mask first. Anything else spelled out as matmul-softmax-matmul.

    TVM's own rule rejects boolean masks (every ``transformers`` model passes
    one), ignores ``scale`` and ``enable_gqa``; this one handles all three and
    ``is_causal``.
    """
    from tvm import relax

    if _arg(node, 4, "dropout_p", 0.0):
        raise LoweringError(node, "dropout in attention is not deterministic; captured in eval mode it should be 0")
    bb = importer.block_builder
    q, k, v = (importer.env[a] for a in node.args[:3])
    mask = _arg(node, 3, "attn_mask")
    is_causal = _arg(node, 5, "is_causal", False)
    scale = node.kwargs.get("scale")
    q_val, k_val = node.args[0].meta["val"], node.args[1].meta["val"]
    dtype = tvm_dtype(q_val.dtype)
    repeats = 0
    if node.kwargs.get("enable_gqa") and q_val.shape[-3] != k_val.shape[-3]:
        repeats = q_val.shape[-3] // k_val.shape[-3]
        k = bb.emit(relax.op.repeat(k, repeats, axis=-3))
        v = bb.emit(relax.op.repeat(v, repeats, axis=-3))
    scale = 1.0 / math.sqrt(q_val.shape[-1]) if scale is None else scale
    length, source = q_val.shape[-2], k_val.shape[-2]
    neg_inf = relax.const(float("-inf"), dtype)
    float32 = all(a.meta["val"].dtype == torch.float32 for a in node.args[:3])
    if importer.isa is not None and importer.isa.avx2 and q_val.dim() == 4 and float32:
        mask_shape = [1, 1, *(mask.meta["val"].shape if mask is not None else ())][-4:]
        bias_shape = [q_val.shape[0] if mask_shape[0] > 1 else 1, q_val.shape[1] if mask_shape[1] > 1 else 1]
        bias_shape += [length, source]
        causal = torch.full((length, source), float("-inf")).triu(1) if is_causal else torch.zeros(())
        if mask is None or mask in importer.constants:
            # Computed here: TVM's constant folding compiles and runs each op on constants (0.1 s per layer).
            value = torch.zeros(()) if mask is None else importer.constants[mask]
            value = torch.where(value, 0.0, float("-inf")) if value.dtype == torch.bool else value
            bias = to_relax_constant((value + causal).float().expand(bias_shape))
        else:
            m = importer.env[mask]
            bias = bb.emit(relax.op.where(m, relax.const(0.0), neg_inf)) if mask.meta["val"].dtype == torch.bool else m
            bias = bb.emit(relax.op.add(bias, to_relax_constant(causal))) if is_causal else bias
            bias = bb.emit(relax.op.broadcast_to(bias, bias_shape))
        # Q, K and V read where their chains of views, splits and permutes start (a fused projection's result),
        # so the chains' copies go unread and are dropped; not where K and V were repeated for GQA above.
        gathers = [read_through(a) for a in node.args[:3]]
        gathers = [g if g.source is not g.node and not (repeats and i) else None for i, g in enumerate(gathers)]
        q, k, v = (importer.env[g.source] if g else value for g, value in zip(gathers, (q, k, v)))
        # Written heads inside when all that reads it is the transpose merging the heads: that is then free.
        (reader,) = node.users if len(node.users) == 1 else (None,)
        merge = reader is not None and _swaps_heads_and_rows(reader)
        shape = [q_val.shape[i] for i in ((0, 2, 1, 3) if merge else range(4))]
        kernel = x86.attention_f32(
            *q_val.shape[:3], source, q_val.shape[3], tuple(bias_shape), scale, importer.isa, tuple(gathers), merge
        )
        kernel = bb.add_func(kernel.with_attr("global_symbol", node.name), node.name)
        out = bb.emit(relax.call_tir(kernel, [q, k, v, bias], relax.TensorType(shape, "float32")))
        if not merge:
            return out
        importer.absorbed[reader] = out
        return bb.emit(relax.op.permute_dims(out, [0, 2, 1, 3]))  # read by none but the transpose: left unused
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


def _swaps_heads_and_rows(node: fx.Node) -> bool:
    """``node`` is ``transpose(x, 1, 2)`` or ``permute(x, [0, 2, 1, 3])`` of a 4-D ``x``."""
    if node.target is aten.transpose.int:
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    return node.target is aten.permute.default and [d % 4 for d in node.args[1]] == [0, 2, 1, 3]


@register_lowering(aten.gelu.default)
def _gelu(node: fx.Node, importer) -> object:
    """Exact GELU; on CPUs ``erf`` is TVM's polynomial ``fast_erf`` (the GELU stays within 2e-7 of PyTorch's,
    relative to its scale; checked like every lowering): LLVM makes ``erf`` a scalar libm call per element,
    11x slower on MiniLM's MLP."""
    from tvm import relax, topi

    bb = importer.block_builder
    x = importer.env[node.args[0]]
    if _arg(node, 1, "approximate", "none") == "tanh":
        return bb.emit(relax.op.nn.gelu_tanh(x))
    if not _cpu_float32(node, importer):
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
        if not _cpu_float32(node, importer):
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

    dims = _arg(node, 1, "dim", [])
    axis = list(dims) if dims else None
    return importer.block_builder.emit(
        relax.op.max(importer.env[node.args[0]], axis=axis, keepdims=bool(_arg(node, 2, "keepdim", False)))
    )
