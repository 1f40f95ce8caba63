"""Properties over random model DAGs (:mod:`tests.property.dags`): fan-out, fan-in, broadcasting, reductions and
softmaxes over random axes, attention, norms, several inputs and outputs, float32/float16/bfloat16.

- Capture, every exact pass alone and the default pipeline keep the outputs within fxopt's default
  :class:`~fxopt.Tolerance` (rtol 1e-4 for float32, 1e-2 for half types).
- ``target="cpu"`` with ``dispatch="tvm"`` matches PyTorch (float32; every segment that lowers runs in TVM).
- ``prune-channels`` always yields a valid model with the same output shapes and no more parameters, and
  removing channels that are zero in every tensor they index changes nothing.
- ``quantize`` yields a valid graph with finite outputs of the same shapes.

A failing example prints its spec (``spec.describe()``); reproduce it with the seed pytest's header prints
(``pytest --hypothesis-seed=N``), then pin it in the test file of the pass or op it broke.
"""

import pytest
import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from fxopt import PASSES, PassManager, Tolerance, capture, optimize
from fxopt.ir.channels import analyze
from fxopt.passes.manager import compare_outputs
from fxopt.passes.prune_channels import PruneChannels
from tests.property.dags import KINDS, random_dags

HALF = (torch.float32, torch.float16, torch.bfloat16)
EXACT_PASSES = sorted(name for name, cls in PASSES.items() if cls.exact)


def _within_bound(outputs, reference, what: str) -> None:
    worst_abs, worst_rel, failing = compare_outputs(list(outputs), list(reference), Tolerance())
    assert failing is None, f"{what}: output {failing} off by {worst_abs:.3g} (relative {worst_rel:.3g})"


def _reference(model, inputs):
    with torch.no_grad():
        return model(*inputs)


# PyTorch-level: at least 200 models per run; each runs one exact pass or the default pipeline (capture is
# most of the cost), so every pass meets a dozen new models each run.
@settings(max_examples=max(200, settings().max_examples))
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
@given(random_dags(kinds=(*KINDS, *["linear"] * 12, *["conv"] * 4)), st.floats(0.1, 0.8), st.data())
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

    graph = analyze(program)
    groups, _ = graph.groups()
    zeroed = 0
    for group in groups:
        channels = data.draw(st.lists(st.integers(0, group.size - 1), max_size=group.size - 1, unique=True))
        if channels and _zero_everywhere(graph, group, channels):
            zeroed += len(channels)
    event(f"zeroed groups: {'some' if zeroed else 'none'}")
    if not zeroed:
        return
    exact = program.run_flat()  # with the zeroed weights
    spec = PruneChannels(ratio=(zeroed - 0.5) / sum(g.size for g in groups), target="channels", scope="global")
    pruned, (record,) = PassManager([spec], verify="off").run(program)
    assert record.stats.get("channels-removed", 0) >= zeroed
    _within_bound(pruned.run_flat(), exact, "prune-channels of all-zero channels")


def _zero_everywhere(graph, group, channels) -> bool:
    """Zero the group's weights at ``channels``; keep that (True) only if every tensor the group indexes is then
    zero there on the example inputs, else put the weights back (False). Pruning such channels must be exact."""
    from tests.passes.test_prune_channels import zero_channels

    program = graph.program
    saved = {target: program.get_constant(target) for target, _ in group.constants}
    zero_channels(graph, group, channels)
    values = _node_values(program)
    wanted = torch.tensor(channels)
    for node, value in values.items():
        trees = graph.value_dims(node)
        if not isinstance(value, torch.Tensor) or len(trees) != value.dim():
            continue
        for d, tree in enumerate(trees):
            positions = torch.nonzero(torch.isin(graph.coordinates(tree, group.space), wanted)).flatten()
            if len(positions) and value.index_select(d, positions).abs().max() > 0:
                _restore(program, saved)
                return False
    return True


def _node_values(program) -> dict:
    values = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            values[node] = super().run_node(node)
            return values[node]

    with torch.no_grad():
        Recorder(program.graph_module).run(*program.example_inputs)
    return values


def _restore(program, saved) -> None:
    from fxopt.ir.program import attribute_owner

    for target, value in saved.items():
        owner, attr = attribute_owner(program.graph_module, target)
        setattr(owner, attr, value)


@settings(max_examples=max(50, settings().max_examples))
@given(random_dags(), st.sampled_from(["w8a8", "w8a8-dynamic", "w8", "fp8"]))
def test_quantizing_random_dags_yields_valid_graphs(case, scheme):
    model, inputs = case
    note(model.spec.describe())
    program = capture(model, inputs)
    spec = f"quantize{{scheme={scheme} group-size=0}}"
    quantized, _ = PassManager(spec, verify="off", calibration=[inputs]).run(program)  # IR verified
    outputs, reference = quantized.run_flat(), program.run_flat()
    assert [o.shape for o in outputs] == [r.shape for r in reference]
    assert all(torch.isfinite(o).all() for o in outputs if o.is_floating_point())
