import pytest
import torch
import torch.nn as nn

from fxopt import PassError, capture
from fxopt.ir import Pat, Rule, RuleSet, match, rewrite, verify

aten = torch.ops.aten


class ReluRelu(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(x + x)) * 3


def _program():
    return capture(ReluRelu(), (torch.randn(4),))


def _node(program, target):
    return next(n for n in program.graph.nodes if n.op == "call_function" and n.target is target)


def test_match_captures_by_name_and_packets_match_any_overload():
    program = _program()
    outer = _node(program, aten.mul.Tensor).args[0]
    captures = match(Pat(aten.relu.default, Pat(aten.relu, Pat(aten.add, Pat.any("x"), Pat.any("x")), name="inner")), outer)
    assert captures is not None
    assert captures["inner"].target is aten.relu.default
    assert captures["x"].op == "placeholder"  # the same name bound twice: both operands are x


def test_match_fails_on_wrong_op_literal_or_binding():
    program = _program()
    mul = _node(program, aten.mul.Tensor)
    assert match(Pat(aten.add, Pat.any()), mul) is None
    assert match(Pat(aten.mul.Tensor, Pat.any(), 4), mul) is None
    assert match(Pat(aten.mul.Tensor, Pat.any(), 3), mul) == {}
    add = _node(program, aten.add.Tensor)
    relu = next(iter(add.users))
    assert match(Pat(aten.relu, Pat.any("x"), name="x"), relu) is None  # "x" cannot be two nodes


def test_rule_rewrites_stamp_provenance_and_keep_the_graph_valid():
    program = _program()
    rules = RuleSet([Rule("relu-relu", Pat(aten.relu.default, Pat(aten.relu.default, Pat.any("x"), single_user=True)),
                          lambda ctx, x: ctx.call(aten.relu.default, x))])
    before = program.run_flat()
    hits = rewrite(program, rules + RuleSet(), "test-pass")
    assert hits == {"relu-relu": 1}
    relus = [n for n in program.graph.nodes if n.target is aten.relu.default]
    assert len(relus) == 1
    prov = relus[0].meta["fxopt_provenance"]
    assert prov.pass_name == "test-pass" and len(prov.origins) == 2
    verify(program)
    torch.testing.assert_close(program.run_flat(), before)


def test_rule_returning_none_changes_nothing():
    program = _program()
    text = str(program.graph)
    rules = [Rule("never", Pat(aten.relu.default), lambda ctx: (ctx.call(aten.neg.default, ctx.root), None)[1])]
    assert not rewrite(program, rules, "test-pass")
    assert str(program.graph) == text


def test_rules_that_undo_each_other_are_reported():
    program = _program()
    flip = Rule("flip", Pat(aten.mul.Tensor, Pat.any("x"), 3), lambda ctx, x: ctx.call(aten.mul.Tensor, x, 3))
    with pytest.raises(PassError, match="flip"):
        rewrite(program, [flip], "test-pass", max_sweeps=3)
    assert flip.defined_at.startswith(__file__)
