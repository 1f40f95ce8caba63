"""Golden IR: each exact pass on a small model, the program before and after as ``format_program`` prints it (the
way TVM tests a pass with ``Before``/``Expected`` modules). The numeric tests say a rewrite is right; these say
which rewrite it is, and a change in what a pass emits shows here as a readable diff."""

import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.ir import format_program


class Noops(nn.Module):
    def forward(self, x):
        return (x.clone() * 1 + 0).reshape(x.shape).relu()


class Constants(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return x * (self.w * 2 + 1)


class Common(nn.Module):
    def forward(self, x):
        return torch.sigmoid(x) + torch.sigmoid(x)


class Dead(nn.Module):
    def forward(self, x):
        unused = torch.exp(x)  # noqa: F841
        return x.relu()


class Norm(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(8))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


class Parallel(nn.Module):
    def __init__(self):
        super().__init__()
        self.q, self.k = nn.Linear(8, 4), nn.Linear(8, 4)

    def forward(self, x):
        return self.q(x) * self.k(x)


class Attention(nn.Module):
    def forward(self, q, k, v):
        return torch.softmax(q @ k.transpose(-2, -1) * 0.5, dim=-1) @ v


class PreLN(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.ln1, self.fc = nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 8)
        self.ln2, self.head = nn.LayerNorm(8), nn.Linear(8, 2)

    def forward(self, x):
        stream = self.embed(x)
        stream = stream + self.fc(self.ln1(stream))
        return self.head(self.ln2(stream))


GOLDEN = [
    pytest.param(
        "remove-noops",
        Noops(),
        (torch.randn(2, 4),),
        """
program Noops:
  %x : f32[2,4] = input
  %clone : f32[2,4] = aten.clone(%x)
  %mul : f32[2,4] = aten.mul.Tensor(%clone, 1)
  %add : f32[2,4] = aten.add.Tensor(%mul, 0)
  %view : f32[2,4] = aten.view(%add, [2, 4])
  %relu : f32[2,4] = aten.relu(%view)
  return (%relu)
""",
        """
program Noops:
  %x : f32[2,4] = input
  %relu : f32[2,4] = aten.relu(%x)
  return (%relu)
""",
        id="remove-noops",
    ),
    pytest.param(
        "fold-constants",
        Constants(),
        (torch.randn(2, 4),),
        """
program Constants:
  %w : f32[4] = constant w
  %x : f32[2,4] = input
  %mul : f32[4] = aten.mul.Tensor(%w, 2)
  %add : f32[4] = aten.add.Tensor(%mul, 1)
  %mul_1 : f32[2,4] = aten.mul.Tensor(%x, %add)
  return (%mul_1)
""",
        """
program Constants:
  %w : f32[4] = constant w
  %x : f32[2,4] = input
  %folded_add : f32[4] = constant folded_add [fold-constants]
  %mul_1 : f32[2,4] = aten.mul.Tensor(%x, %folded_add)
  return (%mul_1)
""",
        id="fold-constants",
    ),
    pytest.param(
        "cse",
        Common(),
        (torch.randn(2, 4),),
        """
program Common:
  %x : f32[2,4] = input
  %sigmoid : f32[2,4] = aten.sigmoid(%x)
  %sigmoid_1 : f32[2,4] = aten.sigmoid(%x)
  %add : f32[2,4] = aten.add.Tensor(%sigmoid, %sigmoid_1)
  return (%add)
""",
        """
program Common:
  %x : f32[2,4] = input
  %sigmoid : f32[2,4] = aten.sigmoid(%x)
  %add : f32[2,4] = aten.add.Tensor(%sigmoid, %sigmoid)
  return (%add)
""",
        id="cse",
    ),
    pytest.param(
        "fuse-norms",
        Norm(),
        (torch.randn(2, 8),),
        """
program Norm:
  %weight : f32[8] = constant weight
  %x : f32[2,8] = input
  %pow_1 : f32[2,8] = aten.pow.Tensor_Scalar(%x, 2)
  %mean : f32[2,1] = aten.mean.dim(%pow_1, [-1], True)
  %add : f32[2,1] = aten.add.Tensor(%mean, 1e-06)
  %rsqrt : f32[2,1] = aten.rsqrt(%add)
  %mul : f32[2,8] = aten.mul.Tensor(%x, %rsqrt)
  %mul_1 : f32[2,8] = aten.mul.Tensor(%mul, %weight)
  return (%mul_1)
""",
        """
program Norm:
  %weight : f32[8] = constant weight
  %x : f32[2,8] = input
  %rms_norm_default : f32[2,8] = aten.rms_norm(%x, [8], %weight, 1e-06) [fuse-norms]
  return (%rms_norm_default)
""",
        id="fuse-norms",
    ),
    pytest.param(
        "fold-conv-bn",
        ConvBN(),
        (torch.randn(1, 3, 6, 6),),
        """
program ConvBN:
  %conv_weight : f32[4,3,3,3] = constant conv.weight
  %conv_bias : f32[4] = constant conv.bias
  %bn_weight : f32[4] = constant bn.weight
  %bn_bias : f32[4] = constant bn.bias
  %bn_running_mean : f32[4] = constant bn.running_mean
  %bn_running_var : f32[4] = constant bn.running_var
  %x : f32[1,3,6,6] = input
  %convolution : f32[1,4,4,4] = aten.convolution(%x, %conv_weight, %conv_bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1)
  %_native_batch_norm_legit_no_training : (f32[1,4,4,4], f32[0], f32[0]) = aten._native_batch_norm_legit_no_training(%convolution, %bn_weight, %bn_bias, %bn_running_mean, %bn_running_var, 0.1, 1e-05)
  %getitem : f32[1,4,4,4] = getitem(%_native_batch_norm_legit_no_training, 0)
  %relu : f32[1,4,4,4] = aten.relu(%getitem)
  return (%relu)
""",
        """
program ConvBN:
  %x : f32[1,3,6,6] = input
  %folded_weight : f32[4,3,3,3] = constant folded_weight [fold-conv-bn]
  %folded_bias : f32[4] = constant folded_bias [fold-conv-bn]
  %convolution_default : f32[1,4,4,4] = aten.convolution(%x, %folded_weight, %folded_bias, [1, 1], [0, 0], [1, 1], False, [0, 0], 1) [fold-conv-bn]
  %relu : f32[1,4,4,4] = aten.relu(%convolution_default)
  return (%relu)
""",
        id="fold-conv-bn",
    ),
    pytest.param(
        "fuse-blocks",
        Parallel(),
        (torch.randn(2, 8),),
        """
program Parallel:
  %q_weight : f32[4,8] = constant q.weight
  %q_bias : f32[4] = constant q.bias
  %k_weight : f32[4,8] = constant k.weight
  %k_bias : f32[4] = constant k.bias
  %x : f32[2,8] = input
  %linear : f32[2,4] = aten.linear(%x, %q_weight, %q_bias)
  %linear_1 : f32[2,4] = aten.linear(%x, %k_weight, %k_bias)
  %mul : f32[2,4] = aten.mul.Tensor(%linear, %linear_1)
  return (%mul)
""",
        """
program Parallel:
  %x : f32[2,8] = input
  %fused_weight : f32[8,8] = constant fused_weight [fuse-blocks]
  %fused_bias : f32[8] = constant fused_bias [fuse-blocks]
  %linear_default : f32[2,8] = aten.linear(%x, %fused_weight, %fused_bias) [fuse-blocks]
  %slice_tensor : f32[2,4] = aten.slice.Tensor(%linear_default, 1, 0, 4) [fuse-blocks]
  %slice_tensor_1 : f32[2,4] = aten.slice.Tensor(%linear_default, 1, 4, 8) [fuse-blocks]
  %mul : f32[2,4] = aten.mul.Tensor(%slice_tensor, %slice_tensor_1)
  return (%mul)
""",
        id="fuse-blocks",
    ),
    pytest.param(
        "fuse-attention",
        Attention(),
        (*(torch.randn(1, 2, 4, 8) for _ in range(3)),),
        """
program Attention:
  %q : f32[1,2,4,8] = input
  %k : f32[1,2,4,8] = input
  %v : f32[1,2,4,8] = input
  %permute : f32[1,2,8,4] = aten.permute(%k, [0, 1, 3, 2])
  %expand : f32[1,2,4,8] = aten.expand(%q, [1, 2, 4, 8])
  %view : f32[2,4,8] = aten.view(%expand, [2, 4, 8])
  %expand_1 : f32[1,2,8,4] = aten.expand(%permute, [1, 2, 8, 4])
  %view_1 : f32[2,8,4] = aten.view(%expand_1, [2, 8, 4])
  %bmm : f32[2,4,4] = aten.bmm(%view, %view_1)
  %view_2 : f32[1,2,4,4] = aten.view(%bmm, [1, 2, 4, 4])
  %mul : f32[1,2,4,4] = aten.mul.Tensor(%view_2, 0.5)
  %_softmax : f32[1,2,4,4] = aten._softmax(%mul, -1, False)
  %expand_2 : f32[1,2,4,4] = aten.expand(%_softmax, [1, 2, 4, 4])
  %view_3 : f32[2,4,4] = aten.view(%expand_2, [2, 4, 4])
  %expand_3 : f32[1,2,4,8] = aten.expand(%v, [1, 2, 4, 8])
  %view_4 : f32[2,4,8] = aten.view(%expand_3, [2, 4, 8])
  %bmm_1 : f32[2,4,8] = aten.bmm(%view_3, %view_4)
  %view_5 : f32[1,2,4,8] = aten.view(%bmm_1, [1, 2, 4, 8])
  return (%view_5)
""",
        """
program Attention:
  %q : f32[1,2,4,8] = input
  %k : f32[1,2,4,8] = input
  %v : f32[1,2,4,8] = input
  %scaled_dot_product_attention_default : f32[1,2,4,8] = aten.scaled_dot_product_attention(%q, %k, %v, scale=0.5) [fuse-attention]
  return (%scaled_dot_product_attention_default)
""",
        id="fuse-attention",
    ),
    pytest.param(
        "layernorm-to-rmsnorm",
        PreLN(),
        (torch.randn(2, 4),),
        """
program PreLN:
  %embed_weight : f32[8,4] = constant embed.weight
  %embed_bias : f32[8] = constant embed.bias
  %ln1_weight : f32[8] = constant ln1.weight
  %ln1_bias : f32[8] = constant ln1.bias
  %fc_weight : f32[8,8] = constant fc.weight
  %fc_bias : f32[8] = constant fc.bias
  %ln2_weight : f32[8] = constant ln2.weight
  %ln2_bias : f32[8] = constant ln2.bias
  %head_weight : f32[2,8] = constant head.weight
  %head_bias : f32[2] = constant head.bias
  %x : f32[2,4] = input
  %linear : f32[2,8] = aten.linear(%x, %embed_weight, %embed_bias)
  %layer_norm : f32[2,8] = aten.layer_norm(%linear, [8], %ln1_weight, %ln1_bias, 1e-05, False)
  %linear_1 : f32[2,8] = aten.linear(%layer_norm, %fc_weight, %fc_bias)
  %add : f32[2,8] = aten.add.Tensor(%linear, %linear_1)
  %layer_norm_1 : f32[2,8] = aten.layer_norm(%add, [8], %ln2_weight, %ln2_bias, 1e-05, False)
  %linear_2 : f32[2,2] = aten.linear(%layer_norm_1, %head_weight, %head_bias)
  return (%linear_2)
""",
        """
program PreLN:
  %embed_weight_centred : f32[8,4] = constant embed_weight_centred [layernorm-to-rmsnorm]
  %embed_bias_centred : f32[8] = constant embed_bias_centred [layernorm-to-rmsnorm]
  %ln1_weight : f32[8] = constant ln1.weight
  %ln1_bias : f32[8] = constant ln1.bias
  %fc_weight_centred : f32[8,8] = constant fc_weight_centred [layernorm-to-rmsnorm]
  %fc_bias_centred : f32[8] = constant fc_bias_centred [layernorm-to-rmsnorm]
  %ln2_weight : f32[8] = constant ln2.weight
  %ln2_bias : f32[8] = constant ln2.bias
  %head_weight : f32[2,8] = constant head.weight
  %head_bias : f32[2] = constant head.bias
  %x : f32[2,4] = input
  %linear : f32[2,8] = aten.linear(%x, %embed_weight_centred, %embed_bias_centred)
  %rms_norm_default : f32[2,8] = aten.rms_norm(%linear, [8], %ln1_weight, 1e-05) [layernorm-to-rmsnorm]
  %add_tensor : f32[2,8] = aten.add.Tensor(%rms_norm_default, %ln1_bias) [layernorm-to-rmsnorm]
  %linear_1 : f32[2,8] = aten.linear(%add_tensor, %fc_weight_centred, %fc_bias_centred)
  %add : f32[2,8] = aten.add.Tensor(%linear, %linear_1)
  %rms_norm_default_1 : f32[2,8] = aten.rms_norm(%add, [8], %ln2_weight, 1e-05) [layernorm-to-rmsnorm]
  %add_tensor_1 : f32[2,8] = aten.add.Tensor(%rms_norm_default_1, %ln2_bias) [layernorm-to-rmsnorm]
  %linear_2 : f32[2,2] = aten.linear(%add_tensor_1, %head_weight, %head_bias)
  return (%linear_2)
""",
        id="layernorm-to-rmsnorm",
    ),
]


@pytest.mark.parametrize("spec, model, inputs, before, after", GOLDEN)
def test_pass_rewrites_the_program_as_written_here(spec, model, inputs, before, after):
    torch.manual_seed(0)
    program = capture(model.eval(), inputs)
    assert format_program(program, locations=False) == before.strip("\n")
    rewritten, _ = PassManager(spec, verify="each").run(program)
    assert format_program(rewritten, locations=False) == after.strip("\n")


def test_dce_removes_what_nothing_reads():
    program = capture(Dead(), (torch.randn(2, 4),))
    x = next(iter(program.graph.nodes))
    with program.graph.inserting_after(x):
        program.graph.call_function(torch.ops.aten.exp.default, (x,))
    program.graph_module.recompile()
    rewritten, _ = PassManager("dce", verify="each").run(program)
    assert (
        format_program(rewritten, locations=False)
        == """
program Dead:
  %x : f32[2,4] = input
  %relu : f32[2,4] = aten.relu(%x)
  return (%relu)""".strip("\n")
    )
