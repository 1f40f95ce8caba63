"""``prune-channels`` on random CNNs (residuals, concats, depthwise and grouped convs) and transformers (MHA, GQA,
gated MLPs, Pre-LN).

Properties: at any ratio in [0, 0.9], with any target, scope and importance,
the result is a valid dense graph with the model's output shapes that meets
the requested reduction (or says how much could be removed); and channels
whose every weight is exactly zero are removed first without changing any
output (float32 summation order aside: rtol 1e-5).
"""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fxopt import PassManager, capture
from fxopt.ir.channels import analyze
from fxopt.passes.prune_channels import PruneChannels
from tests.passes.test_prune_channels import zero_channels
from tests.property.generators import prunable_models

aten = torch.ops.aten


@given(prunable_models(), st.floats(0, 0.9), st.sampled_from(["flops", "params", "channels"]),
       st.sampled_from(["uniform", "global"]), st.sampled_from(["l1", "l2", "bn-scale", "random"]),
       st.booleans(), st.booleans(), st.sampled_from([1, 2, 4]))
def test_pruning_always_yields_a_valid_smaller_model(model, ratio, target, scope, importance, heads, head_dim,
                                                     round_to):
    program = capture(model, (model.example_input(),))
    spec = PruneChannels(ratio=ratio, target=target, scope=scope, importance=importance, heads=heads,
                         head_dim=head_dim, round_to=round_to)
    pruned, (record,) = PassManager([spec], verify="off").run(program)  # the manager verifies the IR
    (out,), (reference,) = pruned.run_flat(), program.run_flat()
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert record.params[1] <= record.params[0] and record.flops[1] <= record.flops[0]
    short = any("can be removed" in n for n in record.notes)
    if target != "channels" and record.changed and not short:
        before, after = record.flops if target == "flops" else record.params
        assert after <= (1 - ratio) * before + 1e-6 * before


@given(prunable_models(), st.data())
def test_all_zero_channels_are_removed_first_and_exactly(model, data):
    program = capture(model, (model.example_input(),))
    graph = analyze(program)
    groups, _ = graph.groups()
    # A norm over a group's channels (LayerNorm of the stream) averages over them: removing zeros is not exact there.
    exact = [g for g in groups if "head-dim" not in g.roles
             and not any(m.role == "param" and m.node.target is aten.layer_norm.default for m in g.members)]
    zeroed = 0
    for group in exact:
        channels = data.draw(st.lists(st.integers(0, group.size - 1), max_size=group.size - 1, unique=True))
        if channels:
            zero_channels(graph, group, channels)
            zeroed += len(channels)
    reference = program.run_flat()
    candidates = sum(g.size for g in groups if "head-dim" not in g.roles)
    assume(candidates > 0)
    spec = PruneChannels(ratio=max(zeroed - 0.5, 0) / candidates, target="channels", scope="global")
    pruned, (record,) = PassManager([spec], verify="off").run(program)
    assert record.stats.get("channels-removed", 0) == zeroed
    torch.testing.assert_close(pruned.run_flat(), reference, rtol=1e-5, atol=1e-5)
