"""Split an optimized program into segments the TVM backend may run, leaving the rest to PyTorch.

A *segment* is a run of consecutive lowerable nodes (in topological order,
so every run is convex and can be cut out without creating a cycle) holding
at most one heavy op (convolution, matmul, attention) with the cheap ops
around it (layout ops between two heavy ops go with an attention whose kernel reads through them), and never
splits an epilogue group (``mark-epilogues``): a group whose nodes the graph interleaves with other ops is first
moved together, so TVM's fusion emits it as one kernel. Keeping heavy ops apart lets the
dispatcher decide per kernel: an untuned convolution stays in PyTorch while the fused elementwise chain
after it, or a tuned matmul, runs in TVM. Ops without a lowering stay in the
parent graph and run in PyTorch; :attr:`Partition.fallbacks` names each one.

The program itself is not modified: the partition works on a copy.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from fxopt.codegen.layout import read_through
from fxopt.codegen.lower import is_lowerable
from fxopt.ir.meta import describe_node, epilogue_group
from fxopt.ir.program import Program, attribute_owner
from fxopt.ir.traits import CONTRACTIONS, DATA_MOVEMENT, SDPA
from fxopt.quant import ops as _quant_ops  # noqa: F401  (registers torch.ops.fxopt's quantized ops)

__all__ = ["Segment", "Partition", "partition", "unlowerable", "summarize_fallbacks", "HEAVY_OPS"]

quant_ops = torch.ops.fxopt

HEAVY_OPS = {
    *CONTRACTIONS,
    SDPA,
    quant_ops.linear_q.default,
    quant_ops.conv_q.default,
    quant_ops.linear_wq.default,
}


@dataclass
class Segment:
    """A subgraph cut out of the program: a standalone graph over its inputs, and what it computes."""

    name: str
    graph_module: fx.GraphModule
    ops: Counter = field(default_factory=Counter)
    example_inputs: tuple = ()

    @property
    def summary(self) -> str:
        return ", ".join(f"{op}" + (f"x{n}" if n > 1 else "") for op, n in self.ops.most_common())


@dataclass
class Partition:
    """The parent graph (segments as ``call_module`` nodes, unlowerable ops inline) and its segments."""

    graph_module: fx.GraphModule
    segments: list[Segment]
    fallbacks: list[tuple[str, str]]  # (node description, reason) for every op left to PyTorch

    def fallback_summary(self) -> list[str]:
        return summarize_fallbacks(self.fallbacks)


def unlowerable(graph: fx.Graph) -> list[tuple[str, str]]:
    """(node description, reason) for every op in ``graph`` TVM cannot take."""
    return [(describe_node(n), reason) for n in graph.nodes if (reason := is_lowerable(n)) is not None]


def summarize_fallbacks(fallbacks: list[tuple[str, str]]) -> list[str]:
    """One line per distinct reason, e.g. "no lowering for 'foo.default' (2 nodes, first: ...)"."""
    by_reason: dict[str, list[str]] = {}
    for where, reason in fallbacks:
        by_reason.setdefault(reason, []).append(where)
    return [
        f"{reason} ({len(nodes)} node{'s' if len(nodes) > 1 else ''}, first: {nodes[0]})"
        for reason, nodes in by_reason.items()
    ]


def partition(program: Program) -> Partition:
    """Cut ``program`` into TVM candidate segments; see the module docstring."""
    parent = program.clone().graph_module
    _gather_epilogue_groups(parent.graph)
    fallbacks: list[tuple[str, str]] = []
    runs: list[list[fx.Node]] = []
    current: list[fx.Node] = []
    for node in list(parent.graph.nodes):
        if node.op != "call_function":
            continue
        reason = is_lowerable(node)
        if reason is not None:
            fallbacks.append((describe_node(node), reason))
            current = _close(current, runs)
            continue
        if node.target in HEAVY_OPS and any(n.target in HEAVY_OPS for n in current):
            lead = _read_through_lead(current, node)
            current = _close(current[: len(current) - len(lead)], runs) + lead
        current.append(node)
    _close(current, runs)

    segments: list[Segment] = []
    for run in runs:
        if all(n.target in DATA_MOVEMENT for n in run):  # nothing to gain in TVM
            continue
        segment = _extract(parent, run, f"segment_{len(segments)}")
        segments.append(segment)
    parent.graph.lint()
    parent.recompile()
    _record_example_inputs(parent, segments, program.example_inputs)
    return Partition(parent, segments, fallbacks)


def _gather_epilogue_groups(graph: fx.Graph) -> None:
    """Make each epilogue group contiguous by moving its nodes to just before its last one.

    Legal when every node of a group but the last is read only by the next node of the group (it
    may move later, up to its reader): true when marked; a group that later passes changed is left.
    """
    groups: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        if (group := epilogue_group(node)) is not None:
            groups.setdefault(group, []).append(node)
    for nodes in groups.values():
        if any(list(node.users) != [reader] for node, reader in zip(nodes, nodes[1:])):
            continue
        last = nodes[-1]
        for node in nodes[:-1]:
            last.prepend(node)


def _read_through_lead(run: list[fx.Node], heavy: fx.Node) -> list[fx.Node]:
    """The end of ``run`` that only lays out ``heavy``'s inputs, when ``heavy`` is attention: its kernel reads
    through layout chains (:mod:`fxopt.codegen.layout`) within its segment, so the chains join that segment."""
    if heavy.target is not SDPA:
        return []
    chains = {node for arg in heavy.all_input_nodes for node in read_through(arg).chain}
    start = len(run)
    while start and run[start - 1] in chains and epilogue_group(run[start - 1]) is None:
        start -= 1
    return run[start:]


def _close(run: list[fx.Node], runs: list[list[fx.Node]]) -> list[fx.Node]:
    if run:
        runs.append(run)
    return []


def _extract(parent: fx.GraphModule, run: list[fx.Node], name: str) -> Segment:
    """Move ``run`` into a new submodule ``name`` and call it from the parent graph."""
    members = set(run)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []
    constants: dict[str, torch.Tensor] = {}

    def lookup(arg: fx.Node) -> fx.Node:
        if arg in env:
            return env[arg]
        if arg.op == "get_attr":
            # Each segment holds its own reference to the constants it reads, under flat names.
            const_name = f"c{len(constants)}"
            constants[const_name] = getattr(*attribute_owner(parent, str(arg.target)))
            env[arg] = graph.get_attr(const_name)
        else:
            inputs.append(arg)
            env[arg] = graph.placeholder(arg.name)
        env[arg].meta = dict(arg.meta)
        return env[arg]

    for node in run:
        for arg in node.all_input_nodes:
            if arg not in members:
                lookup(arg)
        env[node] = graph.node_copy(node, lambda a: env[a])
    outputs = [n for n in run if any(u not in members for u in n.users)]
    graph.output(tuple(env[n] for n in outputs))

    root = torch.nn.Module()
    for const_name, tensor in constants.items():
        root.register_buffer(const_name, tensor)
    sub = fx.GraphModule(root, graph, class_name=name)
    ops = Counter(getattr(n.target, "__name__", str(n.target)).split(".")[0] for n in run)

    parent.add_submodule(name, sub)
    with parent.graph.inserting_before(run[0]):
        call = parent.graph.call_module(name, tuple(inputs))
        call.meta["val"] = tuple(n.meta.get("val") for n in outputs)
        for i, out in enumerate(outputs):
            item = parent.graph.call_function(operator.getitem, (call, i))
            item.meta = dict(out.meta)
            out.replace_all_uses_with(item, propagate_meta=False)
    for node in reversed(run):
        parent.graph.erase_node(node)
    for node in list(parent.graph.nodes):
        if node.op == "get_attr" and not node.users:
            parent.graph.erase_node(node)
    return Segment(name, sub, ops)


def _record_example_inputs(parent: fx.GraphModule, segments: list[Segment], example_inputs: tuple) -> None:
    """Run the parent once on the program's example inputs and keep what each segment received."""

    def recorder(segment: Segment):
        def record(_module, args):
            segment.example_inputs = tuple(args)

        return record

    handles = [s.graph_module.register_forward_pre_hook(recorder(s)) for s in segments]
    try:
        with torch.no_grad():
            parent(*example_inputs)
    finally:
        for handle in handles:
            handle.remove()
