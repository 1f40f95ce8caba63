"""Write a pass of your own with the pattern layer and run it beside the built-in ones.

``register_pass`` makes it usable by name like a built-in pass: in spec strings, TOML pipeline files, and
``fxopt optimize this_file.py:Model -p fold-double-negation,dce`` (the command imports the model's file first).

Run: python examples/custom_pass.py
"""

from dataclasses import dataclass

import torch
import torch.nn as nn

import fxopt
from fxopt.ir import Pat, Rule, rewrite
from fxopt.passes import Pass, PassContext

aten = torch.ops.aten


@fxopt.register_pass
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


if __name__ == "__main__":
    optimized = fxopt.optimize(Model(), (torch.randn(4),), target="torch", pipeline="fold-double-negation,dce")
    print(optimized.report())
    print(optimized.graph_module.code)
