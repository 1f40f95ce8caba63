"""A small pattern-matching and rewriting layer over fx graphs.

Simple rewrites are data: a :class:`Rule` pairs a :class:`Pat` with a
function that receives the named captures as keyword arguments and returns
the replacement value, or ``None`` for "no rewrite". Rules combine into a
:class:`RuleSet` with ``+``, and :func:`rewrite` applies a rule set greedily
until nothing matches.

>>> x = Pat.any("x")
>>> drop_relu_relu = Rule("relu-relu", Pat(aten.relu.default, Pat(aten.relu.default, x)), lambda ctx, x: ctx.call(aten.relu.default, x))
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxopt.errors import PassError
from fxopt.ir.edit import replace_subgraph
from fxopt.ir.meta import propagate_meta, stamp_provenance
from fxopt.ir.program import Program

__all__ = ["Pat", "Rule", "RuleSet", "RewriteContext", "match", "rewrite"]

aten = torch.ops.aten

_ANY = object()


@dataclass(frozen=True)
class Pat:
    """A pattern over fx nodes.

    ``target``: an ``OpOverload`` (matches exactly), an ``OpOverloadPacket``
    (matches any overload, e.g. ``aten.add``), a tuple of those, ``"get_attr"``
    or ``"placeholder"`` (match that node kind), or ``None`` (anything: a node or
    a literal). ``args`` are patterns or literals for the leading positional
    arguments; arguments beyond them are not checked. ``name`` captures the
    matched value; ``where`` is an extra predicate on it; ``single_user``
    requires the matched node to have exactly one user (so a rewrite may
    consume it).
    """

    target: object = None
    args: tuple = ()
    name: str | None = None
    where: Callable[[object], bool] | None = None
    single_user: bool = False

    def __init__(self, target=None, *args, name=None, where=None, single_user=False):
        object.__setattr__(self, "target", target)
        object.__setattr__(self, "args", args)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "where", where)
        object.__setattr__(self, "single_user", single_user)

    @staticmethod
    def any(name: str | None = None, where: Callable[[object], bool] | None = None) -> Pat:
        """Match any argument (node or literal)."""
        return Pat(None, name=name, where=where)

    @staticmethod
    def constant(name: str | None = None) -> Pat:
        """Match a ``get_attr`` node (a parameter or buffer)."""
        return Pat("get_attr", name=name)


def match(pattern: Pat | object, value: object, captures: dict | None = None,
          matched: list | None = None) -> dict | None:
    """Match ``value`` (an fx node or literal) against ``pattern``; the captures, or ``None``.

    ``matched``, if given, collects every node a ``Pat`` with a target matched:
    the subgraph a rewrite replaces.
    """
    captures = {} if captures is None else captures
    if not isinstance(pattern, Pat):
        return captures if _literal_equal(pattern, value) else None
    if pattern.target is not None and not _target_matches(pattern.target, value):
        return None
    if pattern.single_user and (not isinstance(value, fx.Node) or len(value.users) != 1):
        return None
    if pattern.args:
        if not isinstance(value, fx.Node) or len(value.args) < len(pattern.args):
            return None
        for sub, arg in zip(pattern.args, value.args):
            if match(sub, arg, captures, matched) is None:
                return None
    if pattern.where is not None and not pattern.where(value):
        return None
    if pattern.name is not None:
        if pattern.name in captures and captures[pattern.name] is not value:
            return None
        captures[pattern.name] = value
    if matched is not None and pattern.target is not None:
        matched.append(value)
    return captures


def _target_matches(target: object, value: object) -> bool:
    if not isinstance(value, fx.Node):
        return False
    if isinstance(target, tuple):
        return any(_target_matches(t, value) for t in target)
    if target in ("get_attr", "placeholder"):
        return value.op == target
    if value.op != "call_function":
        return False
    if isinstance(target, torch._ops.OpOverloadPacket):
        return getattr(value.target, "overloadpacket", None) is target
    return value.target is target


def _literal_equal(expected: object, value: object) -> bool:
    if isinstance(value, fx.Node):
        return False
    try:
        return bool(expected == value)
    except Exception:
        return False


class RewriteContext:
    """What a rule's rewrite function gets: the program and a way to build nodes.

    Nodes made with :meth:`call` are inserted before the matched root, so they
    may read anything the root could read.
    """

    def __init__(self, program: Program, root: fx.Node):
        self.program = program
        self.graph = program.graph
        self.root = root
        self.created: list[fx.Node] = []

    def call(self, target: object, *args, **kwargs) -> fx.Node:
        with self.graph.inserting_before(self.root):
            node = self.graph.call_function(target, args, kwargs)
        self.created.append(node)
        return node

    def constant(self, target: str) -> fx.Node:
        """A ``get_attr`` node reading a constant registered with :func:`fxopt.ir.add_constant`."""
        with self.graph.inserting_before(self.root):
            node = self.graph.get_attr(target)
        self.created.append(node)
        return node


RewriteFn = Callable[..., object]


@dataclass(frozen=True)
class Rule:
    """A named pattern and its rewrite. ``rewrite(ctx, **captures)`` returns the new value or ``None``."""

    name: str
    pattern: Pat
    rewrite: RewriteFn
    # Where the rule was written, so a misbehaving rule can be found.
    defined_at: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.defined_at:
            caller = sys._getframe(2)  # inspect.stack() would read every frame's source: seconds at import
            object.__setattr__(self, "defined_at", f"{caller.f_code.co_filename}:{caller.f_lineno}")


class RuleSet(tuple):
    """An ordered collection of rules; ``a + b`` concatenates."""

    def __new__(cls, rules: Iterable[Rule] = ()):
        return super().__new__(cls, tuple(rules))

    def __add__(self, other: Iterable[Rule]) -> RuleSet:
        return RuleSet(tuple(self) + tuple(other))


def rewrite(program: Program, rules: Iterable[Rule], pass_name: str, *, max_sweeps: int = 32) -> Counter:
    """Apply ``rules`` greedily until a sweep over the graph changes nothing.

    Returns how often each rule fired. Metadata is re-propagated when anything
    changed. A rule set that keeps firing for ``max_sweeps`` sweeps is a bug
    (two rules undoing each other) and raises :class:`PassError`.
    """
    rules = tuple(rules)
    hits: Counter = Counter()
    for _ in range(max_sweeps):
        changed = False
        for node in list(program.graph.nodes):
            if node.graph is not program.graph or node.op != "call_function":
                continue  # erased earlier in this sweep
            for rule in rules:
                matched: list[fx.Node] = []
                captures = match(rule.pattern, node, matched=matched)
                if captures is None:
                    continue
                ctx = RewriteContext(program, node)
                replacement = rule.rewrite(ctx, **captures)
                if replacement is None:
                    for created in reversed(ctx.created):
                        program.graph.erase_node(created)
                    continue
                matched = [n for n in matched if n.op == "call_function"]
                stamp_provenance(ctx.created, pass_name, matched)
                replace_subgraph(node, replacement, matched)
                hits[rule.name] += 1
                changed = True
                break
        if not changed:
            break
    else:
        raise PassError(
            f"pass '{pass_name}': rules {sorted(hits)} still matched after {max_sweeps} sweeps; "
            f"two rules probably undo each other"
        )
    if hits:
        program.graph_module.recompile()
        propagate_meta(program.graph_module)
    return hits
