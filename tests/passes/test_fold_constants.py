import torch
import torch.nn as nn

from fxopt import PassManager, capture
from tests.passes.helpers import ops, run_pass

aten = torch.ops.aten


class ScaledWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.register_buffer("pos", torch.arange(8.0))

    def forward(self, x):
        w = self.fc.weight.t().t() * 2 + 1
        return nn.functional.linear(x, w, self.fc.bias) + self.pos.sin()


def test_parameter_only_subgraphs_become_constants():
    x = (torch.randn(3, 8),)
    model = ScaledWeights()
    before, after, record = run_pass(model, x, "fold-constants,dce")
    assert aten.sin.default in ops(before)
    assert ops(after) == [aten.linear.default, aten.add.Tensor]
    assert record.stats["subgraphs-folded"] == 2  # the weight chain and pos.sin(), each folded once
    folded = [n for n in after.graph.nodes if n.op == "get_attr" and "fxopt_provenance" in n.meta]
    assert {n.meta["fxopt_provenance"].pass_name for n in folded} == {"fold-constants"}
    with torch.no_grad():
        torch.testing.assert_close(after(*x), model(*x))


def test_user_parameters_are_not_written():
    model = ScaledWeights()
    weight = model.fc.weight.detach().clone()
    run_pass(model, (torch.randn(3, 8),), "fold-constants")
    assert torch.equal(model.fc.weight, weight)


def test_growth_limit_keeps_large_expansions_symbolic():
    class Expand(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.randn(16))

        def forward(self, x):
            return x + self.bias.expand(64, 16) * 2

    x = (torch.randn(64, 16),)
    program = capture(Expand(), x)
    _, (record,) = PassManager("fold-constants{max-new-elements=100}").run(program)
    assert record.stats["skipped"] == 1 and "folding adds" in record.notes[0]
    small, (record,) = PassManager("fold-constants").run(program)
    assert record.stats["subgraphs-folded"] == 1
    with torch.no_grad():
        torch.testing.assert_close(small.run_flat(), program.run_flat())
