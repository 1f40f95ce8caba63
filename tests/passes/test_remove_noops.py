import torch
import torch.nn as nn

from tests.passes.helpers import assert_same_outputs, ops, run_pass

aten = torch.ops.aten


class Noops(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        y = self.drop(self.fc(x)).contiguous()
        y = y.view(2, 6).reshape(2, 6).permute(0, 1)
        y = torch.cat([y], dim=1)[:, 0:6]
        y = (y * 1 + 0 - 0) / 1
        return y.to(torch.float32).relu()


def test_noops_are_removed_and_outputs_unchanged():
    x = (torch.randn(2, 6),)
    model = Noops()
    before, after, record = run_pass(model, x, "remove-noops,dce")
    assert ops(after) == [aten.linear.default, aten.relu.default]
    assert record.changed and sum(record.stats.values()) >= 8
    assert_same_outputs(model, after, x)


def test_ops_that_change_dtype_shape_or_strides_stay():
    class NotNoops(nn.Module):
        def forward(self, x, i):
            a = i * 1.0  # int -> float: not a no-op
            b = x.expand(3, 4).clone().view(12)  # clone makes the expand viewable
            c = x.permute(1, 0)
            return a, b, c

    inputs = (torch.randn(1, 4), torch.arange(3))
    model = NotNoops()
    _, after, _ = run_pass(model, inputs, "remove-noops")
    assert aten.mul.Tensor in ops(after)
    assert aten.clone.default in ops(after)
    assert aten.permute.default in ops(after)
    assert_same_outputs(model, after, inputs)


def test_copies_protecting_inputs_and_weights_stay():
    class Copies(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3))

        def forward(self, x):
            return x.clone(), self.w.clone(), (x + 1).clone()

    x = (torch.randn(3),)
    model = Copies()
    _, after, record = run_pass(model, x, "remove-noops")
    assert ops(after).count(aten.clone.default) == 2  # x.clone() and w.clone() keep outputs from aliasing
    outputs = after(*x)
    assert outputs[0].data_ptr() != x[0].data_ptr()
    assert outputs[1].data_ptr() != model.w.data_ptr()
