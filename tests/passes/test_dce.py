import torch
import torch.nn as nn

from fxopt import PassManager, capture
from tests.passes.helpers import ops, run_pass

aten = torch.ops.aten


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x, ignored):
        return self.used(x), self.unused(x).relu()


def test_dead_nodes_and_their_constants_go_inputs_stay():
    inputs = (torch.randn(2, 4), torch.randn(3))
    model = TwoHeads()
    program = capture(model, inputs)
    # A rewrite that stops reading the second head (here: by hand) leaves it dead.
    output = program.graph.output_node()
    head = next(n for n in program.graph.nodes if n.target is aten.linear.default)
    output.args = ((head, head),)
    program.graph_module.recompile()
    after, (record,) = PassManager("dce").run(program, reference=program.run_flat())
    assert ops(after) == [aten.linear.default]
    names = {name for name, _ in after.graph_module.named_parameters()} | {
        n for n, _ in after.graph_module.named_buffers()
    }
    assert not any("unused" in n for n in names)
    assert len(after.placeholders()) == 2  # the calling convention is kept
    assert record.stats["constants-removed"] == 2
    torch.testing.assert_close(after.run_flat()[0], model(*inputs)[0])


def test_nothing_dead_means_no_change():
    inputs = (torch.randn(2, 4),)
    _, after, record = run_pass(nn.Linear(4, 4), inputs, "dce")
    assert not record.changed
