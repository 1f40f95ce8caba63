"""Partitioning keeps each epilogue group in one segment, and TVM emits each such segment as one kernel."""

import torch
import torch.nn as nn

from fxopt import PassManager, capture
from fxopt.codegen.compile import fusion_passes
from fxopt.codegen.lower import lower_graph
from fxopt.codegen.partition import partition


class Interleaved(nn.Module):
    """Export orders conv ``a``, conv ``b``, then ``a``'s ReLU: a cut at ``b`` would split ``a`` from its ReLU."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        return a.relu() + b.sigmoid()


def segments(spec):
    torch.manual_seed(0)
    model, inputs = Interleaved().eval(), (torch.randn(1, 3, 8, 8),)
    program, _ = PassManager(spec, verify="off").run(capture(model, inputs))
    part = partition(program)
    with torch.no_grad():
        torch.testing.assert_close(part.graph_module(*inputs)[0], model(*inputs), rtol=0, atol=0)
    return part.segments


def kernels(segment):
    import tvm
    from tvm import relax

    mod = lower_graph(segment.graph_module, segment.name)
    with tvm.target.Target({"kind": "llvm"}):
        mod = tvm.transform.Sequential(fusion_passes())(mod)
    return [gv.name_hint for gv, func in mod.functions.items() if not isinstance(func, relax.Function)]


def test_unmarked_graphs_are_cut_at_every_heavy_op():
    assert [s.summary for s in segments("dce")] == ["convolution", "convolution, relu, sigmoid, add"]


def test_each_epilogue_group_stays_in_one_segment_and_one_kernel():
    marked = segments("mark-epilogues")
    assert [s.summary for s in marked] == ["convolution, relu", "convolution, sigmoid, add"]
    assert [len(kernels(s)) for s in marked] == [1, 1]
    assert kernels(marked[0])[0].startswith("fused_conv2d")
