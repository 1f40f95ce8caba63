import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.calibration import Calibration, data_nodes, gradients, observe
from fxopt.errors import FxoptError, InputMismatchError, PassError, PipelineError
from fxopt.passes.pipeline import Pipeline


class TwoLayer(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 3)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def program():
    return capture(TwoLayer(), (torch.randn(2, 4),))


def test_a_stack_of_samples_is_split_into_batches_of_the_captured_size():
    calibration = Calibration.coerce(torch.randn(6, 4))
    batches = list(calibration.flat_batches(program()))
    assert [b[0].shape for b in batches] == [torch.Size([2, 4])] * 3


def test_batches_that_do_not_fit_the_model_name_the_batch():
    calibration = Calibration.coerce([torch.randn(2, 4), torch.randn(2, 5)])
    with pytest.raises(InputMismatchError, match="batch 1.*shape 2x5"):
        list(calibration.flat_batches(program()))


def test_bad_calibration_input_is_a_clear_error(tmp_path):
    with pytest.raises(FxoptError, match="no batches"):
        Calibration.coerce([])
    with pytest.raises(FxoptError, match="iterable"):
        Calibration.coerce(3)
    with pytest.raises(FxoptError, match="cannot read calibration file"):
        Calibration.coerce(tmp_path / "missing.pt")


def test_pipeline_calibration_table_reads_a_file_relative_to_the_pipeline(tmp_path):
    data = [torch.randn(2, 4) for _ in range(5)]
    torch.save(data, tmp_path / "calib.pt")
    (tmp_path / "p.toml").write_text('passes = ["dce"]\n[calibration]\ndata = "calib.pt"\nbatches = 3\n')
    pipeline = Pipeline.load(tmp_path / "p.toml")
    assert len(pipeline.calibration) == 3
    torch.testing.assert_close(pipeline.calibration.batches[2], data[2])
    (tmp_path / "bad.toml").write_text('passes = ["dce"]\n[calibration]\npath = "calib.pt"\n')
    with pytest.raises(PipelineError, match="bad.toml.*'data'"):
        Pipeline.load(tmp_path / "bad.toml")
    # optimize(..., calibration=...) / PassManager(calibration=...) override the file's.
    assert len(PassManager(pipeline, calibration=data).calibration) == 5


def test_observe_streams_every_batch_through_the_watched_values():
    p = program()
    batches = [torch.randn(2, 4) for _ in range(3)]
    relu = next(n for n in p.graph.nodes if n.target is torch.ops.aten.relu.default)
    seen = []
    observe(p, Calibration.coerce(batches), {relu: seen.append})
    model = TwoLayer()
    for value, x in zip(seen, batches):
        torch.testing.assert_close(value, torch.relu(model.fc1(x)))
    assert relu in data_nodes(p) and not any(n.op == "get_attr" for n in data_nodes(p))


def test_gradients_match_autograd_on_the_model():
    p = program()
    batches = [torch.randn(2, 4) for _ in range(2)]
    got = {}
    gradients(
        p,
        Calibration.coerce(batches),
        [t for t, _ in p.constants()],
        lambda t, w, g: got.__setitem__(t, got.get(t, 0) + g),
    )
    model = TwoLayer()
    for x in batches:
        (0.5 * model(x).pow(2).mean()).backward()
    by_shape = {tuple(v.shape): v for v in got.values()}
    torch.testing.assert_close(by_shape[(8, 4)], model.fc1.weight.grad)
    torch.testing.assert_close(by_shape[(3, 8)], model.fc2.weight.grad)


def test_gradients_of_no_constants_are_none_and_no_error():
    # Pinned (hypothesis, tests/property/test_prune_channels.py): importance=taylor on a tiny transformer whose
    # groups were all pinned asked autograd for the gradients of nothing, which it refuses.
    got = []
    gradients(program(), Calibration.coerce([torch.randn(2, 4)]), [], lambda *args: got.append(args))
    assert got == []


def test_a_pass_that_needs_calibration_says_how_to_give_it():
    with pytest.raises(PassError, match="importance=activation needs calibration data.*calibration="):
        PassManager("prune-channels{importance=activation}").run(program())


def test_bad_calibration_files_and_tables_name_the_culprit(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a tensor file")
    with pytest.raises(FxoptError, match="calibration file .*junk.pt is not a torch.save.d list of tensor batches"):
        Calibration.coerce(tmp_path / "junk.pt")
    with pytest.raises(PipelineError, match="batches must be a positive integer, got 'x'"):
        Calibration.coerce({"data": "calib.pt", "batches": "x"}, base=tmp_path)
