import math

import pytest
import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.zoo import load_zoo_model
from tests.passes.helpers import ops, run_pass
from tests.passes.test_fold_conv_bn import assert_close

aten = torch.ops.aten
SDPA, SOFTMAX, BMM = aten.scaled_dot_product_attention.default, aten._softmax.default, aten.bmm.default


class Attention(nn.Module):
    """Multi-head attention spelled out, in the ways eager implementations spell it."""

    def __init__(self, heads=2, scaling="div", mask=True, key_transposed=True):
        super().__init__()
        self.heads, self.scaling, self.key_transposed = heads, scaling, key_transposed
        self.qkv = nn.Linear(16, 48)
        self.register_buffer("scale", torch.tensor(math.sqrt(16 / heads)))
        self.use_mask = mask

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        kt = k.transpose(-1, -2) if self.key_transposed else k.permute(0, 1, 3, 2).contiguous() * 1.5
        if self.scaling == "query":  # BART-style: Q is scaled before the product
            scores = (q / self.scale) @ kt
        else:
            scores = q @ kt
            scores = {
                "div": lambda s: s / math.sqrt(q.shape[-1]),
                "mul": lambda s: s * 0.25,
                "buffer": lambda s: s / self.scale,
                "none": lambda s: s,
            }[self.scaling](scores)
        if self.use_mask:
            scores = scores + mask
        return torch.softmax(scores, dim=-1) @ v


INPUTS = (torch.randn(2, 5, 16), torch.randn(2, 1, 1, 5))


@pytest.mark.parametrize("scaling", ["div", "mul", "buffer", "none", "query"])
@pytest.mark.parametrize("mask", [True, False])
def test_spelled_out_attention_becomes_one_sdpa(scaling, mask):
    torch.manual_seed(0)
    model = Attention(scaling=scaling, mask=mask).eval()
    _, after, record = run_pass(model, INPUTS, "fuse-attention,dce")
    assert ops(after).count(SDPA) == 1 and SOFTMAX not in ops(after) and BMM not in ops(after)
    sdpa = next(n for n in after.graph.nodes if n.target is SDPA)
    expected = {
        "div": 1 / math.sqrt(8),
        "mul": 0.25,
        "buffer": 1 / math.sqrt(8),
        "none": 1.0,
        "query": 1 / math.sqrt(8),
    }
    assert sdpa.kwargs["scale"] == pytest.approx(expected[scaling])
    assert (len(sdpa.args) == 4) == mask
    assert record.stats["attentions-fused"] == 1 and "softmax, matmul ->" in record.notes[0]
    assert_close(after, model, INPUTS)


def test_a_key_seen_only_transposed_is_transposed_back():
    torch.manual_seed(0)
    model = Attention(key_transposed=False).eval()
    _, after, _ = run_pass(model, INPUTS, "fuse-attention,dce")
    key = next(n for n in after.graph.nodes if n.target is SDPA).args[1]
    assert key.target is aten.permute.default and list(key.args[1]) == [0, 1, 3, 2]
    assert key.meta["fxopt_provenance"].pass_name == "fuse-attention"
    assert_close(after, model, INPUTS)


class Leaky(Attention):
    """The probabilities are returned too: fusing would compute the scores twice."""

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        probs = torch.softmax(q @ k.transpose(-1, -2), dim=-1)
        return probs @ v, probs


class MaskedFill(Attention):
    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-1, -2)).masked_fill(mask < 0, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v


class OtherDim(Attention):
    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-1, -2), dim=-2) @ v


# Pinned from hypothesis (tests/property/test_fuse_attention.py): SDPA rejects a 1-D mask, which
# an add broadcasts happily; the rewrite raised inside PyTorch.
VECTOR_MASK = (INPUTS[0], torch.randn(5))


@pytest.mark.parametrize(
    "model, inputs, reason",
    [
        (Leaky(), INPUTS, "used elsewhere"),
        (MaskedFill(), INPUTS, "not a batched matmul"),
        (OtherDim(), INPUTS, "another dimension"),
        (Attention(), VECTOR_MASK, "rank >= 2"),
    ],
)
def test_what_is_not_an_sdpa_is_left_alone_with_a_reason(model, inputs, reason):
    before, after, record = run_pass(model.eval(), inputs, "fuse-attention")
    assert not record.changed and ops(after) == ops(before)
    assert record.stats["skipped"] == 1 and reason in record.notes[0]


def test_half_precision_attention_fuses_within_half_rounding():
    torch.manual_seed(0)
    model = Attention().eval().half()
    inputs = tuple(t.half() for t in INPUTS)
    program = capture(model, inputs)
    after, _ = PassManager("fuse-attention,dce", verify="off").run(program)
    assert ops(after).count(SDPA) == 1
    with torch.no_grad():
        expected = model.float()(*INPUTS)
        # fp16 rounding of the eager spelling and of SDPA, measured against the float32 model.
        error = (after(*inputs).float() - expected).abs().max()
        assert error <= 1e-2 * expected.abs().max()


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny", "llama-tiny", "vit-tiny"])
def test_transformers_eager_attention_becomes_sdpa_in_every_layer(name):
    """BERT (padding mask), GPT-2 (causal mask), Llama (grouped-query: K/V repeated), ViT (no mask)."""
    model, inputs = load_zoo_model(name)
    model.set_attn_implementation("eager")
    layers = model.config.num_hidden_layers
    program = capture(model, inputs)
    assert ops(program).count(SOFTMAX) == layers
    after, (record,) = PassManager("fuse-attention", verify="each").run(program)
    assert ops(after).count(SDPA) == layers and SOFTMAX not in ops(after)
    assert record.stats["attentions-fused"] == layers
