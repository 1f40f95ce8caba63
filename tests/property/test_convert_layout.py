"""``convert-layout`` and the convolution kernels over random CNNs (:mod:`tests.property.cnns`): channels that are
and are not multiples of a block, kernels 1/3/5/7, strides, padding (one-sided too), dilation, grouped and
depthwise convolutions, pools, squeeze-excitation, residual adds, concatenations and slices along the channels,
tiny images.

- The pass at 8 and 16 lanes keeps the outputs within fxopt's default tolerance in PyTorch, and leaves no
  convolution whose channels blocks fit in NCHW (those it leaves, it says why).
- So does it with random convolution times per block pair (``block-costs``), whatever blocks they make it choose.
- Built for the CPU with ``dispatch="tvm"``, the blocked network matches PyTorch, every segment in TVM; so does it
  quantized (w8a8), within a few quantization steps of the quantized reference.
"""

import tempfile
from pathlib import Path

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from fxopt import PassManager, capture, optimize
from fxopt.codegen.block_costs import geometry_key
from fxopt.codegen.lower_conv import conv_shape
from fxopt.ir.block_costs import write_block_costs
from fxopt.passes import parse_pipeline
from fxopt.passes.convert_layout import channel_block
from fxopt.passes.pipeline import with_pass
from tests.property.cnns import random_cnns
from tests.property.test_random_dags import _within_bound

aten = torch.ops.aten


@settings(max_examples=max(60, settings().max_examples // 2))
@given(random_cnns(), st.sampled_from([8, 16]))
def test_the_blocked_network_computes_what_the_model_does(case, lanes):
    model, inputs = case
    note(model.spec.describe())
    program = capture(model, inputs)
    converted, (record,) = PassManager(f"convert-layout{{lanes={lanes}}}", verify="off").run(program)
    _within_bound(converted.run_flat(), program.run_flat(), f"convert-layout{{lanes={lanes}}}")
    left = [n for n in converted.graph.nodes if n.target is aten.convolution.default]
    for conv in left:
        channels = (conv.args[0].meta["val"].shape[1], conv.meta["val"].shape[1])
        assert None in [channel_block(c, lanes) for c in channels], f"{conv} ({channels} channels) left NCHW"
    assert len(record.notes) >= len(left)
    event(f"converted back: {min(record.stats.get('converted-back', 0), 3)}+")


def _geometry_keys(program) -> list[tuple[str, int]]:
    """The blocked convolutions of ``program`` as block costs name them, and the blocks of their inputs."""
    shapes = [conv_shape(n) for n in program.graph.nodes if n.target is torch.ops.fxopt.conv2d_blocked.default]
    return [(geometry_key(shape), shape.in_block) for shape in shapes]


@settings(max_examples=max(30, settings().max_examples // 4))
@given(random_cnns(), st.sampled_from([8, 16]), st.data())
def test_blocks_searched_with_any_measured_costs_compute_what_the_model_does(case, lanes, data):
    model, inputs = case
    note(model.spec.describe())
    program = capture(model, inputs)
    plain, _ = PassManager(f"convert-layout{{lanes={lanes}}}", verify="off").run(program)
    blocks = [b for b in (4, 8, 16) if b <= lanes]

    def times(own: int):  # as tuning measures: the input's own block too (an RGB image's 1)
        pairs = [(x, y) for x in {own, *blocks} for y in blocks]
        return st.fixed_dictionaries({pair: st.floats(1, 100) for pair in pairs})

    costs = {key: data.draw(times(own), label=key) for key, own in _geometry_keys(plain)}
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "blocks.json"
        write_block_costs(path, costs)
        spec = f'convert-layout{{lanes={lanes} block-costs="{path}"}}'
        searched, (record,) = PassManager(spec, verify="off").run(program)
    _within_bound(searched.run_flat(), program.run_flat(), spec)
    event(f"blocks searched: {min(record.stats.get('searched-blocks', 0), 3)}+")


# Each example builds with TVM (seconds).
@settings(max_examples=max(15, settings().max_examples // 8))
@given(random_cnns(max_steps=6))
def test_blocked_networks_built_for_the_cpu_match_pytorch(case):
    model, inputs = case
    note(model.spec.describe())
    result = optimize(model, inputs, target="cpu", dispatch="tvm", verify="off")
    with torch.no_grad():
        _within_bound(result(*inputs), model(*inputs), "target cpu")
    assert all(s.backend == "tvm" for s in result.report().segments), result.report().segments


# Quantized: every int8 convolution blocked (plain, depthwise, an RGB image's, blocks of 8), zero pads before a
# quantization folded into the blocked convolution's padding, quantizations of blocked values: exact, the same
# integers and floats in another layout.
@settings(max_examples=max(30, settings().max_examples // 4), deadline=None)
@given(random_cnns(), st.sampled_from([8, 16]))
def test_the_blocked_quantized_network_computes_what_the_quantized_one_does(case, lanes):
    model, inputs = case
    note(model.spec.describe())
    quantized, _ = PassManager("quantize", verify="off", calibration=[inputs]).run(capture(model, inputs))
    converted, (record,) = PassManager(f"convert-layout{{lanes={lanes}}}", verify="off").run(quantized)
    for output, reference in zip(converted.run_flat(), quantized.run_flat()):
        assert torch.equal(output, reference), (output - reference).abs().max()
    blocked = [n for n in converted.graph.nodes if n.target is torch.ops.fxopt.conv_q_blocked.default]
    event(f"quantized convolutions blocked: {min(len(blocked), 3)}+, depthwise: {any(n.args[9] > 1 for n in blocked)}")


# Quantized and built for the CPU (every int8 convolution, plain, grouped or depthwise, on TVM's kernels or
# Relax's, with its tail and requantization on the tile): the reference's integers but where a float that
# differs in its last bit rounds to the neighbouring one, whose effect a few layers on is a few steps: a
# kernel that packed, padded or requantized wrongly would be off by far more. Each example builds (seconds).
@settings(max_examples=max(10, settings().max_examples // 10), deadline=None)
@given(random_cnns(max_steps=6))
def test_quantized_networks_built_for_the_cpu_match_the_quantized_reference(case):
    model, inputs = case
    note(model.spec.describe())
    pipeline = with_pass(parse_pipeline("cpu"), parse_pipeline("quantize")[0])
    result = optimize(model, inputs, target="cpu", pipeline=pipeline, calibration=[inputs], dispatch="tvm")
    with torch.no_grad():
        built, reference = result(*inputs), result.graph_module(*inputs)
    for output, expected in zip(pytree.tree_leaves(built), pytree.tree_leaves(reference)):
        scale = float(expected.abs().max()) or 1.0
        assert float((output - expected).abs().max()) <= 0.02 * scale
        event(f"exact: {torch.equal(output, expected)}")
    assert all(s.backend == "tvm" for s in result.report().segments), result.report().segments
