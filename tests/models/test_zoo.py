"""Real model classes from transformers (random init) through capture and the default pipeline."""

import pathlib

import pytest
import torch
import torch.utils._pytree as pytree

from fxopt import PassManager, capture, optimize
from fxopt.loading import load_model
from fxopt.zoo import ZOO, load_zoo_model

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"

TINY = [name for name in ZOO if name.endswith("-tiny")]
FULL = [name for name in ZOO if not name.endswith("-tiny")]


def _check(name):
    model, inputs = load_zoo_model(name)
    result = optimize(model, inputs, verify="each")
    with torch.no_grad():
        want = pytree.tree_leaves(model(*inputs))
    got = pytree.tree_leaves(result(*inputs))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)
    report = result.report()
    # Nothing grows a graph but the conversions into and out of the blocked layout (convert-layout).
    layout = {torch.ops.fxopt.to_blocked.default, torch.ops.fxopt.from_blocked.default}
    conversions = sum(node.target in layout for node in result.graph_module.graph.nodes)
    assert report.passes[-1].nodes[1] - conversions <= report.passes[0].nodes[0]
    return report


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_optimize_exactly(name):
    _check(name)


def test_transformer_cleanup_really_removes_nodes():
    report = _check("gpt2-tiny")
    assert report.passes[-1].nodes[1] < report.passes[0].nodes[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL)
def test_full_size_models_optimize_exactly(name):
    _check(name)


def _batch_norms(program):
    return sum(n.target is torch.ops.aten._native_batch_norm_legit_no_training.default for n in program.graph.nodes)


@pytest.mark.parametrize("name, layer_scales", [("resnet-tiny", 0), ("mobilenet_v2-tiny", 0), ("convnext-tiny", 2)])
def test_default_pipeline_folds_every_batch_norm(name, layer_scales):
    model, inputs = load_zoo_model(name)
    program = capture(model, inputs)
    optimized, records = PassManager("default", verify="each").run(program)
    (fold,) = [r for r in records if r.name == "fold-conv-bn"]
    assert _batch_norms(optimized) == 0 and not fold.notes
    assert fold.stats.get("batch-norm-into-conv", 0) == _batch_norms(program)
    # ConvNeXt has no BatchNorm; its per-channel layer scales fold into the Linear before them.
    assert fold.stats.get("mul-into-linear", 0) == layer_scales
    with torch.no_grad():
        torch.testing.assert_close(optimized(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_repvgg_example_becomes_a_plain_conv_relu_stack():
    """examples/repvgg.py: every block (two or three branches with BatchNorms) is one 3x3 conv and a ReLU."""
    model, inputs = load_model(str(EXAMPLES / "repvgg.py") + ":repvgg_tiny")
    program = capture(model, inputs)
    optimized, records = PassManager("default", verify="each").run(program)
    ops = [n.target for n in optimized.graph.nodes if n.op == "call_function"]
    aten = torch.ops.aten
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert _batch_norms(program) == norms > 0 and _batch_norms(optimized) == 0
    assert ops.count(aten.convolution.default) == ops.count(aten.relu.default) == len(model.blocks)
    assert {r.name: r.stats.get("branches-merged") for r in records}["fuse-blocks"] == len(model.blocks)
    with torch.no_grad():
        torch.testing.assert_close(optimized(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


def test_resnext_example_runs_its_grouped_convolutions_blocked_in_tvm():
    """examples/resnext.py: groups of 4 channels, narrower than a block, stay in the blocked layout."""
    model, inputs = load_model(str(EXAMPLES / "resnext.py") + ":resnext_tiny")
    result = optimize(model, inputs, target="cpu", dispatch="tvm")
    (layout,) = [r for r in result.report().passes if r.name == "convert-layout"]
    assert layout.stats["grouped-convs"] == 2 and not layout.notes
    assert all(s.backend == "tvm" for s in result.report().segments)
    with torch.no_grad():
        torch.testing.assert_close(result(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_tiny_models_prune_to_a_third_fewer_flops(name):
    """Every family prunes (CNNs, depthwise, ViT, BERT, GPT-2's Conv1D, LLaMA's GQA and gated MLP) and still runs."""
    model, inputs = load_zoo_model(name)
    program = capture(model, inputs)
    pruned, (record, *_) = PassManager("prune-channels{ratio=0.3},default", verify="end").run(program)
    assert record.flops[1] <= 0.7 * record.flops[0] and record.params[1] < record.params[0]
    got, want = pytree.tree_leaves(pruned(*inputs)), pytree.tree_leaves(program(*inputs))
    assert [g.shape for g in got] == [w.shape for w in want] and all(torch.isfinite(g).all() for g in got)
