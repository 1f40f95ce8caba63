"""``prune-channels{reconstruct=true}``: the layers reading pruned channels re-fitted on calibration data.

Properties: on two-layer models (linear or conv, with or without a ReLU and a
bias), re-fitting never raises the output layer's error against the unpruned
model on the calibration data, whatever is pruned; and when the removed
hidden units are exact combinations of kept ones (any linear combination
without an activation, a positive multiple of one kept unit through a ReLU),
prune + reconstruct gives back the unpruned outputs on inputs it was not
fitted to.
"""

import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from fxopt import PassManager, capture
from fxopt.passes.prune_channels import PruneChannels


class Pair(torch.nn.Module):
    """layer -> (ReLU) -> layer, as linears on [n, features] or 3x3 convs on [n, channels, 6, 6]."""

    def __init__(self, conv, inputs, hidden, outputs, relu, bias, seed):
        super().__init__()
        torch.manual_seed(seed)
        if conv:
            self.first = torch.nn.Conv2d(inputs, hidden, 3, padding=1)
            self.second = torch.nn.Conv2d(hidden, outputs, 3, padding=1, bias=bias)
        else:
            self.first, self.second = torch.nn.Linear(inputs, hidden), torch.nn.Linear(hidden, outputs, bias=bias)
        self.conv, self.inputs, self.relu = conv, inputs, relu

    def forward(self, x):
        hidden = self.first(x)
        return self.second(torch.relu(hidden) if self.relu else hidden)

    def batch(self, seed, n=12):
        shape = (n // 4, self.inputs, 6, 6) if self.conv else (n, self.inputs)
        return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


models = st.builds(
    Pair,
    st.booleans(),
    st.integers(1, 4),
    st.integers(2, 12),
    st.integers(1, 4),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)


def _prune(model, spec, calibration):
    program = capture(model, (calibration[0],))
    pruned, (record,) = PassManager([spec], verify="off", calibration=calibration).run(program)
    return program, pruned, record


def _error(program, reference, batches):
    return sum(float((program.run_flat([b])[0] - reference.run_flat([b])[0]).double().square().sum()) for b in batches)


@given(models, st.floats(0.1, 0.8), st.integers(1, 6), st.integers(0, 2**16))
def test_reconstruction_never_raises_the_layers_calibration_error(model, ratio, batches, seed):
    calibration = [model.batch(seed + i) for i in range(batches)]
    options = {"ratio": ratio, "target": "channels"}
    program, plain, plain_record = _prune(model, PruneChannels(**options), calibration)
    _, fitted, record = _prune(model, PruneChannels(**options, reconstruct=True), calibration)
    assert record.stats["channels-removed"] == plain_record.stats["channels-removed"]  # the same channels went
    # The second layer is the output: its error on every calibration row, held-out ones included.
    assert _error(fitted, program, calibration) <= _error(plain, program, calibration) * (1 + 1e-6) + 1e-9
    if record.stats["layers-reconstructed"] == 0:
        assert any("left" in n for n in record.notes)  # said why


@given(models, st.data())
def test_reconstruction_is_exact_when_removed_units_are_combinations_of_kept_ones(model, data):
    hidden = model.first.weight.shape[0]
    kept = hidden - data.draw(st.integers(1, hidden - 1))
    mixes = []
    for _ in range(kept, hidden):
        if model.relu:  # relu(s * z) = s * relu(z) for s > 0: a positive multiple of one kept unit
            mix = torch.zeros(kept)
            mix[data.draw(st.integers(0, kept - 1))] = data.draw(st.floats(0.01, 0.05))
        else:  # any linear combination
            mix = torch.tensor(data.draw(st.lists(st.floats(-0.05, 0.05), min_size=kept, max_size=kept))) / kept
        mixes.append(mix)
    assert_exact_after_removing_combinations(model, mixes)


def test_an_exact_fit_is_kept_where_the_held_out_rows_did_not_need_it():
    # Pinned from CI seed 2695808901: the held-out rows never reached the removed units (plain pruning 2e-8 off
    # there, 5e-4 on the fitted rows), so the exact re-fit (3.8e-8: float32 rounding) was rejected as no better.
    model = Pair(False, 2, 6, 1, True, False, 6379)
    mix = torch.tensor([0.0, 0.0, 0.0, 0.03125])
    assert_exact_after_removing_combinations(model, [mix, mix])


def assert_exact_after_removing_combinations(model, mixes: list[torch.Tensor]) -> None:
    """Make ``model``'s last hidden units the combinations ``mixes`` of its first ones; pruning them with
    reconstruction must then give the unpruned outputs on inputs it was not fitted to."""
    first, second = model.first, model.second
    hidden, removed = first.weight.shape[0], len(mixes)
    kept = hidden - removed
    with torch.no_grad():
        rows = first.weight.reshape(hidden, -1)
        for unit, mix in zip(range(kept, hidden), mixes):
            rows[unit] = mix @ rows[:kept]
            first.bias[unit] = mix @ first.bias[:kept]
        # L1 ranks the removed units last: their weights are small, every kept unit's outgoing ones sum to 1 or more.
        columns = second.weight.reshape(second.weight.shape[0], hidden, -1)
        columns[:, kept:] *= 0.2
        columns[:, :kept] /= columns[:, :kept].abs().sum((0, 2), keepdim=True).clamp_max(1)
    calibration = [model.batch(seed) for seed in range(4)]
    unseen = model.batch(99)
    # Exact on unseen inputs only if the rows it is fitted to (the first three batches) span what they bring.
    fitted_rows, all_rows = _features(model, torch.cat(calibration[:3]), kept), _features(model, unseen, kept)
    rank = torch.linalg.matrix_rank(fitted_rows, rtol=1e-7)
    assume(rank == torch.linalg.matrix_rank(torch.cat([fitted_rows, all_rows]), rtol=1e-7))
    spec = PruneChannels(ratio=(removed - 0.5) / hidden, target="channels", reconstruct=True)
    program, pruned, record = _prune(model, spec, calibration)
    assert record.stats["channels-removed"] == removed
    assert any("'second'" in n for n in record.notes if "reconstructed" in n or "left" in n)  # it was fitted
    (reference,) = program.run_flat([unseen])
    tolerance = 1e-4 * float(reference.abs().max()) + 1e-7
    torch.testing.assert_close(pruned.run_flat([unseen])[0], reference, rtol=1e-4, atol=tolerance)


def _features(model, x, kept):
    """What the second layer reads of the first ``kept`` hidden units (im2col for a conv), with a column of ones."""
    with torch.no_grad():
        hidden = model.first(x)[:, :kept].double()
        hidden = torch.relu(hidden) if model.relu else hidden
        if model.conv:
            hidden = torch.nn.functional.unfold(hidden, 3, padding=1).transpose(1, 2).reshape(-1, kept * 9)
    return torch.cat([hidden, torch.ones(len(hidden), 1, dtype=hidden.dtype)], 1)
