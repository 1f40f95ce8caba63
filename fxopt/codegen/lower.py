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
from collections.abc import Callable

import torch
import torch.fx as fx

from fxopt.codegen.isa import Isa
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


# --- for the lowerings ---------------------------------------------------------------------------------


def node_arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of ``node``, given by position ``index`` or by keyword (``default`` if neither)."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def cpu_float32(node: fx.Node, importer) -> bool:
    """Whether ``node`` computes float32 for a CPU target: where fxopt's CPU forms apply (LLVM makes ``expf``/
    ``tanhf``/``erff`` of a vector one scalar libm call per element; row sums want vector lanes)."""
    return importer.isa is not None and node.meta["val"].dtype == torch.float32
