"""Elementwise tails of a GEMM or a convolution, computed on its register tile: what ONNX Runtime fuses into its
GEMMs' and convolutions' epilogues.

After a GEMM or a convolution the graph often holds a few elementwise ops on its result: a GELU (exact, or
GPT-2's tanh form spelled out in seven ops), ReLU, ReLU6, SiLU, a residual add, a scale. Run as kernels of their
own, each reads and writes the whole result once more. :func:`find_epilogue` finds the longest such run that the
kernel can compute instead, while the tile is still in registers; :class:`Epilogue` writes it in TE for the kernel
(:mod:`fxopt.codegen.kernels.gemm_f32`, :mod:`~fxopt.codegen.kernels.conv2d_f32`), which inlines it into the
tile, but for the values the run reads more than once (:data:`KEPT`): those it computes once per tile into
registers. Inlined, a value read twice is
computed twice, and a run of such ops (GELU, then tanh, then SiLU: each reads its input several times) grew
its expression exponentially; one such GEMM took TVM over ten minutes to compile.

A run qualifies when its ops are elementwise float32 ops of the GEMM's result shape (views that keep the last
dimension are transparent), only the run reads its values except its last op (the *exit*, the one value the
kernel writes), and it reads besides itself only numbers and tensors lowered before the GEMM: whole ones (the
result's shape, e.g. the residual), per-column ones (``[out]``) or single values.
"""

from __future__ import annotations

import functools
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.fx as fx
from torch._ops import OpOverload

from fxopt.codegen.layout import RESHAPES

__all__ = ["Epilogue", "find_epilogue", "KEPT"]

aten = torch.ops.aten

_MAX_OPS = 16  # a GEMM's tail, not the rest of the graph

#: The name prefix of the stages holding a value the run reads more than once: the kernel computes them once
#: per tile instead of inlining them into each reader.
KEPT = "epilogue_kept"


def _sigmoid(x):
    from tvm import topi

    # 1 / (1 + e^-x), with TOPI's polynomial exp: LLVM makes exp a scalar libm call per element.
    return topi.divide(1.0, topi.add(1.0, topi.fast_exp(topi.negative(x))))


def _gelu(x, approximate: str):
    from tvm import topi

    if approximate == "tanh":
        cubic = topi.add(x, topi.multiply(0.044715, topi.multiply(x, topi.multiply(x, x))))
        inner = topi.fast_tanh(topi.multiply(math.sqrt(2 / math.pi), cubic))
    else:
        inner = topi.fast_erf(topi.multiply(x, math.sqrt(0.5)))
    return topi.multiply(topi.multiply(x, 0.5), topi.add(inner, 1.0))


def _power(x, exponent):
    from tvm import topi

    result = x
    for _ in range(int(exponent) - 1):
        result = topi.multiply(result, x)
    return result


@functools.cache
def _topi_ops() -> dict:
    """The TE form of each op over TE tensors or numbers (TOPI's polynomial tanh: LLVM makes tanhf a libm call)."""
    from tvm import topi

    return {
        aten.add.Tensor: topi.add,
        aten.sub.Tensor: topi.subtract,
        aten.mul.Tensor: topi.multiply,
        aten.div.Tensor: topi.divide,
        aten.neg.default: topi.negative,
        aten.relu.default: topi.nn.relu,
        aten.hardtanh.default: lambda x, low=-1.0, high=1.0: topi.minimum(topi.maximum(x, low), high),  # ReLU6
        aten.tanh.default: topi.fast_tanh,
        aten.sigmoid.default: _sigmoid,
        aten.silu.default: lambda x: topi.multiply(x, _sigmoid(x)),
    }


_ELEMENTWISE = {
    aten.add.Tensor,
    aten.sub.Tensor,
    aten.mul.Tensor,
    aten.div.Tensor,
    aten.neg.default,
    aten.relu.default,
    aten.hardtanh.default,
    aten.tanh.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.gelu.default,
    aten.pow.Tensor_Scalar,
}


#: Ops whose TE form reads its input several times (polynomial exp, tanh and erf; x * sigmoid(x); powers).
_READS_INPUT_AGAIN = {
    aten.tanh.default,
    aten.sigmoid.default,
    aten.silu.default,
    aten.gelu.default,
    aten.pow.Tensor_Scalar,
}


def _kept(value, name: str):
    """``value`` (a TE tensor) as a stage of its own, which the kernel computes once per tile (:data:`KEPT`)."""
    from tvm import te

    return te.compute(value.shape, lambda *i: value(*i), name=name)


def _stage(node: fx.Node) -> Callable:
    """``node``'s op over its value arguments (:func:`_inputs`) in TE."""
    if node.target is aten.gelu.default:
        return lambda x: _gelu(x, _approximation(node))
    if node.target is aten.pow.Tensor_Scalar:
        return lambda x: _power(x, node.args[1])
    return _topi_ops()[node.target]


def _approximation(gelu: fx.Node) -> str:
    return str(gelu.kwargs.get("approximate", gelu.args[1] if len(gelu.args) > 1 else "none"))


def _inputs(node: fx.Node) -> tuple:
    """The arguments that are values (tensors or numbers): a GELU's approximation and a power's exponent are not."""
    return node.args[:1] if node.target in (aten.gelu.default, aten.pow.Tensor_Scalar) else node.args


def _plain(node: fx.Node) -> bool:
    """No argument changes the op from its plain elementwise form (alpha, rounding mode, large powers)."""
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        return bool(node.kwargs.get("alpha", 1) == 1)
    if node.target is aten.div.Tensor:
        return node.kwargs.get("rounding_mode") is None
    if node.target is aten.pow.Tensor_Scalar:
        exponent = node.args[1]
        return isinstance(exponent, (int, float)) and float(exponent).is_integer() and 1 <= exponent <= 4
    return True


@dataclass(eq=False)
class Epilogue:
    """The ops after ``gemm`` its kernel computes on the tile; ``nodes[-1]`` is the exit, the value it writes."""

    gemm: fx.Node
    nodes: list[fx.Node]
    operands: list[fx.Node]  # tensors the run reads besides itself, passed to the kernel
    operand_shapes: list[tuple[int, ...]]  # as the kernel takes them: (rows, out), (out,) or (1,)

    @property
    def exit(self) -> fx.Node:
        return self.nodes[-1]

    @property
    def ops(self) -> tuple[str, ...]:
        """The run's op names, views left out (``("gelu",)``, ``("add",)``)."""
        return tuple(cast(OpOverload, n.target).overloadpacket.__name__ for n in self.nodes if n.target not in RESHAPES)

    def __call__(self, result, operands: list) -> object:
        """The exit as a TE tensor, given the GEMM's ``result`` (bias added) and the ``operands`` as TE tensors."""
        import tvm

        values: dict[fx.Node, object] = {self.gemm: result, **dict(zip(self.operands, operands))}
        reads = self._reads()

        def value(arg):
            return values[arg] if isinstance(arg, fx.Node) else tvm.tirx.const(float(arg), "float32")

        for node in self.nodes:
            if node.target in RESHAPES:
                values[node] = value(node.args[0])
                continue
            values[node] = _stage(node)(*(value(a) for a in _inputs(node)))
            if reads[node] > 1:
                values[node] = _kept(values[node], f"{KEPT}_{node.name}")
        return values[self.exit]

    def _reads(self) -> Counter[fx.Node]:
        """How often the run reads each of its ops' values (through views; an op that reads its input several
        times counts twice)."""
        origin: dict[fx.Node, fx.Node] = {}
        reads: Counter[fx.Node] = Counter()
        for node in self.nodes:
            if node.target in RESHAPES:
                source = cast(fx.Node, node.args[0])  # a view of a member of the run
                origin[node] = origin.get(source, source)
                continue
            for arg in _inputs(node):
                if isinstance(arg, fx.Node):
                    reads[origin.get(arg, arg)] += 2 if node.target in _READS_INPUT_AGAIN else 1
        return reads


def find_epilogue(gemm: fx.Node, lowered: Callable[[fx.Node], bool]) -> Epilogue | None:
    """The longest run after ``gemm`` (a node whose value is ``[..., out]`` float32) its kernel can apply, or
    None. ``lowered(node)``: whether ``node``'s value exists before the GEMM (an operand must)."""
    result = gemm.meta["val"]
    width, size = result.shape[-1], result.numel()
    shapes: dict[fx.Node, tuple[int, ...]] = {}

    def operand_shape(arg: fx.Node, member_shape: torch.Size) -> tuple[int, ...] | None:
        value = arg.meta.get("val")
        if not (isinstance(value, torch.Tensor) and value.dtype == torch.float32 and lowered(arg)):
            return None
        if value.shape == member_shape:
            return (size // width, width)
        if value.numel() == width and value.shape[-1] == width and value.dim() <= len(member_shape):
            return (width,)
        return (1,) if value.numel() == 1 else None

    def takes(node: fx.Node, members: set[fx.Node]) -> bool:
        value = node.meta.get("val")
        if not (
            node.op == "call_function"
            and isinstance(value, torch.Tensor)
            and value.dtype == torch.float32
            and value.numel() == size
            and value.shape[-1] == width
            and (node.target in RESHAPES or (node.target in _ELEMENTWISE and _plain(node)))
        ):
            return False
        if node.target in RESHAPES:
            return node.args[0] in members
        found = {}
        for arg in _inputs(node):
            if isinstance(arg, fx.Node) and arg not in members:
                shape = operand_shape(arg, value.shape)
                if shape is None:
                    return False
                found[arg] = shape
            elif not isinstance(arg, (fx.Node, int, float)) or isinstance(arg, bool):
                return False
        shapes.update(found)
        return True

    run: list[fx.Node] = []
    members = {gemm}
    node = gemm.next
    while node.op != "root" and len(run) < _MAX_OPS:
        if any(arg in members for arg in node.all_input_nodes) and takes(node, members):
            run.append(node)
            members.add(node)
        node = node.next
    # The longest prefix whose values only it reads, but for its last: the kernel writes that one alone.
    for end in range(len(run), 0, -1):
        inside = {gemm, *run[:end]}
        if all(user in inside for member in [gemm, *run[: end - 1]] for user in member.users):
            nodes = run[:end]
            if all(n.target in RESHAPES for n in nodes):
                return None
            operands = list(dict.fromkeys(a for n in nodes for a in n.args if isinstance(a, fx.Node) and a in shapes))
            return Epilogue(gemm, nodes, operands, [shapes[a] for a in operands])
    return None
