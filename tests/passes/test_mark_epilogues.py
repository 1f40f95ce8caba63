import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.ir.meta import epilogue_group
from fxopt.zoo import load_zoo_model
from tests.passes.helpers import ops, run_pass

aten = torch.ops.aten


def groups(program):
    found: dict[str, list[str]] = {}
    for node in program.graph.nodes:
        if (group := epilogue_group(node)) is not None:
            found.setdefault(group, []).append(node.name)
    return found


class Block(nn.Module):
    """conv+bias+relu; conv+scale+residual+relu; a linear whose output is also returned (no epilogue)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 1, bias=False)
        self.register_buffer("shift", torch.randn(4, 1, 1))
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        y = (self.a(x) + self.shift).relu()
        z = (self.b(y) * 0.5 + x).relu()
        h = self.fc(z.mean((2, 3)))
        return z, h, h.sigmoid()


def test_epilogue_chains_are_marked_and_nothing_else_changes():
    model = Block().eval()
    inputs = (torch.randn(1, 4, 6, 6),)
    before, after, record = run_pass(model, inputs, "mark-epilogues")
    assert ops(after) == ops(before)
    marked = groups(after)
    assert sorted(map(len, marked.values())) == [3, 4]  # conv, add, relu / conv, mul, add, relu
    assert dict(record.stats) == {"conv+bias+relu": 1, "conv+scale+residual+relu": 1}
    assert all(name.startswith("convolution") for name in marked)


def test_a_second_run_replaces_stale_marks():
    program = capture(Block().eval(), (torch.randn(1, 4, 6, 6),))
    once, _ = PassManager("mark-epilogues").run(program)
    twice, _ = PassManager("mark-epilogues,mark-epilogues").run(program)
    assert groups(once) == groups(twice)


class TwoAnchors(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return (self.a(x) + self.b(x)).relu()


def test_an_add_of_two_anchors_joins_the_later_one():
    _, after, record = run_pass(TwoAnchors().eval(), (torch.randn(1, 3, 4, 4),), "mark-epilogues")
    assert list(groups(after).values()) == [["convolution_1", "add", "relu"]]
    assert dict(record.stats) == {"conv+residual+relu": 1}


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet-tiny", {"conv+relu": 5, "conv+residual+relu": 2}),
        ("mobilenet_v2-tiny", {"conv+hardtanh": 35, "conv+residual": 10}),
        ("bert-tiny", {"linear+residual": 4, "linear+gelu": 2, "linear+tanh": 1}),
    ],
)
def test_default_pipeline_marks_the_epilogues_of_real_models(name, expected):
    model, inputs = load_zoo_model(name)
    _, records = PassManager("default", verify="off").run(capture(model, inputs))
    assert records[-1].name == "mark-epilogues" and dict(records[-1].stats) == expected
