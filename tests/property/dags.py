"""Random model DAGs (NeuRI-style): valid by construction, with fan-out, fan-in and many op kinds.

A :class:`DagSpec` is a list of steps over a pool of values. Each step reads
one or more earlier values (any of them: fan-out), writes one or two new ones
(``split``), and knows the shapes it makes, so every generated model runs.
Binary ops pair values whose shapes broadcast, ``cat`` values that differ in
one dim only, and the outputs are the values nothing read plus a random
extra: several inputs and outputs, residuals and diamonds come out of that.

Covered: elementwise (unary, binary with broadcasting, ``where``,
``masked_fill``), linear, conv2d (grouped), matmul / batched matmul, SDPA
(causal or masked), softmax / log-softmax / cumsum / mean / sum / var / amax
over random axes, layer / group / RMS / batch norm, embedding, cat / split /
slice / pad / pools, reshape / permute / unsqueeze; float32, float16 and
bfloat16; shapes with 1-sized and odd dims.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["DagModel", "DagSpec", "Step", "dag_specs", "random_dags"]

UNARY = ["relu", "gelu", "tanh", "sigmoid", "silu", "scale"]
BINARY = ["add", "mul", "sub", "maximum"]
ALONG = ["softmax", "log_softmax", "cumsum"]
REDUCE = ["mean", "sum", "var", "amax"]
# (op kind, how often it is drawn)
KINDS = (
    UNARY
    + BINARY
    + ALONG
    + REDUCE
    + ["linear"] * 3
    + [
        "conv",
        "matmul",
        "sdpa",
        "layer_norm",
        "group_norm",
        "rms_norm",
        "batch_norm",
        "cat",
        "split",
        "slice",
        "pad",
        "pool",
        "where",
        "masked_fill",
        "reshape",
        "permute",
        "unsqueeze",
    ]
)


@dataclass
class Step:
    kind: str
    reads: tuple[int, ...]
    params: dict = field(default_factory=dict)
    shapes: tuple[tuple[int, ...], ...] = ()  # of the values it writes


@dataclass
class DagSpec:
    inputs: list[tuple[int, ...]]
    tokens: tuple[int, int, int] | None  # an int64 token input [batch, seq], embedded to this width, if any
    steps: list[Step]
    outputs: list[int]
    dtype: torch.dtype
    seed: int

    def describe(self) -> str:
        """One line per step, for a failing example's report."""
        lines = [f"dtype {self.dtype}, inputs {self.inputs}, tokens {self.tokens}"]
        lines += [
            f"v{n}: {s.kind}{s.params or ''} of {['v%d' % r for r in s.reads]} -> {list(s.shapes)}"
            for n, s in zip(_value_numbers(self), self.steps)
        ]
        return "\n".join(lines + [f"outputs {['v%d' % o for o in self.outputs]}"])


def _value_numbers(spec: DagSpec) -> list[int]:
    first, numbers = len(spec.inputs) + (spec.tokens is not None), []
    for step in spec.steps:
        numbers.append(first)
        first += len(step.shapes)
    return numbers


@st.composite
def dag_specs(
    draw, max_steps: int = 10, dtypes: tuple[torch.dtype, ...] = (torch.float32,), kinds: tuple[str, ...] = tuple(KINDS)
) -> DagSpec:
    """A random valid model DAG whose steps are drawn from ``kinds`` (repeat a kind to draw it more often)."""
    batch = draw(st.sampled_from([1, 2, 3]))
    rank = draw(st.sampled_from([2, 3, 4]))
    dims = st.integers(1, 7)
    shapes = [(batch, *(draw(dims) for _ in range(rank - 1)))]
    if draw(st.booleans()):  # a second input of a shape that broadcasts against the first
        shapes.append(tuple(s if draw(st.booleans()) else 1 for s in shapes[0]))
    tokens = (batch, draw(st.integers(1, 6)), draw(st.integers(2, 8))) if draw(st.integers(0, 4)) == 0 else None
    values = list(shapes) + ([tokens] if tokens else [])
    steps = []
    for _ in range(draw(st.integers(1, max_steps))):
        step = _step(draw, values, kinds)
        if step is not None:
            steps.append(step)
            values += list(step.shapes)
    read = {r for s in steps for r in s.reads}
    unread = [i for i in range(len(values)) if i not in read and i >= len(shapes) + (tokens is not None)]
    outputs = unread or [len(values) - 1]
    if draw(st.booleans()):
        outputs.append(draw(st.integers(0, len(values) - 1)))
    return DagSpec(
        shapes, tokens, steps, sorted(set(outputs)), draw(st.sampled_from(dtypes)), draw(st.integers(0, 2**16))
    )


def _step(draw, values: list[tuple[int, ...]], kinds: tuple[str, ...]) -> Step | None:
    kind = draw(st.sampled_from(kinds))
    # Half the steps read the newest value: chains as deep as real models', the rest fan out from any value.
    i = len(values) - 1 if draw(st.booleans()) else draw(st.integers(0, len(values) - 1))
    shape = values[i]
    rank = len(shape)
    axis = (rank - 1 if draw(st.booleans()) else draw(st.integers(0, rank - 1))) if rank else 0  # features: last
    if kind in UNARY:
        return Step(kind, (i,), {}, (shape,))
    if kind in BINARY or kind == "where":
        partners = [j for j, s in enumerate(values) if _broadcasts_into(s, shape)]
        return Step(kind, (i, draw(st.sampled_from(partners))), {}, (shape,))
    if kind == "masked_fill":
        return Step(kind, (i,), {"value": draw(st.sampled_from([0.0, -1.5]))}, (shape,))
    if kind in ALONG:
        return Step(kind, (i,), {"dim": axis}, (shape,))
    if kind in REDUCE:
        keep = draw(st.booleans()) or rank == 1
        out = tuple(1 if d == axis else s for d, s in enumerate(shape)) if keep else shape[:axis] + shape[axis + 1 :]
        if kind == "var" and shape[axis] < 2:
            return None
        return Step(kind, (i,), {"dim": axis, "keepdim": keep}, (out,))
    if kind == "linear":
        out = draw(st.integers(1, 8))
        return Step(kind, (i,), {"out": out, "bias": draw(st.booleans())}, (shape[:-1] + (out,),))
    if kind == "conv" and rank == 4:
        channels = shape[1]
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if channels % g == 0]))
        out = groups * draw(st.integers(1, 3))
        k = draw(st.sampled_from([1, 3]))
        return Step(kind, (i,), {"out": out, "k": k, "groups": groups}, ((shape[0], out, *shape[2:]),))
    if kind == "matmul" and rank >= 2:  # x @ xᵀ: [..., m, k] @ [..., k, m]
        return Step(kind, (i,), {}, (shape[:-1] + (shape[-2],),))
    if kind == "sdpa" and rank == 4:
        mask = draw(st.sampled_from(["none", "causal", "bool", "float"]))
        return Step(kind, (i,), {"mask": mask}, (shape,))
    if kind == "layer_norm":
        return Step(kind, (i,), {"affine": draw(st.booleans())}, (shape,))
    if kind == "rms_norm":
        return Step(kind, (i,), {}, (shape,))
    if kind == "group_norm" and rank >= 3:
        groups = draw(st.sampled_from([g for g in (1, 2, 3) if shape[1] % g == 0]))
        if shape[1] // groups * math.prod(shape[2:]) < 2:  # PyTorch refuses a group of one value
            return None
        return Step(kind, (i,), {"groups": groups}, (shape,))
    if kind == "batch_norm" and rank >= 2 and shape[0] > 0:
        return Step(kind, (i,), {}, (shape,))
    if kind == "cat":
        partners = [
            j
            for j, s in enumerate(values)
            if len(s) == rank and all(a == b for d, (a, b) in enumerate(zip(s, shape)) if d != axis)
        ]
        j = draw(st.sampled_from(partners))
        out = tuple(s + values[j][axis] if d == axis else s for d, s in enumerate(shape))
        return Step(kind, (i, j), {"dim": axis}, (out,))
    if kind == "split" and shape[axis] >= 2:
        first = draw(st.integers(1, shape[axis] - 1))
        pieces = [tuple(p if d == axis else s for d, s in enumerate(shape)) for p in (first, shape[axis] - first)]
        return Step(kind, (i,), {"dim": axis, "first": first}, tuple(pieces))
    if kind == "slice" and shape[axis] >= 2:
        start = draw(st.integers(0, shape[axis] - 1))
        end = draw(st.integers(start + 1, shape[axis]))
        return Step(
            kind,
            (i,),
            {"dim": axis, "start": start, "end": end},
            (tuple(end - start if d == axis else s for d, s in enumerate(shape)),),
        )
    if kind == "pad":
        left, right = draw(st.integers(0, 2)), draw(st.integers(0, 2))
        return Step(kind, (i,), {"pad": (left, right)}, (shape[:-1] + (shape[-1] + left + right,),))
    if kind == "pool" and rank == 4 and min(shape[2:]) >= 2:
        out = (shape[0], shape[1], shape[2] // 2, shape[3] // 2)
        return Step(kind, (i,), {"max": draw(st.booleans())}, (out,))
    if kind == "reshape" and rank >= 2:  # merge two neighbouring dims
        d = draw(st.integers(0, rank - 2))
        return Step(kind, (i,), {"dim": d}, (shape[:d] + (shape[d] * shape[d + 1],) + shape[d + 2 :],))
    if kind == "permute" and rank >= 2:
        order = tuple(draw(st.permutations(range(1, rank))))  # the batch stays first
        return Step(kind, (i,), {"order": (0, *order)}, ((shape[0], *(shape[d] for d in order)),))
    if kind == "unsqueeze" and rank < 4:
        return Step(kind, (i,), {"dim": axis + 1}, (shape[: axis + 1] + (1,) + shape[axis + 1 :],))
    return None


def _broadcasts_into(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """``shape`` broadcasts against ``target`` without growing it."""
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))


class DagModel(nn.Module):
    """Runs a :class:`DagSpec`; its layers are drawn from the spec's seed."""

    def __init__(self, spec: DagSpec):
        super().__init__()
        self.spec = spec
        generator = torch.manual_seed(spec.seed)
        self.layers = nn.ModuleDict()
        if spec.tokens:
            self.layers["embedding"] = nn.Embedding(11, spec.tokens[2])
        for number, step in zip(_value_numbers(spec), spec.steps):
            shape = _shape_of(spec, step.reads[0])
            name = f"v{number}"
            if step.kind == "linear":
                self.layers[name] = nn.Linear(shape[-1], step.params["out"], bias=step.params["bias"])
            elif step.kind == "conv":
                p = step.params
                self.layers[name] = nn.Conv2d(shape[1], p["out"], p["k"], padding=p["k"] // 2, groups=p["groups"])
            elif step.kind == "layer_norm":
                self.layers[name] = nn.LayerNorm(shape[-1], elementwise_affine=step.params["affine"])
            elif step.kind == "rms_norm":
                self.layers[name] = nn.RMSNorm(shape[-1])
            elif step.kind == "group_norm":
                self.layers[name] = nn.GroupNorm(step.params["groups"], shape[1])
            elif step.kind == "batch_norm":
                norm = nn.BatchNorm1d(shape[1]) if len(shape) < 4 else nn.BatchNorm2d(shape[1])
                norm.running_mean.uniform_(-1, 1, generator=generator)
                norm.running_var.uniform_(0.5, 2, generator=generator)
                self.layers[name] = norm
            elif step.kind == "sdpa" and step.params["mask"] in ("bool", "float"):
                seq = shape[2]
                keep = torch.rand(seq, seq, generator=generator) > 0.3
                keep |= torch.eye(seq, dtype=torch.bool)  # every query attends to something
                self.register_buffer(
                    f"{name}_mask", keep if step.params["mask"] == "bool" else torch.where(keep, 0.0, -1e4)
                )
        for parameter in self.parameters():  # away from 0 and 1 so that folded and fused weights differ visibly
            with torch.no_grad():
                parameter.mul_(1.5).add_(0.1)
        self.to(spec.dtype)

    def forward(self, *args: torch.Tensor):
        values = list(args)
        if self.spec.tokens:
            values[-1] = self.layers["embedding"](values[-1])
        for number, step in zip(_value_numbers(self.spec), self.spec.steps):
            out = self._run(f"v{number}", step, [values[r] for r in step.reads])
            values += list(out) if isinstance(out, tuple) else [out]
        return tuple(values[o] for o in self.spec.outputs)

    def _run(self, name: str, step: Step, xs: list[torch.Tensor]):
        kind, p, x = step.kind, step.params, xs[0]
        if kind in ("relu", "gelu", "tanh", "sigmoid", "silu"):
            return getattr(torch if kind in ("tanh", "sigmoid") else F, kind)(x)
        if kind == "scale":
            return x * 0.75 + 0.25
        if kind == "add":
            return x + xs[1]
        if kind == "mul":
            return x * xs[1]
        if kind == "sub":
            return x - xs[1]
        if kind == "maximum":
            return torch.maximum(x, xs[1].expand_as(x))
        if kind == "where":
            return torch.where(x > 0, x, xs[1])
        if kind == "masked_fill":
            return x.masked_fill(x < -0.5, p["value"])
        if kind in ("softmax", "log_softmax"):
            return getattr(torch, kind)(x, p["dim"])
        if kind == "cumsum":
            return torch.cumsum(x, p["dim"])
        if kind in ("mean", "sum", "amax"):
            return getattr(torch, kind)(x, p["dim"], keepdim=p["keepdim"])
        if kind == "var":
            return torch.var(x, p["dim"], keepdim=p["keepdim"])
        if kind in ("linear", "conv", "layer_norm", "rms_norm", "group_norm", "batch_norm"):
            return self.layers[name](x)
        if kind == "matmul":
            return x @ x.transpose(-1, -2)
        if kind == "sdpa":
            mask = getattr(self, f"{name}_mask", None)
            return F.scaled_dot_product_attention(x, x * 0.5, x, attn_mask=mask, is_causal=p["mask"] == "causal")
        if kind == "cat":
            return torch.cat([x, xs[1]], p["dim"])
        if kind == "split":
            return tuple(torch.split(x, [p["first"], x.shape[p["dim"]] - p["first"]], p["dim"]))
        if kind == "slice":
            return x.narrow(p["dim"], p["start"], p["end"] - p["start"])
        if kind == "pad":
            return F.pad(x, p["pad"])
        if kind == "pool":
            return F.max_pool2d(x, 2) if p["max"] else F.avg_pool2d(x, 2)
        if kind == "reshape":
            d = p["dim"]
            return x.reshape(*x.shape[:d], x.shape[d] * x.shape[d + 1], *x.shape[d + 2 :])
        if kind == "permute":
            return x.permute(*p["order"])
        if kind == "unsqueeze":
            return x.unsqueeze(p["dim"])
        raise AssertionError(kind)

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        generator = torch.Generator().manual_seed(self.spec.seed + 1)
        inputs = [torch.randn(s, generator=generator).to(self.spec.dtype) for s in self.spec.inputs]
        if self.spec.tokens:
            inputs.append(torch.randint(0, 11, self.spec.tokens[:2], generator=generator))
        return tuple(inputs)


def _shape_of(spec: DagSpec, value: int) -> tuple[int, ...]:
    shapes = list(spec.inputs) + ([spec.tokens] if spec.tokens else [])  # the embedded tokens' shape
    for step in spec.steps:
        shapes += list(step.shapes)
    return shapes[value]


@st.composite
def random_dags(
    draw, max_steps: int = 10, dtypes: tuple[torch.dtype, ...] = (torch.float32,), kinds: tuple[str, ...] = tuple(KINDS)
):
    """``(model, inputs)`` of a random valid DAG; the spec is ``model.spec`` (``model.spec.describe()``)."""
    spec = draw(dag_specs(max_steps, dtypes, kinds))
    model = DagModel(spec).eval()
    return model, model.example_inputs()
