import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from tests.passes.helpers import ops, run_pass
from tests.passes.test_fold_conv_bn import assert_close, randomized

aten = torch.ops.aten
CONV, LINEAR, SLICE = aten.convolution.default, aten.linear.default, aten.slice.Tensor


def conv_bn(cin, cout, kernel, padding, groups=1, stride=1):
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=False), randomized(nn.BatchNorm2d(cout))
    )


class RepVGGBlock(nn.Module):
    """3x3+BN, 1x1+BN and (stride 1, same width) identity-BN branches, summed (RepVGG, Ding et al. 2021)."""

    def __init__(self, cin, cout, stride=1, groups=1):
        super().__init__()
        self.dense = conv_bn(cin, cout, 3, 1, groups, stride)
        self.pointwise = conv_bn(cin, cout, 1, 0, groups, stride)
        self.identity = randomized(nn.BatchNorm2d(cin)) if cin == cout and stride == 1 else None

    def forward(self, x):
        y = self.dense(x) + self.pointwise(x)
        return (y + self.identity(x) if self.identity is not None else y).relu()


@pytest.mark.parametrize("cin, cout, stride, groups", [(4, 4, 1, 1), (4, 4, 1, 2), (4, 6, 2, 1), (6, 6, 2, 3)])
def test_repvgg_branches_become_one_conv(cin, cout, stride, groups):
    torch.manual_seed(0)
    model = RepVGGBlock(cin, cout, stride, groups).eval()
    inputs = (torch.randn(2, cin, 9, 9),)
    after, (_, record, _) = PassManager("fold-conv-bn,fuse-blocks,dce", verify="each").run(capture(model, inputs))
    assert ops(after) == [CONV, aten.relu.default]
    assert record.stats["branches-merged"] == 1 and "FLOPs" in record.notes[0]
    conv = next(n for n in after.graph.nodes if n.target is CONV)
    assert conv.args[8] == groups and list(conv.args[3]) == [stride, stride]
    assert after.get_constant(conv.args[1].target).shape[-2:] == (3, 3)
    assert_close(after, model, inputs)


class AsymmetricBlock(nn.Module):
    """ACNet's 3x3 + 1x3 + 3x1 branches and a DBB-style average-pool branch."""

    def __init__(self):
        super().__init__()
        self.square = nn.Conv2d(4, 4, 3, padding=1)
        self.row = nn.Conv2d(4, 4, (1, 3), padding=(0, 1))
        self.column = nn.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False)
        self.pool = nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        return self.square(x) + self.row(x) + self.column(x) + self.pool(x)


def test_asymmetric_and_pooling_branches_pad_into_the_largest_kernel():
    torch.manual_seed(0)
    model = AsymmetricBlock().eval()
    inputs = (torch.randn(1, 4, 7, 7),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after) == [CONV] and record.stats["branches-merged"] == 1
    assert_close(after, model, inputs)


class DepthwisePlusPointwise(nn.Module):
    def __init__(self):
        super().__init__()
        self.depthwise, self.pointwise = nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.Conv2d(8, 8, 1)

    def forward(self, x):
        return self.depthwise(x) + self.pointwise(x)


def test_a_merge_that_costs_more_flops_is_skipped_with_the_numbers():
    _, after, record = run_pass(DepthwisePlusPointwise().eval(), (torch.randn(1, 8, 6, 6),), "fuse-blocks")
    assert ops(after).count(CONV) == 2
    assert "one conv would cost" in record.notes[0] and record.stats["skipped"] == 1


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Conv2d(4, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        return self.second(self.first(x).relu()) + x


def test_a_residual_connection_is_not_a_block_and_is_left_alone_quietly():
    _, after, record = run_pass(Residual().eval(), (torch.randn(1, 4, 6, 6),), "fuse-blocks")
    assert not record.changed and not record.notes


class ConvPlusItsInput(nn.Module):
    """A branch input that is itself a conv output: conv_b(y) + y."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x):
        y = self.a(x)
        return self.b(y) + y


def test_the_block_input_may_itself_be_a_conv_output():
    model = ConvPlusItsInput().eval()
    inputs = (torch.randn(1, 3, 8, 8),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after) == [CONV, CONV] and record.stats["branches-merged"] == 1
    assert_close(after, model, inputs)


class TwoLinears(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.up, self.down = nn.Linear(16, hidden), nn.Linear(hidden, 16)

    def forward(self, x):
        return self.down(self.up(x))


def test_back_to_back_linears_merge_when_that_lowers_flops():
    model = TwoLinears(32).eval()  # 16 -> 32 -> 16 costs 1024 MACs per row, one 16 -> 16 costs 256
    inputs = (torch.randn(3, 5, 16),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after) == [LINEAR] and record.stats["serial-linears-merged"] == 1
    assert_close(after, model, inputs)


def test_a_bottleneck_is_cheaper_left_alone():
    _, after, record = run_pass(TwoLinears(4).eval(), (torch.randn(3, 16),), "fuse-blocks")
    assert ops(after) == [LINEAR, LINEAR] and "would raise FLOPs" in record.notes[0]


class ExpandThenReduce(nn.Module):
    """2 -> 16 -> 2 channels through a 1x1 and a 3x3 conv (in either order): one 2 -> 2 3x3 conv is cheaper."""

    def __init__(self, bias, padding, order):
        super().__init__()
        if order == "pointwise-first":
            self.layers = nn.Sequential(nn.Conv2d(2, 16, 1, bias=bias), nn.Conv2d(16, 2, 3, padding=padding))
        else:
            self.layers = nn.Sequential(nn.Conv2d(2, 16, 3, padding=padding), nn.Conv2d(16, 2, 1, bias=bias))

    def forward(self, x):
        return self.layers(x)


@pytest.mark.parametrize(
    "bias, padding, order, merges",
    [
        (False, 1, "pointwise-first", True),
        (True, 0, "pointwise-first", True),
        (True, 1, "pointwise-first", False),  # the padded border would see the 1x1 conv's bias
        (True, 1, "pointwise-second", True),
    ],
)
def test_a_1x1_conv_merges_with_its_neighbour_when_exact(bias, padding, order, merges):
    torch.manual_seed(0)
    model = ExpandThenReduce(bias, padding, order).eval()
    inputs = (torch.randn(1, 2, 6, 6),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after).count(CONV) == (1 if merges else 2)
    if not merges:
        assert "border would see the bias" in record.notes[0]
    assert_close(after, model, inputs)


class Attention(nn.Module):
    """Q/K/V projections of one input, the first without bias."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(8, 8, bias=False), nn.Linear(8, 8), nn.Linear(8, 4)

    def forward(self, x):
        return torch.softmax(self.q(x) @ self.k(x).transpose(1, 2), -1) @ self.v(x)


def test_parallel_projections_become_one_wide_linear_and_slices():
    torch.manual_seed(0)
    model = Attention().eval()
    inputs = (torch.randn(2, 5, 8),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after).count(LINEAR) == 1 and ops(after).count(SLICE) == 3
    assert record.stats["parallel-linears-merged"] == 3 and "20 wide" in record.notes[0]
    assert_close(after, model, inputs)


def test_min_width_keeps_narrow_parallel_layers_apart():
    _, after, record = run_pass(Attention().eval(), (torch.randn(2, 5, 8),), "fuse-blocks{min-width=64}")
    assert ops(after).count(LINEAR) == 3 and "less than min-width=64" in record.notes[0]


class SharedProjection(nn.Module):
    """One linear applied twice to the same input (a weight-tied pair), optionally beside another."""

    def __init__(self, other: bool):
        super().__init__()
        self.shared, self.other = nn.Linear(8, 4), nn.Linear(8, 6) if other else None

    def forward(self, x):
        y = self.shared(x).tanh() + self.shared(x).sigmoid()
        return y if self.other is None else (y, self.other(x))


# Pinned from hypothesis (test_default_pipeline_preserves_outputs_and_never_grows_the_graph): the
# twins were stacked into one linear 2x wide, growing the graph by a slice and a weight.
def test_twin_layers_are_left_to_cse_and_share_one_slice_when_merged():
    torch.manual_seed(0)
    inputs = (torch.randn(2, 8),)
    model = SharedProjection(other=False).eval()
    _, after, record = run_pass(model, inputs, "fuse-blocks")
    assert not record.changed and ops(after).count(LINEAR) == 2
    model = SharedProjection(other=True).eval()
    before, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after).count(LINEAR) == 1 and ops(after).count(SLICE) == 2
    assert record.stats["parallel-linears-merged"] == 2 and "10 wide" in record.notes[0]
    assert len(after.graph.nodes) < len(before.graph.nodes)
    assert_close(after, model, inputs)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.branches = nn.ModuleList([nn.Conv2d(4, c, 1) for c in (2, 3, 5)])
        self.tail = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return torch.cat([b(x).relu() for b in self.branches], 1), self.tail(x)


def test_parallel_1x1_convs_merge_but_not_with_a_different_kernel():
    torch.manual_seed(0)
    model = Inception().eval()
    inputs = (torch.randn(1, 4, 6, 6),)
    _, after, record = run_pass(model, inputs, "fuse-blocks,dce")
    assert ops(after).count(CONV) == 2 and record.stats["parallel-convs-merged"] == 3
    assert_close(after, model, inputs)


def test_options_round_trip_and_switch_rewrites_off():
    spec = "fuse-blocks{branches=false serial=true parallel=false min-width=16}"
    assert str(PassManager(spec).pipeline.passes[0]) == spec
    _, after, _ = run_pass(Attention().eval(), (torch.randn(2, 5, 8),), "fuse-blocks{parallel=false}")
    assert ops(after).count(LINEAR) == 3
