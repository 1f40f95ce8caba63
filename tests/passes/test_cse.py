import torch
import torch.nn as nn

from tests.passes.helpers import assert_same_outputs, ops, run_pass

aten = torch.ops.aten


class Duplicates(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        a = torch.tanh(self.fc(x)) + torch.tanh(self.fc(x))
        return a + 1, a + 1.0, torch.rand_like(x) * 0 + torch.rand_like(x) * 0


def test_identical_pure_ops_merge_and_random_ops_do_not():
    x = (torch.randn(2, 4),)
    model = Duplicates()
    before, after, record = run_pass(model, x, "cse")
    assert ops(before).count(aten.linear.default) == 2
    assert ops(after).count(aten.linear.default) == 1
    assert ops(after).count(aten.tanh.default) == 1
    assert ops(after).count(aten.rand_like.default) == 2  # random: never merged
    assert record.stats["nodes-merged"] == 2
    torch.testing.assert_close(after.run_flat()[0], model(*x)[0])


def test_literals_of_different_types_stay_apart():
    class IntAdd(nn.Module):
        def forward(self, x):
            return x + 1, x + 1.0, x + True

    x = (torch.arange(4),)
    before, after, record = run_pass(IntAdd(), x, "cse")
    assert ops(after).count(aten.add.Tensor) == 3
    assert [t.dtype for t in after.run_flat()] == [torch.int64, torch.float32, torch.int64]
    assert not record.changed
    assert_same_outputs(IntAdd(), after, x)
