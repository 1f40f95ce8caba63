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
    assert not mask or "fxopt_provenance" not in sdpa.args[3].meta  # the model's own mask, read as it is
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
    """A boolean mask applied by ``masked_fill`` (or ``where``, the masked value second: DeBERTa's spelling)."""

    def __init__(self, fill: float, spelling: str = "masked_fill"):
        super().__init__()
        self.fill, self.spelling = fill, spelling

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / 2.0
        if self.spelling == "masked_fill":
            scores = scores.masked_fill(mask < 0, self.fill)
        else:
            scores = torch.where(mask >= 0, scores, torch.tensor(self.fill))
        return torch.softmax(scores, dim=-1) @ v


class Flattened(Attention):
    """Falcon's and BLOOM's spelling: the scores of ``[batch * heads, L, S]`` from K already transposed,
    an ALiBi-like bias added there (``baddbmm``), scaled after the bias, reshaped, then a padding mask."""

    def __init__(self):
        super().__init__()
        self.register_buffer("slopes", torch.randn(2, 1, 5))  # heads x 1 x keys, broadcast over the batch

    def forward(self, x, mask):
        n, t, _ = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        flat_q, flat_kt = q.reshape(n * self.heads, t, -1), k.reshape(n * self.heads, t, -1).transpose(1, 2)
        bias = self.slopes.repeat(n, 1, 1)
        scores = torch.baddbmm(bias, flat_q, flat_kt, beta=1.0, alpha=1.0) * 0.5
        scores = scores.view(n, self.heads, t, t) + mask
        return torch.softmax(scores, dim=-1) @ v


@pytest.mark.parametrize(
    "model, mask_kinds",
    [
        (MaskedFill(float("-inf")), ["where-mask"]),
        (MaskedFill(torch.finfo(torch.float32).min), ["where-mask"]),
        (MaskedFill(torch.finfo(torch.float32).min, "where"), ["where-mask"]),
        (Flattened(), ["mask", "mask"]),
    ],
    ids=["masked-fill-inf", "masked-fill-min", "where-min", "flattened"],
)
def test_where_masks_and_flattened_scores_become_one_sdpa(model, mask_kinds):
    torch.manual_seed(0)
    mask = torch.where(torch.rand(2, 1, 5, 5) < 0.3, -1.0, 0.0)  # a few keys masked out per row
    mask[..., 0] = 0.0
    if getattr(model, "fill", 0.0) != float("-inf"):  # -inf: softmax gives NaN there, SDPA zeros (documented)
        mask[0, 0, 2] = -1.0  # a row with every key masked out: a uniform softmax, fused or not
    _, after, record = run_pass(model.eval(), (INPUTS[0], mask), "fuse-attention,dce")
    assert ops(after).count(SDPA) == 1 and SOFTMAX not in ops(after) and BMM not in ops(after)
    assert record.notes[0].count("mask") == len(mask_kinds) and all(kind in record.notes[0] for kind in mask_kinds)
    assert_close(after, model, (INPUTS[0], mask))


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
        (MaskedFill(-1e4), INPUTS, "fill is not -inf or at most -1e+30"),
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
    model.config._attn_implementation = "eager"
    model = type(model)(model.config).eval()  # built again: transformers 4.x picks BERT's attention class then
    layers = model.config.num_hidden_layers
    program = capture(model, inputs)
    assert ops(program).count(SOFTMAX) == layers
    after, (record,) = PassManager("fuse-attention", verify="each").run(program)
    assert ops(after).count(SDPA) == layers and SOFTMAX not in ops(after)
    assert record.stats["attentions-fused"] == layers


def _tiny_transformers():
    """Eager-attention spellings of ``transformers`` models, each tiny (2 layers, 4 heads of 8)."""
    import transformers as hf

    deberta = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
    return {
        "distilbert": (
            hf.DistilBertModel,
            hf.DistilBertConfig(vocab_size=99, dim=32, n_layers=2, n_heads=4, hidden_dim=64),
        ),
        # A padding mask applied with where (its -inf stand-in second), the scale on Kᵀ, flattened Q/K.
        "deberta-v2": (hf.DebertaV2Model, hf.DebertaV2Config(**deberta)),
        # As DeBERTa-v2/v3 checkpoints are: the relative-position terms (products of Q and of K with position
        # embeddings) add to the scores: a mask computed from Q, whose flattened form they read too.
        "deberta-v2-relative": (
            hf.DebertaV2Model,
            hf.DebertaV2Config(
                **deberta,
                relative_attention=True,
                pos_att_type=["p2c", "c2p"],
                max_relative_positions=16,
                position_buckets=8,
            ),
        ),
        # A causal mask applied with where, the fill a tensor made in forward, plus the padding mask.
        "gpt-neo": (
            hf.GPTNeoModel,
            hf.GPTNeoConfig(
                vocab_size=99,
                hidden_size=32,
                num_layers=2,
                num_heads=4,
                max_position_embeddings=64,
                attention_types=[[["global", "local"], 1]],
                window_size=8,
            ),
        ),
        # ALiBi added to the flattened scores by baddbmm (scaled there), Kᵀ a transpose of the flattened K.
        "bloom": (hf.BloomModel, hf.BloomConfig(vocab_size=99, hidden_size=32, n_layer=2, n_head=4)),
        # Reshapes around the scale; with ALiBi, a bias scaled after it is added and a where-mask of it.
        "falcon": (
            hf.FalconModel,
            hf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4),
        ),
        "falcon-alibi": (
            hf.FalconModel,
            hf.FalconConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, alibi=True),
        ),
        # A relative position bias and the padding mask: two additive terms, no scale.
        "t5": (hf.T5EncoderModel, hf.T5Config(vocab_size=99, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)),
    }


@pytest.mark.parametrize(
    "name", ["distilbert", "deberta-v2", "deberta-v2-relative", "gpt-neo", "bloom", "falcon", "falcon-alibi", "t5"]
)
def test_more_transformers_eager_attentions_become_sdpa_with_padding(name):
    model_class, config = _tiny_transformers()[name]
    config.use_cache = False
    config._attn_implementation = "eager"  # before building: Falcon picks its attention class then
    torch.manual_seed(0)
    model = model_class(config).eval()
    tokens = torch.randint(0, 99, (2, 12))
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, 9:] = 0
    program = capture(model, (tokens,), {"attention_mask": padding})
    assert ops(program).count(SOFTMAX) == 2
    after, (_, record) = PassManager("fold-constants,fuse-attention", verify="each").run(program)
    assert ops(after).count(SDPA) == 2 and SOFTMAX not in ops(after), record.notes
    with torch.no_grad():
        expected = model(tokens, attention_mask=padding).last_hidden_state
        got = after(tokens, attention_mask=padding)[0]
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
