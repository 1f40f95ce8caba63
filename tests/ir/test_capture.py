import pytest
import torch
import torch.nn as nn

from fxopt import CaptureError, InputMismatchError, PassManager, capture
from fxopt.ir import is_canonical_target, source_location


class PytreeModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)
        self.drop = nn.Dropout(0.5)

    def forward(self, x, extras, *, scale):
        y = self.bn(self.conv(x)).relu().mean((2, 3))
        if x.shape[0] > 1:  # Python control flow on shapes: export specializes it
            y = y * 2
        return {"logits": self.drop(self.fc(y)) * scale, "aux": [y, extras["bias"] + 1]}


def _inputs():
    return (torch.randn(2, 3, 8, 8), {"bias": torch.randn(4)}), {"scale": torch.tensor(3.0)}


def test_captured_program_is_called_like_the_model_and_matches():
    model = PytreeModel()
    args, kwargs = _inputs()
    program = capture(model, args, kwargs)
    model.eval()
    got, want = program(*args, **kwargs), model(*args, **kwargs)
    assert set(got) == {"logits", "aux"} and len(got["aux"]) == 2
    torch.testing.assert_close(got["logits"], want["logits"])
    torch.testing.assert_close(got["aux"][1], want["aux"][1])


def test_every_node_carries_metadata_and_canonical_ops():
    program = capture(PytreeModel(), *_inputs())
    for node in program.graph.nodes:
        if node.op == "call_function":
            assert is_canonical_target(node.target), node.target
        if node.op in ("placeholder", "get_attr", "call_function"):
            assert "val" in node.meta, node.name
    ops = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "aten.linear.default" in ops  # preserved whole, not view/addmm
    assert not any(n.op == "placeholder" and "weight" in n.name for n in program.graph.nodes)  # not lifted


def test_source_location_points_at_the_model_not_torch():
    program = capture(PytreeModel(), *_inputs())
    conv = next(n for n in program.graph.nodes if n.target is torch.ops.aten.convolution.default)
    assert source_location(conv).startswith(__file__)
    assert "in forward" in source_location(conv)


def test_users_model_is_not_modified():
    model = PytreeModel().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {k: v for k, v in model.named_parameters()}
    program = capture(model, *_inputs())
    program.to(torch.float64)  # converting the capture must not convert the model
    assert model.training and model.bn.training  # training flags restored
    for k, v in model.state_dict().items():
        assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    assert all(p is params[k] for k, p in model.named_parameters())


def test_data_dependent_branch_names_module_and_line():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(4, 4)

        def forward(self, x):
            return self.inner(x)

    class Inner(nn.Linear):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent: export cannot trace this
                return x
            return -x

    model = Branchy()
    model.inner = Inner(4, 4)
    with pytest.raises(CaptureError) as info:
        capture(model, (torch.randn(2, 4),))
    message = str(info.value)
    assert "inner (Inner)" in message
    assert f"{__file__}:" in message
    assert "torch.cond" in message or "torch.where" in message


def test_non_module_is_rejected_clearly():
    with pytest.raises(CaptureError, match="torch.nn.Module"):
        capture(lambda x: x, (torch.randn(1),))


def test_state_mutation_in_eval_is_rejected():
    class Counter(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("calls", torch.zeros(()))

        def forward(self, x):
            self.calls.add_(1)
            return x * 2

    with pytest.raises(CaptureError, match="calls"):
        capture(Counter(), (torch.randn(2),))


def test_wrong_shape_or_dtype_gives_input_mismatch():
    program = capture(nn.Linear(4, 2), (torch.randn(3, 4),))
    with pytest.raises(InputMismatchError, match="shape 5x4.*3x4"):
        program(torch.randn(5, 4))
    with pytest.raises(InputMismatchError, match="dtype"):
        program(torch.randn(3, 4, dtype=torch.float64))


def test_dynamic_batch_dimension_survives_the_pipeline():
    batch = torch.export.Dim("batch")
    model = nn.Sequential(nn.Linear(4, 2), nn.Dropout(0.1))
    program = capture(model, (torch.randn(3, 4),), dynamic_shapes=({0: batch},))
    optimized, records = PassManager("default").run(program)
    assert records[0].changed  # the dropout copy went
    x = torch.randn(7, 4)
    with torch.no_grad():
        torch.testing.assert_close(optimized(x), model.eval()(x))
