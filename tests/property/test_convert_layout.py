"""``convert-layout`` and the convolution kernels over random CNNs (:mod:`tests.property.cnns`): channels that are
and are not multiples of a block, kernels 1/3/5/7, strides, padding (one-sided too), dilation, grouped and
depthwise convolutions, pools, squeeze-excitation, residual adds, concatenations and slices along the channels,
tiny images.

- The pass at 8 and 16 lanes keeps the outputs within fxopt's default tolerance in PyTorch, and leaves no
  convolution whose channels blocks fit in NCHW (those it leaves, it says why).
- Built for the CPU with ``dispatch="tvm"``, the blocked network matches PyTorch, every segment in TVM.
"""

import torch
from hypothesis import event, given, note, settings
from hypothesis import strategies as st

from fxopt import PassManager, capture, optimize
from fxopt.passes.convert_layout import channel_block
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
