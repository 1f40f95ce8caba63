"""Properties over random model DAGs (:mod:`tests.property.dags`): fan-out, fan-in, broadcasting, reductions and
softmaxes over random axes, attention, norms, several inputs and outputs, float32/float16/bfloat16.

- Capture, every exact pass alone and the default pipeline keep the outputs within fxopt's default
  :class:`~fxopt.Tolerance` (rtol 1e-4 for float32, 1e-2 for half types).
- ``target="cpu"`` with ``dispatch="tvm"`` matches PyTorch (float32; every segment that lowers runs in TVM).
- ``prune-channels`` always yields a valid model with the same output shapes and no more parameters, and
  removing channels whose every weight and bias is zero changes nothing (it found a softmax coupling the
  channels it runs over when that was not pinned).
- ``quantize`` yields a valid graph with finite outputs of the same shapes, and every quantized layer, on the
  activation it reads, stays within the analytic bound of its float original (each value moved by at most
  half a step, bfloat16's 2⁻⁸ of its magnitude; see ``_check_layer_bounds``).

A failing example prints its spec (``spec.describe()``); reproduce it with the seed pytest's header prints
(``pytest --hypothesis-seed=N``), then pin it in the test file of the pass or op it broke.
"""

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from fxopt import PASSES, PassManager, Tolerance, capture, optimize
from fxopt.ir.layers import weighted_layers
from fxopt.ir.numerics import compare_outputs
from fxopt.passes.prune_channels import PruneChannels
from fxopt.prune.dependency import analyze
from fxopt.quant.formats import FORMATS, dequantize_groups, unpack_int4
from tests.passes.test_prune_channels import zero_channels
from tests.property.dags import ALONG, KINDS, REDUCE, random_dags

HALF = (torch.float32, torch.float16, torch.bfloat16)
EXACT_PASSES = sorted(name for name, cls in PASSES.items() if cls.exact)


def _within_bound(outputs, reference, what: str) -> None:
    worst_abs, worst_rel, failing = compare_outputs(list(outputs), list(reference), Tolerance())
    assert failing is None, f"{what}: output {failing} off by {worst_abs:.3g} (relative {worst_rel:.3g})"


def _reference(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# PyTorch-level: at least 100 models per run (0.4 s each); each runs one exact pass or the default pipeline
# (capture is most of the cost), so every pass meets half a dozen new models each run, new ones each commit.
@settings(max_examples=max(100, settings().max_examples))
@given(random_dags(dtypes=HALF), st.sampled_from([*EXACT_PASSES, "default"]))
def test_exact_passes_and_the_default_pipeline_keep_random_dags_within_bound(case, pipeline):
    model, inputs = case
    note(model.spec.describe())
    event(f"dtype {model.spec.dtype}")
    program = capture(model, inputs)
    reference = _reference(model, inputs)
    _within_bound(program.run_flat(), reference, "capture")
    optimized, _ = PassManager(pipeline, verify="off", calibration=[inputs]).run(program)
    _within_bound(optimized.run_flat(), reference, pipeline)


# Each example builds with TVM (seconds): at least 25 per run.
@settings(max_examples=max(25, settings().max_examples // 8))
@given(random_dags(max_steps=6))
def test_random_dags_built_for_the_cpu_match_pytorch(case):
    model, inputs = case
    note(model.spec.describe())
    result = optimize(model, inputs, target="cpu", dispatch="tvm", verify="off")
    _within_bound(result(*inputs), _reference(model, inputs), "target cpu")
    assert all(s.backend == "tvm" for s in result.report().segments), result.report().segments


# Layers weigh more here: their channels are what pruning removes, and what the ops after them couple.
@settings(max_examples=max(100, settings().max_examples))
@given(random_dags(kinds=(*KINDS, *["linear"] * 12, *["conv"] * 4, *ALONG, *REDUCE)), st.floats(0.1, 0.8), st.data())
def test_pruning_random_dags_is_valid_and_removing_zero_channels_is_exact(case, ratio, data):
    model, inputs = case
    note(model.spec.describe())
    program = capture(model, inputs)
    reference = program.run_flat()
    pruned, (record,) = PassManager([PruneChannels(ratio=ratio)], verify="off").run(program)  # IR verified
    outputs = pruned.run_flat()
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    assert all(torch.isfinite(o).all() for o in outputs if o.is_floating_point())
    assert record.params[1] <= record.params[0]

    # Channels whose every weight and bias is zero carry nothing to any layer: removing them is exact, unless
    # an op couples them with the rest (a softmax's denominator), which the analysis must have pinned, or a norm
    # takes its mean and variance over them, which it must have said (group.normalized: pruning it is lossy).
    graph = analyze(program)
    groups, _ = graph.groups()
    zeroed = 0
    for group in (g for g in groups if not g.normalized):
        channels = data.draw(st.lists(st.integers(0, group.size - 1), max_size=group.size - 1, unique=True))
        zero_channels(graph, group, channels)
        zeroed += len(channels)
    event(f"zeroed groups: {'some' if zeroed else 'none'}")
    if not zeroed:
        return
    exact = program.run_flat()  # with the zeroed weights
    spec = PruneChannels(
        ratio=(zeroed - 0.5) / sum(g.size for g in groups), target="channels", scope="global", head_dim=True
    )  # every group the analysis found is a candidate
    pruned, (record,) = PassManager([spec], verify="off").run(program)
    assert record.stats.get("channels-removed", 0) >= zeroed
    _within_bound(pruned.run_flat(), exact, "prune-channels of all-zero channels")


def _node_values(program) -> dict:
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    with torch.no_grad():
        Recorder(program.graph_module).run(*program.example_inputs)
    return values


@settings(max_examples=max(100, settings().max_examples))
@given(
    random_dags(kinds=(*KINDS, *["linear"] * 20, *["conv"] * 6)),
    st.sampled_from(["w8a8", "w8a8-dynamic", "w8", "w4", "fp8", "bf16"]),
    st.sampled_from([0, 2]),
    st.sampled_from(["symmetric", "asymmetric"]),
)
def test_quantizing_random_dags_keeps_every_layer_within_its_analytic_bound(case, scheme, group_size, weights):
    model, inputs = case
    note(model.spec.describe())
    program = capture(model, inputs)
    spec = f"quantize{{scheme={scheme} group-size={group_size} weights={weights}}}"
    quantized, _ = PassManager(spec, verify="off", calibration=[inputs]).run(program)  # IR verified
    outputs, reference = quantized.run_flat(), program.run_flat()
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    assert all(torch.isfinite(o).all() for o in outputs if o.is_floating_point())
    event(f"quantized layers: {min(_check_layer_bounds(program, quantized), 3)}+")


_QUANTIZED_LAYERS = (
    torch.ops.fxopt.linear_q.default,
    torch.ops.fxopt.conv_q.default,
    torch.ops.fxopt.linear_wq.default,
    torch.ops.fxopt.linear_bf16.default,
)

#: bfloat16's rounding (to nearest, 8 significand bits): at most 2⁻⁸ of a value's magnitude, and half of its least
#: subnormal step below the normal range.
BF16_UNIT, BF16_LEAST = 2.0**-8, 2.0**-134


def _check_layer_bounds(program, quantized) -> int:
    """Each quantized layer against its float original on the very activation it read (so errors of earlier
    layers do not count): every activation and weight moved by at most half a step (fp8: 2⁻⁴ of its magnitude
    plus half the least subnormal step; bfloat16: 2⁻⁸ of it; asymmetric weight groups: a whole step, their zero
    point is rounded) within the range its scale covers, and the output by at most what those moves can add up to,
    ``|Δx|·|W|ᵀ + |x̂|·|ΔW|ᵀ``, plus float32 rounding. Returns how many layers were checked."""
    values = _node_values(quantized)
    originals = {layer.node.name: layer for layer in weighted_layers(program)[0]}
    checked = 0
    for node in quantized.graph.nodes:
        if node.target not in _QUANTIZED_LAYERS:
            continue
        (origin,) = node.meta["fxopt_provenance"].origins
        layer = originals[origin]
        weight = layer.weight_value(program).detach().double()
        bias = None if layer.bias is None else program.get_constant(layer.bias.target).detach().double()
        if node.target is torch.ops.fxopt.linear_bf16.default:
            x = values[node.args[0]].double()
            x_hat, w_hat = x.bfloat16().double(), values[node.args[1]].double()
            _assert_moved_within(x, x_hat, x.abs() * BF16_UNIT + BF16_LEAST, f"the activation {origin} reads")
            _assert_moved_within(weight, w_hat, weight.abs() * BF16_UNIT + BF16_LEAST, f"{origin}'s weight")
        elif node.target is torch.ops.fxopt.linear_wq.default:
            x = x_hat = values[node.args[0]].double()
            stored, scale, zero_point, _, bits = (values.get(a, a) for a in node.args[1:])
            steps = scale.double().repeat_interleave(weight.shape[1] // scale.shape[1], dim=1)
            w_hat = dequantize_groups(unpack_int4(stored) if bits == 4 else stored, scale, zero_point).double()
            symmetric = bool((zero_point == (8 if bits == 4 else 0)).all())
            _assert_moved_within(weight, w_hat, steps / 2 if symmetric else steps, f"{origin}'s weight")
        else:
            xq, x_scale, x_zero_point, wq, w_scale = (values[a] for a in node.args[:5])
            fmt = FORMATS[node.args[0].args[3]]
            x = values[node.args[0].args[0]].double()
            x_hat = (xq.double() - x_zero_point.double()) * x_scale.double()
            channel = w_scale.double().reshape(-1, *[1] * (weight.dim() - 1))
            w_hat = wq.double() * channel
            lo = (fmt.qmin - x_zero_point.double()) * x_scale.double()
            hi = (fmt.qmax - x_zero_point.double()) * x_scale.double()
            if fmt.integer:
                x_steps, w_steps = x_scale.double() / 2 + (x - x.clamp(lo, hi)).abs(), channel / 2
            else:
                x_steps = x.abs() / 16 + x_scale.double() * 2.0**-10 + (x - x.clamp(lo, hi)).abs()
                w_steps = weight.abs() / 16 + channel * 2.0**-10
            _assert_moved_within(x, x_hat, x_steps, f"the activation {origin} reads")
            _assert_moved_within(weight, w_hat, w_steps, f"{origin}'s weight")

        def apply(x, w, b=None):
            if weight.dim() == 2:
                return torch.nn.functional.linear(x, w, b)
            stride, padding, dilation, groups = node.args[6:10]
            conv = {3: torch.nn.functional.conv1d, 4: torch.nn.functional.conv2d}[weight.dim()]
            return conv(x, w, b, stride, padding, dilation, groups)

        exact = apply(x, weight, bias)
        moved = apply((x_hat - x).abs(), weight.abs()) + apply(x_hat.abs(), (w_hat - weight).abs())
        rounding = 1e-5 * apply(x_hat.abs(), w_hat.abs(), None if bias is None else bias.abs()) + 1e-6
        error = (values[node].double() - exact).abs()
        worst = int((error - moved - rounding).argmax())
        assert (error <= moved + rounding).all(), (
            f"{origin}: output moved {error.flatten()[worst]:.3g}, more than the bound "
            f"{(moved + rounding).flatten()[worst]:.3g}"
        )
        checked += 1
    return checked


def _assert_moved_within(value, quantized, steps, what: str) -> None:
    moved = (quantized - value).abs()
    slack = 1e-6 * value.abs() + 1e-12  # the float32 division by the scale
    assert (moved <= steps + slack).all(), f"{what} moved {float((moved - steps).max()):.3g} past its bound"
