"""fxopt's IR: capture, the Program graph, metadata, pattern matching, printing, verification, fxopt's own ops."""

from fxopt.ir import ops  # noqa: F401  (registers the fxopt:: ops graphs may call)
from fxopt.ir.analysis import count_flops, count_parameters, node_flops, to_networkx
from fxopt.ir.canonical import PRESERVED_OPS, is_canonical_target
from fxopt.ir.capture import capture
from fxopt.ir.edit import add_constant, erase_if_dead, producers, replace_node, replace_subgraph, users
from fxopt.ir.meta import Provenance, describe_node, propagate_meta, source_location, stamp_provenance
from fxopt.ir.pattern import Pat, RewriteContext, Rewritten, Rule, RuleSet, Skip, match, rewrite
from fxopt.ir.printer import format_program
from fxopt.ir.program import Program
from fxopt.ir.verify import verify

__all__ = [
    "PRESERVED_OPS",
    "Pat",
    "Program",
    "Provenance",
    "RewriteContext",
    "Rewritten",
    "Rule",
    "RuleSet",
    "Skip",
    "add_constant",
    "capture",
    "count_flops",
    "count_parameters",
    "describe_node",
    "erase_if_dead",
    "format_program",
    "is_canonical_target",
    "match",
    "node_flops",
    "producers",
    "propagate_meta",
    "replace_node",
    "replace_subgraph",
    "rewrite",
    "source_location",
    "stamp_provenance",
    "to_networkx",
    "users",
    "verify",
]
