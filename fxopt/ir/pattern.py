"""A small pattern-matching and rewriting layer over fx graphs.

Rewrites are data: a :class:`Rule` pairs a :class:`Pat` with a function
that receives the named captures as keyword arguments and returns the
replacement value, :class:`Rewritten` when it edited the graph itself,
:class:`Skip` with the reason it does not apply, or ``None`` for "no match".
Rules combine into a :class:`RuleSet` with ``+``, and :func:`rewrite` applies
a rule set over an op-indexed worklist until nothing matches (the way MLIR's
greedy pattern driver does).

>>> x = Pat.any("x")
>>> relu_relu = Pat(aten.relu.default, Pat(aten.relu.default, x))
>>> drop_relu_relu = Rule("relu-relu", relu_relu, lambda ctx, x: ctx.call(aten.relu.default, x))
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

__all__ = ["Pat", "Rule", "RuleSet", "RewriteContext", "Rewritten", "Skip", "match", "rewrite"]

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


def match(
    pattern: Pat | object, value: object, captures: dict | None = None, matched: list | None = None
) -> dict | None:
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


@dataclass(frozen=True)
class Skip:
    """What a rule returns when its pattern matched but the rewrite does not apply here, and why (MLIR's
    ``notifyMatchFailure``): the driver records the reason against the root node and leaves the graph alone."""

    reason: str


@dataclass(frozen=True)
class Rewritten:
    """What a rule returns when it edited the graph itself (a rewrite whose root is not the matched node, or one
    that replaces several values): ``value`` is its result, whose producers and users the driver revisits."""

    value: fx.Node


RewriteFn = Callable[..., object]


@dataclass(frozen=True)
class Rule:
    """A named pattern and its rewrite. ``rewrite(ctx, **captures)`` returns the new value (the driver replaces the
    matched root and the matched nodes only it used), :class:`Rewritten` (the rule replaced nodes itself),
    :class:`Skip` (no rewrite here, and why) or ``None`` (no match)."""

    name: str
    pattern: Pat
    rewrite: RewriteFn
    # Where the rule was written, so a misbehaving rule can be found.
    defined_at: str = field(default="", compare=False)

    def __post_init__(self):
        if not self.defined_at:
            caller = sys._getframe(2)  # inspect.stack() would read every frame's source: seconds at import
            object.__setattr__(self, "defined_at", f"{caller.f_code.co_filename}:{caller.f_lineno}")

    @property
    def location(self) -> str:
        """``fold_conv_bn.py:120``: where the rule was written, short."""
        path, _, line = self.defined_at.rpartition(":")
        return f"{path.rsplit('/', 1)[-1]}:{line}"


class RuleSet(tuple):
    """An ordered collection of rules; ``a + b`` concatenates."""

    def __new__(cls, rules: Iterable[Rule] = ()):
        return super().__new__(cls, tuple(rules))

    def __add__(self, other: Iterable[Rule]) -> RuleSet:
        return RuleSet(tuple(self) + tuple(other))


class _OpIndex:
    """The rules whose root pattern can match a node, found by the node's op, in the rule set's order."""

    def __init__(self, rules: tuple[Rule, ...]):
        self.by_target: dict[object, list[int]] = {}
        self.anywhere: list[int] = []  # roots without an op: tried on every node
        for i, rule in enumerate(rules):
            root = rule.pattern.target
            targets = root if isinstance(root, tuple) else (root,)
            if any(t is None or isinstance(t, str) for t in targets):
                self.anywhere.append(i)
            else:
                for t in targets:
                    self.by_target.setdefault(t, []).append(i)
        self.rules = rules

    def candidates(self, node: fx.Node) -> list[Rule]:
        found = self.by_target.get(node.target, []) + self.anywhere
        packet = getattr(node.target, "overloadpacket", None)
        if packet is not None:
            found += self.by_target.get(packet, [])
        return [self.rules[i] for i in sorted(set(found))]


def _erased(node: fx.Node) -> bool:
    # fx keeps an erased node's graph and marks it (for iterators holding it); there is no public test
    return getattr(node, "_erased", False)


def rewrite(
    program: Program,
    rules: Iterable[Rule],
    pass_name: str,
    *,
    skipped: Callable[[fx.Node, str], None] | None = None,
    max_rewrites: int | None = None,
    propagate: bool = True,
) -> Counter:
    """Apply ``rules`` until none matches: a worklist of nodes, indexed by op, in graph order.

    Every ``call_function`` node is visited once; after a rewrite the nodes it
    created, their users and their inputs are visited again (a rewrite can
    expose the next one, conv → BN → scale), never the whole graph. The first
    rule (in order) that rewrites a node wins. ``skipped(node, reason)`` hears
    each :class:`Skip`. Returns how often each rule fired, by name. After a
    change the code is regenerated and metadata re-propagated, unless
    ``propagate=False`` (a pass under the manager: it does that once per pass).

    More than ``max_rewrites`` rewrites (default: four per node, plus 64) is a
    bug, two rules undoing each other, and raises :class:`PassError` naming the
    rules, where they are written and how often each fired.
    """
    index = _OpIndex(tuple(rules))
    graph = program.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    worklist = [n for n in graph.nodes if n.op == "call_function"]
    queued = set(worklist)
    limit = max_rewrites if max_rewrites is not None else 4 * len(order) + 64
    hits: Counter = Counter()
    fired: dict[str, Rule] = {}
    position = 0
    while position < len(worklist):
        node = worklist[position]
        position += 1
        queued.discard(node)
        if _erased(node):
            continue
        for rule in index.candidates(node):
            matched: list[fx.Node] = []
            captures = match(rule.pattern, node, matched=matched)
            if captures is None:
                continue
            ctx = RewriteContext(program, node)
            outcome = rule.rewrite(ctx, **captures)
            if outcome is None or isinstance(outcome, Skip):
                for created in reversed(ctx.created):
                    graph.erase_node(created)
                if isinstance(outcome, Skip) and skipped is not None:
                    skipped(node, outcome.reason)
                continue
            if isinstance(outcome, Rewritten):
                result = outcome.value
            else:
                replaced = [n for n in matched if n.op == "call_function"]
                stamp_provenance(ctx.created, pass_name, replaced)
                replace_subgraph(node, outcome, replaced)
                result = outcome
            hits[rule.name] += 1
            fired[rule.name] = rule
            if sum(hits.values()) > limit:
                counts = ", ".join(f"{name} x{n} ({fired[name].location})" for name, n in hits.most_common())
                raise PassError(
                    f"pass '{pass_name}': rules still matching after {limit} rewrites: {counts}; "
                    f"two rules probably undo each other"
                )
            revisit = [*ctx.created, result] if isinstance(result, fx.Node) else list(ctx.created)
            for changed in list(revisit):
                if not _erased(changed):
                    revisit += [*changed.users, *changed.all_input_nodes]
            for again in revisit:
                if not _erased(again) and again.op == "call_function" and again not in queued:
                    worklist.append(again)
                    queued.add(again)
            break
    if hits and propagate:
        program.graph_module.recompile()
        propagate_meta(program.graph_module)
    return hits
