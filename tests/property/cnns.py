"""Random CNNs (valid by construction): what ``convert-layout`` and the convolution kernels meet in real networks.

A :class:`CnnSpec` is a list of steps over a pool of ``[N, C, H, W]`` values, each step reading earlier values
(fan-out) and writing one: convolutions (kernel 1/3/5/7, stride 1/2, padding, dilation, plain, grouped
(ResNeXt's; a depthwise one with a channel multiplier) or depthwise, channels that are and are not multiples of a
vector's block: 3, 4, 6, 8, 12, 16, 18, 24, 32), a one-sided zero pad before a strided convolution (TensorFlow's
"same"), activations (ReLU, ReLU6, SiLU, sigmoid), residual adds,
max and average pools (padding, ceil mode), squeeze-excitation (mean, two 1x1 convolutions, sigmoid, scale),
concatenation and slices along the channels, tiny spatial sizes; a head (global mean, flatten, linear) or the
feature map as output, and any unread value as a further output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

__all__ = ["CnnSpec", "CnnModel", "random_cnns"]

CHANNELS = [3, 4, 6, 8, 12, 16, 18, 24, 32]
CONVS = ["conv"] * 4 + ["depthwise"] * 2 + ["grouped"] * 2
KINDS = [*CONVS, "act", "add", "pool", "se", "cat", "slice", "same_pad_conv"]


@dataclass
class Step:
    kind: str
    reads: tuple[int, ...]
    params: dict = field(default_factory=dict)
    shape: tuple[int, ...] = ()


@dataclass
class CnnSpec:
    input: tuple[int, ...]
    steps: list[Step]
    outputs: list[int]
    head: bool
    seed: int

    def describe(self) -> str:
        lines = [f"input {self.input}"]
        lines += [
            f"v{i + 1} = {s.kind}{s.params} of {['v%d' % r for r in s.reads]} -> {s.shape}"
            for i, s in enumerate(self.steps)
        ]
        return "\n".join([*lines, f"outputs {self.outputs} head {self.head}"])


def _conv_shape(shape, out, k, stride, pad, dilation):
    n, _, h, w = shape
    top, left, bottom, right = pad
    oh = (h + top + bottom - dilation * (k - 1) - 1) // stride + 1
    ow = (w + left + right - dilation * (k - 1) - 1) // stride + 1
    return (n, out, oh, ow) if oh > 0 and ow > 0 else None


def _step(draw, values: list[tuple[int, ...]]) -> Step | None:
    kind = draw(st.sampled_from(KINDS))
    i = len(values) - 1 if draw(st.booleans()) else draw(st.integers(0, len(values) - 1))
    shape = values[i]
    if kind in ("conv", "depthwise", "grouped", "same_pad_conv"):
        k = draw(st.sampled_from([1, 3, 5, 7]))
        stride = draw(st.sampled_from([1, 2]))
        dilation = draw(st.sampled_from([1, 1, 2]))
        if kind == "same_pad_conv":  # TensorFlow's "same" for stride 2: more padding after than before
            extra = dilation * (k - 1)
            pad = (extra // 2, extra // 2, extra - extra // 2, extra - extra // 2)
        else:
            p = draw(st.integers(0, dilation * (k // 2)))
            pad = (p, p, p, p)
        out = shape[1] if kind == "depthwise" else draw(st.sampled_from(CHANNELS))
        result = _conv_shape(shape, out, k, stride, pad, dilation)
        divisors = [g for g in range(2, out + 1) if shape[1] % g == 0 and out % g == 0]
        if result is None or (kind == "grouped" and not divisors):
            return None
        params = {"k": k, "stride": stride, "pad": pad, "dilation": dilation, "bias": draw(st.booleans())}
        if kind == "grouped":
            params["groups"] = draw(st.sampled_from(divisors))
        return Step(kind, (i,), params, result)
    if kind == "act":
        return Step(kind, (i,), {"fn": draw(st.sampled_from(["relu", "relu6", "silu", "sigmoid"]))}, shape)
    if kind == "add":
        partners = [j for j, s in enumerate(values) if s == shape]
        return Step(kind, (i, draw(st.sampled_from(partners))), {"relu": draw(st.booleans())}, shape)
    if kind == "pool":
        k = draw(st.sampled_from([2, 3]))
        stride, pad = draw(st.sampled_from([1, 2])), draw(st.integers(0, k // 2))
        ceil = draw(st.booleans())
        out = [(s + 2 * pad - k + (stride - 1 if ceil else 0)) // stride + 1 for s in shape[2:]]
        out = [o - 1 if ceil and (o - 1) * stride >= s + pad else o for o, s in zip(out, shape[2:])]
        if min(out) < 1 or min(shape[2:]) + 2 * pad < k:
            return None
        params = {"max": draw(st.booleans()), "k": k, "stride": stride, "pad": pad, "ceil": ceil}
        return Step(kind, (i,), params, (*shape[:2], *out))
    if kind == "se":
        return Step(kind, (i,), {"squeeze": draw(st.sampled_from([4, 8]))}, shape)
    if kind == "cat":
        partners = [j for j, s in enumerate(values) if s[0] == shape[0] and s[2:] == shape[2:]]
        j = draw(st.sampled_from(partners))
        return Step(kind, (i, j), {}, (shape[0], shape[1] + values[j][1], *shape[2:]))
    if kind == "slice" and shape[1] >= 2:
        start = draw(st.integers(0, shape[1] - 1))
        end = draw(st.integers(start + 1, shape[1]))
        return Step(kind, (i,), {"start": start, "end": end}, (shape[0], end - start, *shape[2:]))
    return None


@st.composite
def cnn_specs(draw, max_steps: int = 8) -> CnnSpec:
    shape = (
        draw(st.sampled_from([1, 2])),
        draw(st.sampled_from(CHANNELS)),
        draw(st.integers(1, 12)),
        draw(st.integers(1, 12)),
    )
    values, steps = [shape], []
    for _ in range(draw(st.integers(1, max_steps))):
        step = _step(draw, values)
        if step is not None:
            steps.append(step)
            values.append(step.shape)
    read = {r for s in steps for r in s.reads}
    outputs = [i for i in range(1, len(values)) if i not in read] or [len(values) - 1]
    return CnnSpec(shape, steps, outputs, draw(st.booleans()), draw(st.integers(0, 2**16)))


class CnnModel(nn.Module):
    """Runs a :class:`CnnSpec`; its layers are drawn from the spec's seed."""

    def __init__(self, spec: CnnSpec):
        super().__init__()
        self.spec = spec
        torch.manual_seed(spec.seed)
        self.layers = nn.ModuleDict()
        shapes = [spec.input] + [s.shape for s in spec.steps]
        for number, step in enumerate(spec.steps, 1):
            channels, p = shapes[step.reads[0]][1], step.params
            if step.kind in ("conv", "depthwise", "grouped", "same_pad_conv"):
                groups = channels if step.kind == "depthwise" else p.get("groups", 1)
                padding = 0 if step.kind == "same_pad_conv" else p["pad"][0]
                self.layers[f"v{number}"] = nn.Conv2d(
                    channels, step.shape[1], p["k"], p["stride"], padding, p["dilation"], groups, p["bias"]
                )
            elif step.kind == "se":
                hidden = max(1, channels // p["squeeze"])
                self.layers[f"v{number}"] = nn.Sequential(
                    nn.Conv2d(channels, hidden, 1), nn.ReLU(), nn.Conv2d(hidden, channels, 1), nn.Sigmoid()
                )
        last = shapes[spec.outputs[-1]]
        self.head = nn.Linear(last[1], 5) if spec.head else None

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.randn(self.spec.input, generator=torch.Generator().manual_seed(self.spec.seed)),)

    def forward(self, x):
        values = [x]
        for number, step in enumerate(self.spec.steps, 1):
            a, p = values[step.reads[0]], step.params
            layer = self.layers[f"v{number}"] if f"v{number}" in self.layers else None
            if step.kind == "same_pad_conv":
                top, left, bottom, right = p["pad"]
                value = layer(F.pad(a, (left, right, top, bottom)))
            elif step.kind in ("conv", "depthwise", "grouped"):
                value = layer(a)
            elif step.kind == "act":
                value = {"relu": F.relu, "relu6": F.relu6, "silu": F.silu, "sigmoid": torch.sigmoid}[p["fn"]](a)
            elif step.kind == "add":
                value = a + values[step.reads[1]]
                value = F.relu(value) if p["relu"] else value
            elif step.kind == "pool":
                pool = F.max_pool2d if p["max"] else F.avg_pool2d
                value = pool(a, p["k"], p["stride"], p["pad"], ceil_mode=p["ceil"])
            elif step.kind == "se":
                value = a * layer(a.mean((2, 3), keepdim=True))
            elif step.kind == "cat":
                value = torch.cat([a, values[step.reads[1]]], 1)
            else:  # slice
                value = a[:, p["start"] : p["end"]]
            values.append(value)
        outputs = [values[i] for i in self.spec.outputs]
        if self.head is not None:
            outputs[-1] = self.head(outputs[-1].mean((2, 3)))
        return tuple(outputs)


@st.composite
def random_cnns(draw, max_steps: int = 8):
    """``(model, inputs)`` of a random valid CNN; the spec is ``model.spec`` (``model.spec.describe()``)."""
    spec = draw(cnn_specs(max_steps))
    model = CnnModel(spec).eval()
    return model, model.example_inputs()
