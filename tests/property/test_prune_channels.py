"""``prune-channels`` on random CNNs (residuals, concats, depthwise and grouped convs) and transformers (MHA, GQA,
gated MLPs, Pre-LN).

Properties: at any ratio in [0, 0.9], with any target, scope and importance,
with or without reconstruction, the result is a valid dense graph with the model's output shapes that meets
the requested reduction (or says how much could be removed); and channels
whose every weight is exactly zero are removed first without changing any
output (float32 summation order aside: rtol 1e-5), ranked by weight (l1) or
by activation on calibration data (where units silent on that data go too,
as exactly). Taylor importance is not in the second property: a zero
gradient does not make a channel removable.
"""

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from fxopt import PassManager, capture
from fxopt.passes.prune_channels import PruneChannels
from fxopt.prune.dependency import analyze
from tests.passes.test_prune_channels import weight, zero_channels
from tests.property.generators import prunable_models

aten = torch.ops.aten


@settings(max_examples=max(4, settings().max_examples // 2))  # tests/property/test_random_dags.py draws more
@given(
    prunable_models(),
    st.floats(0, 0.9),
    st.sampled_from(["flops", "params", "channels"]),
    st.sampled_from(["uniform", "global"]),
    st.sampled_from(["l1", "l2", "bn-scale", "taylor", "activation", "fisher", "random"]),
    st.booleans(),
    st.booleans(),
    st.sampled_from([1, 2, 4]),
    st.booleans(),
)
def test_pruning_always_yields_a_valid_smaller_model(
    model, ratio, target, scope, importance, heads, head_dim, round_to, reconstruct
):
    program = capture(model, (model.example_input(),))
    spec = PruneChannels(
        ratio=ratio,
        target=target,
        scope=scope,
        importance=importance,
        heads=heads,
        head_dim=head_dim,
        round_to=round_to,
        reconstruct=reconstruct,
    )
    calibration = [model.example_input(), model.example_input(seed=1)]
    pruned, (record,) = PassManager([spec], verify="off", calibration=calibration).run(program)  # IR verified
    (out,), (reference,) = pruned.run_flat(), program.run_flat()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert record.params[1] <= record.params[0] and record.flops[1] <= record.flops[0]
    short = any("can be removed" in n for n in record.notes)
    if target != "channels" and record.changed and not short:
        before, after = record.flops if target == "flops" else record.params
        assert after <= (1 - ratio) * before + 1e-6 * before


@settings(max_examples=max(4, settings().max_examples // 2))  # tests/property/test_random_dags.py draws more
@given(prunable_models(), st.sampled_from(["l1", "activation"]), st.data())
def test_all_zero_channels_are_removed_first_and_exactly(model, importance, data):
    program = capture(model, (model.example_input(),))
    graph = analyze(program)
    groups, _ = graph.groups()
    # A norm over a group's channels (LayerNorm of the stream) averages over them: removing zeros is not exact there.
    exact = [
        g
        for g in groups
        if "head-dim" not in g.roles
        and not any(m.role == "param" and m.node.target is aten.layer_norm.default for m in g.members)
    ]
    zeroed = 0
    for group in exact:
        channels = data.draw(st.lists(st.integers(0, group.size - 1), max_size=group.size - 1, unique=True))
        if channels:
            zero_channels(graph, group, channels)
            zeroed += len(channels)
    reference = program.run_flat()
    candidates = sum(g.size for g in groups if "head-dim" not in g.roles)
    assume(candidates > 0)
    spec = PruneChannels(
        ratio=max(zeroed - 0.5, 0) / candidates, target="channels", scope="global", importance=importance
    )
    # Calibrated on the inputs it is checked on: a unit silent there scores zero too, and goes just as exactly.
    calibration = list(program.example_inputs)
    pruned, (record,) = PassManager([spec], verify="off", calibration=calibration).run(program)
    removed = record.stats.get("channels-removed", 0)
    assert removed == zeroed if importance == "l1" else removed >= zeroed
    torch.testing.assert_close(pruned.run_flat(), reference, rtol=1e-5, atol=1e-5)


class LinearPair(torch.nn.Module):
    def __init__(self, inputs, hidden, outputs, norm, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2 = torch.nn.Linear(inputs, hidden), torch.nn.Linear(hidden, outputs)
        self.norm = torch.nn.BatchNorm1d(hidden) if norm else torch.nn.Identity()
        if norm:
            self.norm.running_mean.uniform_(-1, 1)
            self.norm.running_var.uniform_(0.5, 2)
            torch.nn.init.uniform_(self.norm.weight, 0.5, 2)
            torch.nn.init.uniform_(self.norm.bias, -1, 1)

    def forward(self, x):
        return self.fc2(self.norm(self.fc1(x)))


@given(st.integers(1, 4), st.integers(0, 6), st.integers(1, 4), st.booleans(), st.integers(0, 2**16))
def test_compensation_is_exact_when_removed_channels_are_combinations_of_kept_ones(inputs, spare, outputs, norm, seed):
    # With only linear ops between the layers, every hidden channel is an affine function of the `inputs` inputs:
    # any `inputs + 1` kept channels in general position rebuild the removed ones exactly.
    hidden = inputs + 1 + spare + 1
    model = LinearPair(inputs, hidden, outputs, norm, seed).eval()
    x = torch.randn(3, inputs, generator=torch.Generator().manual_seed(seed))
    program = capture(model, (x,))
    spec = PruneChannels(ratio=(spare + 0.5) / hidden, target="channels", compensate=True)
    pruned, (record,) = PassManager([spec], verify="off").run(program)
    assert record.stats["channels-removed"] == spare + 1 and record.stats["groups-compensated"] == 1
    # Exact in float64; float32 weights hold the combination while the kept channels are not near-dependent.
    # (Pinned below: a kept set with condition number 1.5e3 missed by 1.4% while the solve used a ridge.)
    kept = _kept_rows(model, weight(pruned, "fc1"))
    assume(torch.linalg.cond(_responses(model)[kept]) < 1e5)
    (reference,) = program.run_flat()
    torch.testing.assert_close(pruned.run_flat([x])[0], reference, rtol=1e-3, atol=1e-3 * reference.abs().max())


def _responses(model: LinearPair) -> torch.Tensor:
    """Each hidden channel as an affine function of the inputs: weight row and bias, through the batch norm."""
    weight, bias = model.fc1.weight.detach().double(), model.fc1.bias.detach().double()
    if isinstance(model.norm, torch.nn.BatchNorm1d):
        norm = model.norm
        scale = (norm.weight / (norm.running_var + norm.eps).sqrt()).detach().double()
        weight, bias = weight * scale[:, None], (bias - norm.running_mean) * scale + norm.bias.detach().double()
    return torch.cat([weight, bias[:, None]], 1)


def _kept_rows(model: LinearPair, pruned_weight: torch.Tensor) -> list[int]:
    original = model.fc1.weight.detach()
    return [int((original - row).abs().sum(1).argmin()) for row in pruned_weight]


@given(prunable_models(), st.floats(0.1, 0.7))
def test_compensation_never_raises_the_output_error(model, ratio):
    program = capture(model, (model.example_input(),))
    (reference,) = program.run_flat()
    errors = []
    for compensate in (False, True):
        pruned, _ = PassManager([PruneChannels(ratio=ratio, compensate=compensate)], verify="off").run(program)
        (out,) = pruned.run_flat()
        errors.append(float((out - reference).norm() / reference.norm()))
    assert errors[1] <= errors[0] * (1 + 1e-6) + 1e-9


def test_compensation_pinned_example_with_near_dependent_kept_channels():
    # Found by the property above once the ci profile explored new seeds (inputs=4, spare=5, outputs=1,
    # norm=True, seed=59936): the normal equations with a ridge missed by 1.4%.
    test_compensation_is_exact_when_removed_channels_are_combinations_of_kept_ones.hypothesis.inner_test(
        4, 5, 1, True, 59936
    )
