import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.errors import PipelineError
from tests.passes.helpers import ops, run_pass

aten = torch.ops.aten
BATCH_NORM = aten._native_batch_norm_legit_no_training.default


def randomized(bn: nn.Module) -> nn.Module:
    """A BatchNorm with non-trivial running statistics and affine parameters."""
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.25, 2)
    if bn.affine:
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    return bn


def assert_close(program, model, inputs, rtol=1e-5, atol=1e-5):
    with torch.no_grad():
        torch.testing.assert_close(program(*inputs), model(*inputs), rtol=rtol, atol=atol)


CONVS = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, bias=False), nn.BatchNorm1d, (2, 4, 9)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1), nn.BatchNorm2d, (2, 4, 9, 9)),
    "conv3d": (lambda: nn.Conv3d(4, 6, 3, dilation=2, padding=2, bias=False), nn.BatchNorm3d, (1, 4, 7, 7, 7)),
    "grouped": (lambda: nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d, (2, 4, 9, 9)),
    "depthwise": (lambda: nn.Conv2d(4, 4, 3, groups=4, bias=False), lambda c: nn.BatchNorm2d(c), (2, 4, 9, 9)),
    "transposed1d": (lambda: nn.ConvTranspose1d(4, 6, 3, stride=2), nn.BatchNorm1d, (2, 4, 9)),
    "transposed2d": (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2, bias=False), nn.BatchNorm2d, (2, 4, 5, 5)),
    "transposed3d": (lambda: nn.ConvTranspose3d(4, 6, 2, stride=2, output_padding=1), nn.BatchNorm3d, (1, 4, 3, 3, 3)),
}


@pytest.mark.parametrize("kind", sorted(CONVS))
def test_batch_norm_after_a_conv_folds_into_it(kind):
    conv, norm, shape = CONVS[kind]
    torch.manual_seed(0)
    layer = conv()
    model = nn.Sequential(layer, randomized(norm(layer.out_channels))).eval()
    inputs = (torch.randn(shape),)
    before, after, record = run_pass(model, inputs, "fold-conv-bn,dce")
    assert BATCH_NORM in ops(before) and ops(after) == [aten.convolution.default]
    folded = "conv-transpose" if "transposed" in kind else "conv"
    assert record.stats[f"batch-norm-into-{folded}"] == 1
    conv_node = next(n for n in after.graph.nodes if n.op == "call_function")
    assert conv_node.meta["fxopt_provenance"].pass_name == "fold-conv-bn"
    assert_close(after, model, inputs)


class LinearThenNorm(nn.Module):
    """Linear + BatchNorm1d on a batch of vectors, and on a sequence (features moved to dim 1 by a transpose)."""

    def __init__(self, bias: bool):
        super().__init__()
        self.fc, self.norm = nn.Linear(5, 7, bias=bias), randomized(nn.BatchNorm1d(7))
        self.seq_fc, self.seq_norm = nn.Linear(5, 7, bias=bias), randomized(nn.BatchNorm1d(7))

    def forward(self, x, seq):
        return self.norm(self.fc(x)), self.seq_norm(self.seq_fc(seq).transpose(1, 2))


@pytest.mark.parametrize("bias", [True, False])
def test_batch_norm_after_a_linear_folds_with_and_without_batch_dims(bias):
    model = LinearThenNorm(bias).eval()
    inputs = (torch.randn(3, 5), torch.randn(2, 4, 5))
    _, after, record = run_pass(model, inputs, "fold-conv-bn")
    assert BATCH_NORM not in ops(after)
    assert record.stats["batch-norm-into-linear"] == 2
    assert_close(after, model, inputs)


def test_batch_norm_on_the_wrong_dim_of_a_linear_is_skipped():
    model = nn.Sequential(nn.Linear(5, 4), randomized(nn.BatchNorm1d(3))).eval()  # normalizes dim 1 (length 3)
    _, after, record = run_pass(model, (torch.randn(2, 3, 5),), "fold-conv-bn")
    assert BATCH_NORM in ops(after)
    assert "channels are another dim" in record.notes[0]


class NormThenLayer(nn.Module):
    def __init__(self, padding: int, groups: int = 1):
        super().__init__()
        self.norm = randomized(nn.BatchNorm2d(4))
        self.conv = nn.Conv2d(4, 6, 3, padding=padding, groups=groups)

    def forward(self, x):
        return self.conv(self.norm(x))


@pytest.mark.parametrize("groups", [1, 2])
def test_batch_norm_before_an_unpadded_conv_folds_into_it(groups):
    model = NormThenLayer(padding=0, groups=groups).eval()
    inputs = (torch.randn(2, 4, 8, 8),)
    _, after, record = run_pass(model, inputs, "fold-conv-bn")
    assert ops(after) == [aten.convolution.default]
    assert record.stats["batch-norm-into-following-conv"] == 1
    assert_close(after, model, inputs)


def test_batch_norm_before_a_padded_conv_is_skipped_with_the_reason():
    model = NormThenLayer(padding=1).eval()
    _, after, record = run_pass(model, (torch.randn(2, 4, 8, 8),), "fold-conv-bn")
    assert BATCH_NORM in ops(after) and record.stats["skipped"] == 1
    assert "pads its input" in record.notes[0] and "norm (BatchNorm2d)" in record.notes[0]


def test_batch_norm_before_a_linear_folds_into_it():
    model = nn.Sequential(randomized(nn.BatchNorm1d(5)), nn.Linear(5, 3)).eval()
    inputs = (torch.randn(4, 5),)
    _, after, record = run_pass(model, inputs, "fold-conv-bn")
    assert ops(after) == [aten.linear.default] and record.stats["batch-norm-into-following-linear"] == 1
    assert_close(after, model, inputs)


class SharedConvOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 4, 3), randomized(nn.BatchNorm2d(4))

    def forward(self, x):
        y = self.conv(x)
        return self.norm(y), y.relu()


def test_conv_output_with_other_users_is_not_folded():
    model = SharedConvOutput().eval()
    _, after, record = run_pass(model, (torch.randn(1, 3, 6, 6),), "fold-conv-bn")
    assert BATCH_NORM in ops(after)
    assert record.notes == [record.notes[0]] and "conv output has other users" in record.notes[0]


def test_batch_norm_without_running_statistics_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    _, after, record = run_pass(model, (torch.randn(2, 3, 4, 4),), "fold-conv-bn")
    assert not record.changed and "batch statistics" in record.notes[0]


class ConstantAffine(nn.Module):
    """conv * per-channel scale / 2 - 0.5 + per-channel shift, then 3 * linear + 1."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 4, 3, bias=False), nn.Linear(4, 2)
        self.scale = nn.Parameter(torch.rand(4, 1, 1) + 0.5)
        self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

    def forward(self, x):
        y = self.conv(x) * self.scale / 2 - 0.5 + self.shift
        return 3 * self.fc(y.mean((2, 3))) + 1


def test_per_channel_constant_arithmetic_folds_into_the_neighbouring_layer():
    model = ConstantAffine().eval()
    inputs = (torch.randn(2, 3, 6, 6),)
    _, after, record = run_pass(model, inputs, "fold-conv-bn")
    assert ops(after) == [aten.convolution.default, aten.mean.dim, aten.linear.default]
    assert record.stats["mul-into-conv"] == 1 and record.stats["div-into-conv"] == 1
    assert record.stats["sub-into-conv"] == 1 and record.stats["add-into-conv"] == 1
    assert record.stats["mul-into-linear"] == 1 and record.stats["add-into-linear"] == 1
    assert_close(after, model, inputs)


def test_arithmetic_that_is_not_per_channel_stays():
    class NotPerChannel(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.spatial = nn.Parameter(torch.randn(4, 4))  # varies over H and W, not channels

        def forward(self, x):
            return self.conv(x) * self.spatial / 0.0

    _, after, _ = run_pass(NotPerChannel().eval(), (torch.randn(1, 3, 6, 6),), "fold-conv-bn")
    assert aten.mul.Tensor in ops(after) and aten.div.Tensor in ops(after)


def test_a_constant_that_promotes_the_dtype_is_not_folded():
    class Promotes(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3).half()
            self.register_buffer("scale", torch.rand(4, 1, 1))  # float32: half * float32 vector is float32

        def forward(self, x):
            return self.conv(x) * self.scale

    _, after, record = run_pass(Promotes().eval(), (torch.randn(1, 3, 6, 6, dtype=torch.half),), "fold-conv-bn")
    assert aten.mul.Tensor in ops(after) and "dtype mismatch" in record.notes[0]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_folds_in_float32(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), randomized(nn.BatchNorm2d(16))).eval()
    inputs = (torch.randn(2, 8, 10, 10),)
    reference = model(*inputs)
    low = model.to(dtype)
    _, after, record = run_pass(low, (inputs[0].to(dtype),), "fold-conv-bn")
    assert BATCH_NORM not in ops(after)
    folded = next(n for n in after.graph.nodes if n.op == "get_attr" and "fxopt_provenance" in n.meta)
    assert after.get_constant(folded.target).dtype == dtype
    with torch.no_grad():
        # The folded half model is as close to the float32 reference as the unfolded one, within half rounding.
        error_folded = (after(inputs[0].to(dtype)).float() - reference).abs().max()
        error_unfolded = (low(inputs[0].to(dtype)).float() - reference).abs().max()
    eps = torch.finfo(dtype).eps
    assert error_folded <= error_unfolded + 4 * eps * reference.abs().max()


def test_a_fold_that_overflows_half_precision_is_skipped():
    # Running variances of 1e-6 on both sides of a conv scale its weights by ~2e5: past float16's 65504.
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(2), nn.Conv1d(2, 4, 3, groups=2, bias=False), nn.BatchNorm1d(4))
    for norm in (model[0], model[2]):
        norm.running_var.fill_(1e-6)
        norm.weight.data.fill_(1.5)
    model = model.eval().half()
    inputs = (torch.tensor([[[0.66, 0.27, 0.06], [0.62, -0.45, -0.17]]], dtype=torch.half) * 1e-3,)
    _, after, record = run_pass(model, inputs, "fold-conv-bn")
    assert record.stats["batch-norm-into-following-conv"] == 1  # the first fold fits; the second would overflow
    assert "overflow torch.float16" in record.notes[0]
    with torch.no_grad():
        assert after(*inputs).isfinite().all()
        torch.testing.assert_close(after(*inputs), model(*inputs), rtol=1e-3, atol=0)


def test_the_model_is_not_modified():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), randomized(nn.BatchNorm2d(4))).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    run_pass(model, (torch.randn(1, 3, 5, 5),), "fold-conv-bn")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


class ConvBNBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm = randomized(nn.BatchNorm2d(6))
        self.fc = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc(self.norm(self.conv(x)).relu().mean((2, 3)))


def test_tune_mode_keeps_weights_trainable_and_gradients_equal():
    torch.manual_seed(0)
    model = ConvBNBlock().eval()  # frozen BatchNorm: eval-mode statistics while fine-tuning
    inputs = (torch.randn(4, 3, 8, 8),)
    program = capture(model, inputs)
    tuned, (record,) = PassManager("fold-conv-bn{mode=tune}").run(program)
    assert BATCH_NORM not in ops(tuned) and aten.rsqrt.default in ops(tuned)  # computed per call, not folded
    assert record.stats["batch-norm-into-conv"] == 1

    model(*inputs).square().sum().backward()
    tuned.graph_module(*inputs)[0].square().sum().backward()
    parameters = dict(tuned.graph_module.named_parameters())
    for name in ("conv.weight", "norm.weight", "norm.bias", "fc.weight"):
        original = model.get_parameter(name)
        torch.testing.assert_close(parameters[name].grad, original.grad, rtol=1e-4, atol=1e-5)

    fold_constants, _ = PassManager("fold-constants,dce").run(tuned)  # deploying a tuned graph folds it
    assert aten.rsqrt.default not in ops(fold_constants)
    assert_close(fold_constants, model, inputs)


def test_options_round_trip_and_reject_unknown_modes():
    assert str(PassManager("fold-conv-bn{mode=tune}").pipeline.passes[0]) == "fold-conv-bn{mode=tune}"
    with pytest.raises(PipelineError, match="mode"):
        PassManager("fold-conv-bn{mode=train}")
