import pytest
import torch
import torch.nn as nn

from fxopt import PassError, capture
from fxopt.ir import Pat, Rewritten, Rule, RuleSet, Skip, match, rewrite, verify

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
    captures = match(
        Pat(aten.relu.default, Pat(aten.relu, Pat(aten.add, Pat.any("x"), Pat.any("x")), name="inner")), outer
    )
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
    rules = RuleSet(
        [
            Rule(
                "relu-relu",
                Pat(aten.relu.default, Pat(aten.relu.default, Pat.any("x"), single_user=True)),
                lambda ctx, x: ctx.call(aten.relu.default, x),
            )
        ]
    )
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
        rewrite(program, [flip], "test-pass", max_rewrites=3)
    assert flip.defined_at.startswith(__file__)


def test_skip_reports_why_and_leaves_the_graph_alone():
    program = _program()
    text = str(program.graph)
    heard = []
    rules = [
        Rule("refuse", Pat(aten.relu.default), lambda ctx: (ctx.call(aten.neg.default, ctx.root), Skip("not today"))[1])
    ]
    assert not rewrite(program, rules, "test-pass", skipped=lambda node, why: heard.append((node.name, why)))
    assert heard == [("relu", "not today"), ("relu_1", "not today")]
    assert str(program.graph) == text


def test_rules_are_tried_only_on_nodes_of_their_root_op():
    program = _program()
    seen = []
    rules = [Rule("watch", Pat(aten.relu.default, where=lambda n: seen.append(n.target) or False), lambda ctx: None)]
    rewrite(program, rules, "test-pass")
    assert seen == [aten.relu.default, aten.relu.default]


class Relu4(nn.Module):
    def forward(self, x):
        return torch.relu(torch.relu(torch.relu(torch.relu(x))))


def test_a_rewrite_revisits_what_it_touched_until_nothing_matches():
    # relu(relu(a)) -> relu(a), rooted at the outer relu: each rewrite exposes the next pair below the new node.
    program = capture(Relu4(), (torch.randn(4),))
    before = program.run_flat()
    rules = [
        Rule(
            "relu-relu",
            Pat(aten.relu.default, Pat(aten.relu.default, Pat.any("x"), single_user=True)),
            lambda ctx, x: ctx.call(aten.relu.default, x),
        )
    ]
    assert rewrite(program, rules, "test-pass") == {"relu-relu": 3}
    assert [n.target for n in program.graph.nodes if n.op == "call_function"] == [aten.relu.default]
    torch.testing.assert_close(program.run_flat(), before)


def test_a_rule_may_edit_the_graph_itself_and_say_so():
    program = _program()
    before = program.run_flat()

    def double_to_scale(ctx, x):  # x + x -> x * 2, replaced by hand
        with ctx.graph.inserting_before(ctx.root):
            scaled = ctx.graph.call_function(aten.mul.Tensor, (x, 2))
        ctx.root.replace_all_uses_with(scaled)
        ctx.graph.erase_node(ctx.root)
        return Rewritten(scaled)

    rules = [Rule("add-self", Pat(aten.add.Tensor, Pat.any("x"), Pat.any("x")), double_to_scale)]
    assert rewrite(program, rules, "test-pass") == {"add-self": 1}
    verify(program)
    torch.testing.assert_close(program.run_flat(), before)


def test_the_fixpoint_error_names_each_rule_its_place_and_hits():
    program = _program()
    flip = Rule("flip", Pat(aten.mul.Tensor, Pat.any("x"), 3), lambda ctx, x: ctx.call(aten.mul.Tensor, x, 3))
    with pytest.raises(PassError, match=r"flip x4 \(test_pattern\.py:\d+\)"):
        rewrite(program, [flip], "test-pass", max_rewrites=3)
