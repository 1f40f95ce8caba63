import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.zoo import load_zoo_model
from tests.passes.helpers import ops, run_pass
from tests.passes.test_fold_conv_bn import assert_close

aten = torch.ops.aten
RMS, LN = aten.rms_norm.default, aten.layer_norm.default


class RMSNorm(nn.Module):
    """LLaMA's spelling (upcast, mean of squares, rsqrt, cast back, weight) and variants of it."""

    def __init__(self, width=8, upcast=True, weight=True, spelling="rsqrt"):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5) if weight else None
        self.upcast, self.spelling = upcast, spelling

    def forward(self, x):
        h = x.to(torch.float32) if self.upcast else x
        variance = (h * h if self.spelling == "square" else h.pow(2)).mean(-1, keepdim=True)
        h = h / torch.sqrt(variance + 1e-6) if self.spelling == "sqrt" else h * torch.rsqrt(variance + 1e-6)
        h = h.to(x.dtype) if self.upcast else h
        return self.weight * h if self.weight is not None else h


class LayerNorm(nn.Module):
    """LayerNorm spelled out: mean, centred square mean (or a biased var), rsqrt, weight and bias."""

    def __init__(self, width=8, affine=True, use_var=False):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(width) + 0.5) if affine else None
        self.bias = nn.Parameter(torch.randn(width)) if affine else None
        self.use_var = use_var

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        centred = x - mean
        var = x.var(-1, keepdim=True, unbiased=False) if self.use_var else centred.pow(2).mean(-1, keepdim=True)
        y = centred * torch.rsqrt(var + 1e-5)
        return y * self.weight + self.bias if self.weight is not None else y


X = (torch.randn(2, 5, 8),)


@pytest.mark.parametrize("upcast", [True, False])
@pytest.mark.parametrize("weight", [True, False])
@pytest.mark.parametrize("spelling", ["rsqrt", "sqrt", "square"])
def test_spelled_out_rms_norm_becomes_one_op(upcast, weight, spelling):
    torch.manual_seed(0)
    model = RMSNorm(upcast=upcast, weight=weight, spelling=spelling).eval()
    _, after, record = run_pass(model, X, "fuse-norms,dce")
    assert ops(after) == [RMS] and record.stats["rms-norms-fused"] == 1
    node = next(n for n in after.graph.nodes if n.target is RMS)
    assert node.args[1] == [8] and node.args[3] == pytest.approx(1e-6) and (node.args[2] is not None) == weight
    assert_close(after, model, X)


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("use_var", [True, False])
def test_spelled_out_layer_norm_becomes_one_op(affine, use_var):
    torch.manual_seed(0)
    model = LayerNorm(affine=affine, use_var=use_var).eval()
    _, after, record = run_pass(model, X, "fuse-norms,dce")
    assert ops(after) == [LN] and record.stats["layer-norms-fused"] == 1
    assert_close(after, model, X)


def test_half_rms_norm_with_float32_statistics_fuses():
    torch.manual_seed(0)
    model = RMSNorm().eval().half()
    x = X[0].half()
    after, _ = PassManager("fuse-norms,dce", verify="off").run(capture(model, (x,)))
    assert ops(after) == [RMS]
    with torch.no_grad():
        torch.testing.assert_close(after(x), model(x), rtol=1e-3, atol=1e-3)  # fp16 rounding of the output


class Leaky(RMSNorm):
    def forward(self, x):
        variance = x.pow(2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + 1e-6), variance


class OtherDim(RMSNorm):
    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + 1e-6)


@pytest.mark.parametrize("model, reason", [(Leaky(upcast=False), "used elsewhere"), (OtherDim(), None)])
def test_what_is_not_a_whole_norm_is_left_alone(model, reason):
    before, after, record = run_pass(model.eval(), X, "fuse-norms")
    assert not record.changed and ops(after) == ops(before)
    assert (reason in record.notes[0]) if reason else not record.notes


def test_llama_rms_norms_all_fuse():
    """transformers' LlamaRMSNorm: two per layer and the final one."""
    model, inputs = load_zoo_model("llama-tiny")
    program = capture(model, inputs)
    after, (record,) = PassManager("fuse-norms", verify="each").run(program)
    norms = 2 * model.config.num_hidden_layers + 1
    assert ops(after).count(RMS) == norms == record.stats["rms-norms-fused"]
    assert aten.rsqrt.default not in ops(after)


def test_absorb_folds_every_llama_norm_weight_into_the_linears_reading_it():
    model, inputs = load_zoo_model("llama-tiny")
    # remove-noops drops the alias between the final norm and lm_head
    after, (_, record) = PassManager("remove-noops,fuse-norms{absorb=true}", verify="each").run(capture(model, inputs))
    norms = [n for n in after.graph.nodes if n.target is RMS]
    assert len(norms) == record.stats["norm-affines-absorbed"] == 2 * model.config.num_hidden_layers + 1
    assert all(n.args[2] is None for n in norms)  # weightless: the q/k/v, gate/up and lm_head weights carry it
    assert_close(after, model, inputs)


def test_absorb_moves_a_layer_norm_bias_into_the_linear_bias_and_keeps_norms_read_otherwise():
    torch.manual_seed(0)
    model = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 4, bias=False), nn.LayerNorm(4), nn.GELU()).eval()
    for norm in (model[0], model[2]):
        nn.init.normal_(norm.weight)
        nn.init.normal_(norm.bias)
    _, after, record = run_pass(model, X, "fuse-norms{absorb=true},dce")
    first, second = [n for n in after.graph.nodes if n.target is LN]
    assert first.args[2:4] == (None, None) and second.args[2] is not None  # the second is read by a GELU
    assert record.stats["norm-affines-absorbed"] == 1 and "not every reader is a linear" in record.notes[0]
    assert_close(after, model, X)
