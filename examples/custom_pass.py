"""Write a pass of your own with the pattern layer and run it beside the built-in ones.

Run: python examples/custom_pass.py
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

import fxopt
from fxopt.ir import Pat, Rule, rewrite
from fxopt.passes import Pass, PassContext

aten = torch.ops.aten


@dataclass(frozen=True)
class FoldDoubleNegation(Pass):
    """Rewrite neg(neg(x)) to x. Exact."""

    name = "fold-double-negation"

    def apply(self, program: fxopt.Program, ctx: PassContext) -> bool:
        rules = [Rule("neg-neg", Pat(aten.neg.default, Pat(aten.neg.default, Pat.any("x"))), lambda ctx, x: x)]
        hits = rewrite(program, rules, self.name)
        ctx.count("rewritten", hits["neg-neg"])
        return bool(hits)


class Model(nn.Module):
    def forward(self, x):
        return torch.relu(-(-x)) + 1


optimized = fxopt.optimize(Model(), (torch.randn(4),), target="torch", pipeline=[FoldDoubleNegation(), fxopt.PASSES["dce"]()])
print(optimized.report())
print(optimized.graph_module.code)
