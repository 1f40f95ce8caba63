import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fxopt import PassManager, capture
from fxopt.errors import PipelineError
from fxopt.ir.block_costs import conv_geometry_key, write_block_costs
from fxopt.passes import Pipeline, parse_pipeline
from fxopt.passes.convert_layout import channel_block
from fxopt.passes.pipeline import with_pass
from fxopt.passes.registry import BUILTIN_PIPELINES
from tests.passes.helpers import ops, run_pass
from tests.property.cnns import CnnModel, CnnSpec, Step

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt


class TinyResNet(nn.Module):
    """A stem on an RGB image, a max pool, a bottleneck with its residual add, a global mean, a linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 16, 7, 2, 3)
        self.reduce, self.conv, self.expand = nn.Conv2d(16, 8, 1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 16, 1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        y = self.expand(F.relu(self.conv(F.relu(self.reduce(x)))))
        return self.head(F.relu(x + y).mean((2, 3)))


def test_a_cnn_converts_at_its_input_and_its_head_only():
    model, inputs = TinyResNet().eval(), (torch.randn(2, 3, 20, 20),)
    _, after, record = run_pass(model, inputs, "convert-layout{lanes=8}")
    found = ops(after)
    # The mean over H and W of a blocked [N, C/8, H, W, 8] is [N, C/8, 8]: the head reads it as [N, C], as it is.
    assert found.count(fxopt_ops.to_blocked.default) == 1 and fxopt_ops.from_blocked.default not in found
    assert found.count(fxopt_ops.conv2d_blocked.default) == 4 and aten.convolution.default not in found
    assert fxopt_ops.pool2d_blocked.default in found
    assert record.stats["convs"] == 4 and "converted-back" not in record.stats and not record.notes
    blocks = {n.args[-1] for n in after.graph.nodes if n.target is fxopt_ops.conv2d_blocked.default}
    assert blocks == {8}
    (stem_input,) = [n for n in after.graph.nodes if n.target is fxopt_ops.to_blocked.default]
    assert stem_input.args[1] == 1  # an RGB image: blocks of one channel, NCHW itself


def test_sixteen_lanes_block_by_sixteen():
    _, after, _ = run_pass(TinyResNet().eval(), (torch.randn(1, 3, 16, 16),), "convert-layout{lanes=16}")
    blocks = [n.args[-1] for n in after.graph.nodes if n.target is fxopt_ops.conv2d_blocked.default]
    assert blocks == [16, 8, 8, 16]


class SamePadded(nn.Module):
    """TensorFlow's "same" padding for a stride-2 convolution (MobileNet in ``transformers``): a zero pad, one
    pixel more after than before, then an unpadded convolution."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(8, 8, 3, 2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


def test_a_zero_pad_before_a_convolution_becomes_its_padding_one_sided_too():
    _, after, _ = run_pass(SamePadded().eval(), (torch.randn(1, 8, 10, 10),), "convert-layout{lanes=8},dce")
    assert aten.constant_pad_nd.default not in ops(after)
    (conv,) = [n for n in after.graph.nodes if n.target is fxopt_ops.conv2d_blocked.default]
    assert conv.args[4] == [0, 0, 1, 1]  # top, left, bottom, right


class Unblockable(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.grouped, self.odd = nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 18, 1)

    def forward(self, x):
        return self.odd(self.grouped(x))


def test_convolutions_no_kernel_takes_blocked_stay_nchw_and_the_report_says_why():
    _, after, record = run_pass(Unblockable().eval(), (torch.randn(1, 8, 6, 6),), "convert-layout{lanes=8}")
    assert ops(after).count(aten.convolution.default) == 1  # the grouped one is blocked
    (grouped,) = [n for n in after.graph.nodes if n.target is fxopt_ops.conv2d_blocked.default]
    assert grouped.args[6] == 2 and record.stats["grouped-convs"] == 1
    assert [note for note in record.notes if "output channels" in note] == record.notes
    assert any("18 output channels have no block of up to 8" in note for note in record.notes)


class SqueezeExcite(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.squeeze, self.excite = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)

    def forward(self, x):
        x = F.relu6(self.depthwise(x))
        return x * torch.sigmoid(self.excite(F.relu(self.squeeze(x.mean((2, 3), keepdim=True)))))


def test_squeeze_excitation_stays_blocked():
    _, after, record = run_pass(SqueezeExcite().eval(), (torch.randn(1, 16, 7, 7),), "convert-layout{lanes=8}")
    assert record.stats["depthwise-convs"] == 1 and record.stats["convs"] == 2
    assert ops(after).count(fxopt_ops.from_blocked.default) == 1  # the output


class Branches(nn.Module):
    """Two parallel 1x1 convolutions (merged by ``fuse-blocks`` into one, then sliced apart), concatenated."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = nn.Conv2d(8, 16, 1), nn.Conv2d(8, 8, 1), nn.Conv2d(24, 8, 3)

    def forward(self, x):
        return self.c(torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1))


def test_slices_and_concatenations_of_whole_blocks_stay_blocked():
    model, inputs = Branches().eval(), (torch.randn(1, 8, 6, 6),)
    program = capture(model, inputs)
    after, records = PassManager("fuse-blocks,convert-layout{lanes=8},dce", verify="each").run(program)
    found = ops(after)
    assert records[0].changed and found.count(aten.slice.Tensor) == 2 and aten.cat.default in found
    assert found.count(fxopt_ops.from_blocked.default) == 1 and found.count(fxopt_ops.to_blocked.default) == 1


@pytest.mark.parametrize(
    "channels, lanes, block",
    [
        (64, 8, 8),
        (64, 16, 16),
        (24, 16, 8),
        (12, 8, 4),
        (3, 8, 1),
        (2, 8, 1),
        (6, 8, 6),
        (18, 8, None),
        (18, 16, None),
        (1, 8, 1),
    ],
)
def test_the_block_of_a_tensor_is_a_function_of_its_channels(channels, lanes, block):
    assert channel_block(channels, lanes) == block


def test_the_cpu_pipeline_converts_layouts_and_the_default_does_not():
    assert "convert-layout" in BUILTIN_PIPELINES["cpu"] and "convert-layout" not in BUILTIN_PIPELINES["default"]


def test_a_one_element_value_the_pass_blocked_is_read_blocked_not_broadcast_as_a_number():
    # Found by the random CNNs: an SE on a 1x1 image squeezes 3 channels into 1; the [1, 1, 1, 1] value after
    # it is one element, and was taken for a single number beside the blocked values.
    spec = CnnSpec((1, 3, 1, 1), [Step("se", (0,), {"squeeze": 4}, (1, 3, 1, 1))], [1], False, 0)
    model = CnnModel(spec).eval()
    _, after, _ = run_pass(model, model.example_inputs(), "convert-layout{lanes=8}")
    relu = next(n for n in after.graph.nodes if n.target is aten.relu.default)
    assert relu.args[0].target is fxopt_ops.conv2d_blocked.default


def test_a_concatenation_is_blocked_by_a_block_that_divides_every_parts_channels():
    # Found by the random CNNs: 4 channels (blocked by 4) and an RGB input's 3 were both re-blocked by 3.
    steps = [
        Step("conv", (0,), {"k": 1, "stride": 1, "pad": (0, 0, 0, 0), "dilation": 1, "bias": False}, (1, 4, 2, 2)),
        Step("cat", (1, 0), {}, (1, 7, 2, 2)),
    ]
    model = CnnModel(CnnSpec((1, 3, 2, 2), steps, [2], False, 0)).eval()
    _, after, _ = run_pass(model, model.example_inputs(), "convert-layout{lanes=8}")
    (cat,) = [n for n in after.graph.nodes if n.target is aten.cat.default]
    assert all(part.args[1] == 1 for part in cat.args[0])  # gcd(4, 3) = 1: blocks of one channel


def test_quantize_goes_before_the_layout_conversion_whose_convolutions_it_would_not_see():
    with pytest.raises(PipelineError, match="'quantize' must run before 'convert-layout'"):
        Pipeline.parse("cpu,quantize")
    (quantize,) = parse_pipeline("quantize")
    passes = [p.name for p in with_pass(parse_pipeline("cpu"), quantize)]
    assert passes.index("quantize") == passes.index("convert-layout") - 1
    assert [p.name for p in with_pass(parse_pipeline("default"), quantize)][-1] == "quantize"


class QuantizedBlock(nn.Module):
    """An RGB stem, a residual 3x3, a strided 1x1 with twice the channels, a 1x1 to 6 channels, a global mean:
    quantized, every convolution reads a quantized input."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.conv = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.down, self.head = nn.Conv2d(16, 32, 1, stride=2), nn.Conv2d(32, 6, 1)

    def forward(self, x):
        y = F.relu(self.stem(x))
        return self.head(F.relu(self.down(F.relu(self.conv(y) + y)))).mean((2, 3))


def test_quantized_convolutions_and_their_quantizations_stay_blocked_between_them():
    x = torch.randn(2, 3, 10, 9)
    (quantize,) = parse_pipeline("quantize")
    quantized, _ = PassManager([quantize], calibration=[x]).run(capture(QuantizedBlock().eval(), (x,)))
    after, (record,) = PassManager("convert-layout{lanes=16}", verify="each").run(quantized)  # exact: verified
    found = ops(after)
    # The image is quantized NCHW and read in blocks of 1 (NCHW itself) by the RGB stem; from there the 3x3, the
    # add, the ReLUs, the quantizations and the strided 1x1 read and write blocked values. The head's 6 output
    # channels have no int8 block (a vector's): it stays NCHW, its input converted back.
    assert found.count(fxopt_ops.conv_q.default) == 1 and found.count(fxopt_ops.conv_q_blocked.default) == 3
    assert found.count(fxopt_ops.to_blocked.default) == 1 and found.count(fxopt_ops.from_blocked.default) == 1
    quantizations = [n for n in after.graph.nodes if n.target is fxopt_ops.quantize.default]
    assert [n.meta["val"].dim() for n in quantizations] == [4, 5, 5, 5]
    assert record.stats["quantized-convs"] == 3 and "stays NCHW" not in str(record.notes)
    assert any("no int8 blocks" in note for note in record.notes)


class QuantizedInvertedResidual(nn.Module):
    """MobileNetV2's block, as ``transformers`` spells it: an expanding 1x1, a strided depthwise 3x3 after an
    explicit zero pad (TensorFlow's "same" padding), a projecting 1x1 to 24 channels (blocks of 8, not of a
    vector), then a 1x1 reading them; ReLU6 between (the cpu pipeline would fold two 1x1 in a row into one)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.expand = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 48, 1)
        self.depthwise = nn.Conv2d(48, 48, 3, stride=2, groups=48)
        self.project, self.head = nn.Conv2d(48, 24, 1), nn.Conv2d(24, 32, 1)

    def forward(self, x):
        y = F.relu6(self.expand(F.relu6(self.stem(x))))
        y = F.relu6(self.depthwise(F.pad(y, (0, 1, 0, 1))))
        return self.head(F.relu6(self.project(y))).mean((2, 3))


def test_quantized_depthwise_convolutions_and_their_padding_stay_blocked():
    x = torch.randn(2, 3, 10, 9)
    (quantize,) = parse_pipeline("quantize")
    model = QuantizedInvertedResidual().eval()
    quantized, _ = PassManager([quantize], calibration=[x]).run(capture(model, (x,)))
    assert torch.ops.aten.constant_pad_nd.default in ops(quantized)  # quantized after the pad: NCHW there
    after, (record,) = PassManager("convert-layout{lanes=16}", verify="each").run(quantized)  # exact: verified
    found = ops(after)
    # Every convolution blocked, the pad folded into the depthwise one's (the zero point pads it), the 24
    # projected channels in blocks of 8; one conversion into the layout (the image's).
    assert found.count(fxopt_ops.conv_q_blocked.default) == 5 and fxopt_ops.conv_q.default not in found
    assert torch.ops.aten.constant_pad_nd.default not in found
    assert found.count(fxopt_ops.to_blocked.default) == 1
    blocks = [n.args[11] for n in after.graph.nodes if n.target is fxopt_ops.conv_q_blocked.default]
    assert blocks == [16, 16, 16, 8, 16]
    depthwise = next(n for n in after.graph.nodes if n.target is fxopt_ops.conv_q_blocked.default and n.args[9] > 1)
    assert depthwise.args[7] == [0, 0, 1, 1]
    assert record.stats["quantized-convs"] == 5


def test_a_graph_with_a_dynamic_batch_is_left_nchw():
    # Its convolutions run in PyTorch (TVM builds static shapes), where the blocked ops only cost.
    model, inputs = TinyResNet().eval(), (torch.randn(2, 3, 20, 20),)
    program = capture(model, inputs, dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=8)},))
    after, (record,) = PassManager("convert-layout{lanes=8}", verify="each").run(program)
    assert not record.changed and fxopt_ops.conv2d_blocked.default not in ops(after)
    assert any("symbolic shapes" in note for note in record.notes)


class Chain(nn.Module):
    """Three convolutions of 16 channels; with ``residual``, the third reads the sum of the first two's results."""

    def __init__(self, residual=False):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1)
        self.third = nn.Conv2d(16, 16, 1)
        self.residual = residual

    def forward(self, x):
        a = F.relu(self.first(x))
        b = F.relu(self.second(a))
        return self.third(a + b if self.residual else b)


# The chain's convolutions on a [1, 8, 12, 12] input, as block costs name them.
FIRST = conv_geometry_key(1, 8, 12, 12, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
SECOND = conv_geometry_key(1, 16, 12, 12, 16, (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 1)
THIRD = conv_geometry_key(1, 16, 12, 12, 16, (1, 1), (1, 1), (0, 0, 0, 0), (1, 1), 1)


def _searched(model, costs, tmp_path):
    write_block_costs(tmp_path / "blocks.json", costs)
    spec = f'convert-layout{{lanes=8 block-costs="{tmp_path / "blocks.json"}"}}'
    _, after, record = run_pass(model.eval(), (torch.randn(1, 8, 12, 12),), spec)  # verified: exact
    blocks = [n.args[-1] for n in after.graph.nodes if n.target is fxopt_ops.conv2d_blocked.default]
    return blocks, record, ops(after)


def test_measured_block_costs_choose_a_convolutions_block_by_what_its_readers_cost_too(tmp_path):
    # Blocks of 4 out of the first convolution cost it nothing more and make the second 5x faster.
    costs = {
        FIRST: {(8, 8): 10.0, (8, 4): 10.0},
        SECOND: {(8, 8): 100.0, (4, 8): 20.0, (8, 4): 100.0, (4, 4): 100.0},
        THIRD: {(8, 8): 10.0, (4, 8): 10.0},
    }
    blocks, record, _ = _searched(Chain(), costs, tmp_path)
    assert blocks == [4, 8, 8] and record.stats["searched-blocks"] == 1
    costs[SECOND][4, 8] = 100.0  # no gain: the blocks of the channels stay
    blocks, record, _ = _searched(Chain(), costs, tmp_path)
    assert blocks == [8, 8, 8] and "searched-blocks" not in record.stats


@pytest.mark.parametrize("saving, reblocked", [(1.0, False), (50.0, True)])
def test_a_block_that_a_residual_add_must_convert_is_chosen_only_when_it_saves_more_than_the_conversion(
    tmp_path, saving, reblocked
):
    # The second convolution writes blocks of 4 faster; the add then converts its result to the first's block of 8
    # (16 x 12 x 12 floats: ~4.4 us at REBLOCK_US_PER_MIB), which the third reads.
    costs = {
        FIRST: {(8, 8): 10.0},
        SECOND: {(8, 8): 100.0, (8, 4): 100.0 - saving},
        THIRD: {(8, 8): 10.0},
    }
    blocks, _, found = _searched(Chain(residual=True), costs, tmp_path)
    assert blocks == ([8, 4, 8] if reblocked else [8, 8, 8])
    # the input's conversion, and the second's result converted back and into the other block
    assert found.count(fxopt_ops.to_blocked.default) == (2 if reblocked else 1)


@pytest.mark.parametrize("text", ['{"1x8": {"eight": 1}}', '{"1x8": {"0,8": 1}}', "[1, 2]", "{"])
def test_a_file_that_is_not_block_costs_is_an_error_naming_it(tmp_path, text):
    (tmp_path / "blocks.json").write_text(text)
    with pytest.raises(Exception, match="blocks.json is not a file of convolution block costs"):
        run_pass(
            Chain().eval(), (torch.randn(1, 8, 12, 12),), f'convert-layout{{block-costs="{tmp_path}/blocks.json"}}'
        )
