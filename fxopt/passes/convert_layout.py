"""Converting a CNN to the blocked layout NCHW[x]c, once for the whole network."""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.fx as fx

from fxopt.ir.block_costs import BlockCosts, conv_geometry_key, read_block_costs
from fxopt.ir.meta import describe_node, has_symbolic_shapes, stamp_provenance
from fxopt.ir.program import Program
from fxopt.ir.traits import ACTIVATIONS, ADD, ARITHMETIC, DIV, MUL, SUB
from fxopt.passes.base import Pass, PassContext, option
from fxopt.targets import host_vector_bits

__all__ = ["ConvertLayout", "channel_block", "REBLOCK_US_PER_MIB"]

aten = torch.ops.aten
fxopt_ops = torch.ops.fxopt

_ELEMENTWISE = frozenset((*ACTIVATIONS, *ARITHMETIC, *ADD, *SUB, *MUL, *DIV))

#: What re-blocking a value costs (back to NCHW and into another block: two copies), in microseconds per MiB of
#: the value: an estimate, ~4 GB/s for these strided copies on 2 cores.
REBLOCK_US_PER_MIB = 500.0


def channel_block(channels: int, lanes: int) -> int | None:
    """The block of ``channels`` for vectors of ``lanes`` floats: the largest power of two up to ``lanes`` that
    divides them, if at least 4; else 1 for fewer than 4 (an RGB image: blocks of 1 are NCHW itself, so the
    conversion is free, and a convolution reads them as fast as blocks of 3); else all of them, if they fit one
    vector; else None (the tensor stays NCHW)."""
    block = lanes
    while block >= 4:
        if channels % block == 0:
            return block
        block //= 2
    if channels < 4:
        return 1
    return channels if channels <= lanes else None


def _host_lanes() -> int:
    return max(4, host_vector_bits() // 32)


@dataclass(frozen=True)
class ConvertLayout(Pass):
    """Put a CNN's activations in the blocked layout NCHW[x]c (NeoCPU; ONNX Runtime's NCHWc transformer) from its
    first convolution to its head, converting only where an op cannot take them blocked.

    A ``[N, C, H, W]`` activation becomes ``[N, C/x, H, W, x]`` (``fxopt::to_blocked``), ``x`` channels side by
    side: one CPU vector holds one pixel's block of channels, which is what convolution kernels on CPUs want
    (:mod:`fxopt.codegen.kernels.conv2d_f32`). 2-D float32 convolutions by a constant weight, plain, grouped
    or depthwise, become ``fxopt::conv2d_blocked`` (a zero-padding op before one folded into its padding, even
    one-sided as TensorFlow's "same" padding), max and average pools ``fxopt::pool2d_blocked``; elementwise ops
    (activations, arithmetic: residual adds, a squeeze-excitation's scale) and means over ``H, W`` (global
    average pools) take blocked values as they are. In a quantized graph, int8 convolutions (``fxopt::conv_q``:
    a constant weight, one activation scale; plain ones with input blocks of whole groups of 4 channels, or an RGB
    image's, and output blocks of ``lanes`` or 8; depthwise ones in their channels' block) become
    ``fxopt::conv_q_blocked``, a zero pad before their quantization folded into their padding, and int8
    quantizations with one scale take blocked values as they are, so the int8 values between convolutions stay
    blocked too. Any other reader of a blocked value reads
    it converted back (``fxopt::from_blocked``), once per value; so do the graph's outputs. The block of a tensor
    is a function of its channels (:func:`channel_block`): the largest power of two up to ``lanes`` dividing them,
    so every op's inputs agree, unless ``block_costs`` names a file of measured convolution times per block pair
    (:mod:`fxopt.ir.block_costs`; tuning writes one): then each convolution's output block is searched
    (:func:`_searched_plan`; counted ``searched-blocks`` where it differs). Convolutions that stay NCHW
    (transposed, 1-D or 3-D, non-constant weights, channels without a block) are noted in the pass's report.

    Exact: the same arithmetic on re-laid values. For CPU targets (the ``cpu`` pipeline); in PyTorch the blocked
    ops convert back and forth around each op and are slower, so a graph with symbolic (dynamic) shapes, which
    the TVM backend leaves to PyTorch, is left as it is.
    """

    name = "convert-layout"
    before = ("mark-epilogues",)
    lanes: int = option(0, "floats per vector, the largest block; 0: the host CPU's (16 with AVX-512, 8 with AVX2)")
    block_costs: str = option(
        "", "a JSON file of measured convolution times per block pair (fxopt tune writes one); empty: none"
    )

    def __post_init__(self):
        if self.lanes and (self.lanes < 4 or self.lanes & (self.lanes - 1)):
            raise ValueError(f"lanes must be 0 (the host's) or a power of two >= 4, not {self.lanes}")

    def apply(self, program: Program, ctx: PassContext) -> bool:
        graph = program.graph
        if has_symbolic_shapes(graph):  # TVM builds static shapes: in PyTorch the blocked ops only cost
            ctx.skip("the graph", "symbolic shapes (the CPU kernels are built for static ones)")
            return False
        lanes = self.lanes or _host_lanes()
        plan = _searched_plan(graph, lanes, read_block_costs(self.block_costs)) if self.block_costs else {}
        blocking = _rewrite(graph, lanes, ctx, plan)
        searched = sum(1 for name, block in plan.items() if block != blocking.default_blocks[name])
        if searched:
            ctx.count("searched-blocks", searched)
        for node in graph.nodes:
            if node.target is fxopt_ops.from_blocked.default:
                ctx.count("converted-back")
        return blocking.changed


def _rewrite(graph: fx.Graph, lanes: int, ctx: PassContext, plan: dict[str, int]) -> _Blocking:
    """Put ``graph`` in the blocked layout, each convolution named in ``plan`` writing its block."""
    blocking = _Blocking(graph, lanes, ctx, plan)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        with graph.inserting_before(node):
            new = blocking.blocked_form(node)
        if new is None:
            continue
        blocked, block = new
        blocking.blocks[blocked] = block
        with graph.inserting_after(blocked):
            plain = graph.call_function(fxopt_ops.from_blocked.default, (blocked,))
        plain.meta["val"] = node.meta["val"]  # the same value: later ops read its shape
        stamp_provenance([blocked, plain], ConvertLayout.name, [node])
        node.replace_all_uses_with(plain, propagate_meta=False)
        graph.erase_node(node)
        blocking.changed = True
    graph.eliminate_dead_code()  # the conversions back nothing reads now, the pads folded into convolutions
    return blocking


def _searched_plan(graph: fx.Graph, lanes: int, costs: BlockCosts) -> dict[str, int]:
    """The output block per convolution (by node name) that minimizes the measured convolution times plus the
    re-blocking their disagreements cost (:func:`_plan_cost`): by coordinate descent from the blocks of the
    channels, each convolution in turn trying each output block it was measured with, until a sweep changes
    nothing. Values joined by elementwise ops share a block, so a convolution's block is weighed with its
    readers' input blocks and the conversions a residual would need."""
    trial = _rewrite(_copy(graph), lanes, PassContext(), {})
    candidates = {
        name: sorted({out for _, out in costs[key]} - {trial.default_blocks[name]})
        for name, (key, _, _) in trial.convs.items()
        if key in costs
    }
    plan: dict[str, int] = {}
    best = _plan_cost(trial, costs)
    changed = True
    while changed:
        changed = False
        for name, blocks in candidates.items():
            for block in blocks:
                if block == plan.get(name):
                    continue
                tried = {**plan, name: block}
                cost = _plan_cost(_rewrite(_copy(graph), lanes, PassContext(), tried), costs)
                if cost < best - 1e-9:
                    plan, best, changed = tried, cost, True
    return plan


def _plan_cost(blocking: _Blocking, costs: BlockCosts) -> float:
    """Microseconds a rewrite costs: its measured convolutions (infinite for a block pair not measured) and its
    re-blocked values (:data:`REBLOCK_US_PER_MIB`)."""
    live = set(blocking.graph.nodes)
    convs = sum(
        costs[key].get((in_block, out_block), math.inf)
        for key, in_block, out_block in blocking.convs.values()
        if key in costs
    )
    reblocked = sum(size for node, size in blocking.reblocked.items() if node in live)
    return convs + reblocked / 2**20 * REBLOCK_US_PER_MIB


def _copy(graph: fx.Graph) -> fx.Graph:
    copied = fx.Graph()
    copied.output(copied.graph_copy(graph, {}))
    return copied


class _Blocking:
    """One run of the pass: the blocked values made so far and the conversions into the layout (one per value and
    block, so a residual reads the conversion its convolution read)."""

    def __init__(self, graph: fx.Graph, lanes: int, ctx: PassContext, plan: dict[str, int]):
        self.graph, self.lanes, self.ctx, self.plan = graph, lanes, ctx, plan
        self.changed = False
        self.blocks: dict[fx.Node, int] = {}  # blocked value -> its block
        self.conversions: dict[tuple[fx.Node, int], fx.Node] = {}
        self.convs: dict[str, tuple[str, int, int]] = {}  # conv name -> geometry key, input and output block
        self.default_blocks: dict[str, int] = {}  # conv name -> the block of its output channels
        self.reblocked: dict[fx.Node, int] = {}  # conversion of a value blocked otherwise -> its bytes

    def blocked_form(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """The blocked node computing ``node``'s value (inserted before it) and its block, or None."""
        value = node.meta.get("val")
        if node.target is fxopt_ops.quantize.default:
            return self._quantize(node)
        if node.target is fxopt_ops.conv_q.default:
            return self._conv_q(node)
        if not isinstance(value, torch.Tensor) or value.dtype != torch.float32:
            return None
        if node.target is aten.convolution.default:
            return self._conv(node)
        if node.target is operator.getitem:
            return self._max_pool(node) or self._split_part(node)
        if node.target is aten.avg_pool2d.default:
            return self._avg_pool(node)
        if node.target is aten.mean.dim:
            return self._mean(node)
        if node.target is aten.slice.Tensor:
            return self._channel_slice(node)
        if node.target is aten.cat.default:
            return self._channel_cat(node)
        if node.target in _ELEMENTWISE:
            return self._elementwise(node)
        return None

    def _conv(self, conv: fx.Node) -> tuple[fx.Node, int] | None:
        x, weight, bias, stride, padding, dilation, transposed, _, groups = conv.args
        x, weight = cast(fx.Node, x), cast(fx.Node, weight)
        out = conv.meta["val"]
        if out.dim() != 4 or transposed:
            self.ctx.skip(describe_node(conv), "not a 2-D convolution" if out.dim() != 4 else "transposed")
            return None
        if weight.op != "get_attr" or weight.meta["val"].dtype != torch.float32:
            self.ctx.skip(describe_node(conv), "its weight is not a float32 constant")
            return None
        channels, out_channels = x.meta["val"].shape[1], out.shape[1]
        depthwise = groups == channels == out_channels != 1
        block = channel_block(out_channels, self.lanes)
        if block is not None:
            self.default_blocks[conv.name] = block
            planned = self.plan.get(conv.name, block)
            block = planned if out_channels % planned == 0 else block
        if block is None:
            self.ctx.skip(describe_node(conv), f"{out_channels} output channels have no block of up to {self.lanes}")
            return None
        top, left = cast(list, padding)
        sides = [top, left, top, left]
        source = x
        extra = _zero_pad(x) if x.target is aten.constant_pad_nd.default else None
        if extra is not None:
            source = cast(fx.Node, x.args[0])
            sides = [s + e for s, e in zip(sides, extra)]
        # A depthwise convolution reads its input in its own block; others, in any.
        if depthwise:
            blocked_x: fx.Node | None = self._in_block(source, block)
        else:
            blocked_x = self._blocked_input(source, channel_block(channels, self.lanes))
        if blocked_x is None:
            self.ctx.skip(describe_node(conv), f"{channels} input channels have no block of up to {self.lanes}")
            return None
        self.ctx.count("depthwise-convs" if depthwise else "grouped-convs" if groups != 1 else "convs")
        n, _, height, width = source.meta["val"].shape
        kernel, stride, dilation = weight.meta["val"].shape[2:], cast(list, stride), cast(list, dilation)
        key = conv_geometry_key(
            n, channels, height, width, out_channels, kernel, stride, sides, dilation, cast(int, groups)
        )
        self.convs[conv.name] = (key, self.blocks[blocked_x], block)
        new = self.graph.call_function(
            fxopt_ops.conv2d_blocked.default,
            (blocked_x, weight, bias, list(cast(list, stride)), sides, list(cast(list, dilation)), groups, block),
        )
        return new, block

    def _quantize(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """An int8 quantization with one scale and zero point of a blocked value: elementwise, blocked alike."""
        return self._quantized(*node.args)

    def _quantized(self, x, scale, zero_point, fmt) -> tuple[fx.Node, int] | None:
        """The int8 quantization by one ``scale`` and ``zero_point`` of the blocked value ``x`` converts back, or
        None."""
        x = cast(fx.Node, x)
        per_tensor = all(cast(fx.Node, p).meta["val"].numel() == 1 for p in (scale, zero_point))
        if x.target is not fxopt_ops.from_blocked.default or not per_tensor or fmt != "int8":
            return None
        blocked = cast(fx.Node, x.args[0])
        new = self.graph.call_function(fxopt_ops.quantize.default, (blocked, scale, zero_point, fmt))
        return new, self.blocks[blocked]

    def _conv_q(self, conv: fx.Node) -> tuple[fx.Node, int] | None:
        """An int8 2-D convolution (``fxopt::conv_q``) with a constant weight and one activation scale:
        ``fxopt::conv_q_blocked``, its input blocked int8. Plain ones (one group) need an output block of a
        vector or of 8 channels (the int8 dot products' lanes: 16 or 8 with VNNI, 8 without) and an input block
        of whole groups of 4 channels (they sum 2 or 4) or fewer than 4 channels (an RGB image, blocks of 1:
        NCHW itself); depthwise ones read and write their channels' own block (each channel's products are its
        own)."""
        xq, x_scale, x_zero_point, wq, w_scale, bias, stride, padding, dilation, groups, out_dtype = conv.args
        xq, wq = cast(fx.Node, xq), cast(fx.Node, wq)
        out = conv.meta["val"]
        channels, out_channels = xq.meta["val"].shape[1], out.shape[1]
        depthwise = groups == channels == out_channels != 1
        in_block = channel_block(channels, self.lanes)
        per_tensor = all(cast(fx.Node, p).meta["val"].numel() == 1 for p in (x_scale, x_zero_point))
        whole_groups = in_block is not None and (in_block % 4 == 0 or channels < 4)
        out_block = channel_block(out_channels, self.lanes)
        fits = depthwise or (whole_groups and out_block in (self.lanes, 8))
        if out.dim() != 4 or wq.op != "get_attr" or groups != 1 and not depthwise or xq.meta["val"].dtype != torch.int8:
            return None
        if not (per_tensor and fits and in_block is not None):
            note = "its channels have no int8 blocks (input: groups of 4, output: a vector or 8)"
            self.ctx.skip(describe_node(conv), note)
            return None
        top, left = cast(list, padding)
        sides = [top, left, top, left]
        padded = self._padded_quantization(xq)
        if padded is not None:
            xq, extra = padded
            sides = [s + e for s, e in zip(sides, extra)]
        blocked_x = self._in_block(xq, in_block) if depthwise else cast(fx.Node, self._blocked_input(xq, in_block))
        block = cast(int, in_block if depthwise else out_block)
        self.ctx.count("quantized-convs")
        args = (blocked_x, x_scale, x_zero_point, wq, w_scale, bias, stride, sides, dilation)
        new = self.graph.call_function(fxopt_ops.conv_q_blocked.default, (*args, groups, out_dtype, block))
        return new, block

    def _padded_quantization(self, xq: fx.Node) -> tuple[fx.Node, list[int]] | None:
        """For ``xq``, an int8 quantization (one scale) of a blocked value zero-padded NCHW (TensorFlow's "same"
        padding, spelled out before a convolution): the quantization of the blocked value itself, read back NCHW,
        and the padding ``[top, left, bottom, right]``, which the blocked convolution pads with the zero point,
        the quantization of 0; else None."""
        pad = cast(fx.Node, xq.args[0]) if xq.target is fxopt_ops.quantize.default else None
        if pad is None or pad.target is not aten.constant_pad_nd.default:
            return None
        extra, source = _zero_pad(pad), cast(fx.Node, pad.args[0])
        quantized = None if extra is None else self._quantized(source, *xq.args[1:])
        if extra is None or quantized is None:
            return None
        blocked, block = quantized
        self.blocks[blocked] = block
        plain = self.graph.call_function(fxopt_ops.from_blocked.default, (blocked,))
        plain.meta["val"] = torch.empty_like(source.meta["val"], dtype=torch.int8)
        return plain, extra

    def _blocked_input(self, x: fx.Node, block: int | None) -> fx.Node | None:
        """``x``'s value blocked: the blocked value it converts back, or ``x`` converted by ``block``."""
        if x.target is fxopt_ops.from_blocked.default:
            return cast(fx.Node, x.args[0])
        return None if block is None else self._converted(x, block)

    def _in_block(self, x: fx.Node, block: int) -> fx.Node:
        """``x``'s value blocked by ``block`` exactly: as :meth:`_blocked_input`, a value blocked otherwise converted
        back and again."""
        blocked = cast(fx.Node, self._blocked_input(x, block))
        if self.blocks[blocked] == block:
            return blocked
        plain = next((u for u in blocked.users if u.target is fxopt_ops.from_blocked.default), None)
        if plain is None:
            plain = self.graph.call_function(fxopt_ops.from_blocked.default, (blocked,))
        converted = self._converted(plain, block)
        self.reblocked[converted] = x.meta["val"].numel() * x.meta["val"].element_size()
        return converted

    def _converted(self, x: fx.Node, block: int) -> fx.Node:
        if (x, block) not in self.conversions:
            with self.graph.inserting_after(x):
                converted = self.graph.call_function(fxopt_ops.to_blocked.default, (x, block))
            self.blocks[converted] = block
            self.conversions[x, block] = converted
        return self.conversions[x, block]

    def _max_pool(self, item: fx.Node) -> tuple[fx.Node, int] | None:
        """``max_pool2d_with_indices(x, ...)[0]`` where the indices are not read."""
        pool, index = item.args
        pool = cast(fx.Node, pool)
        if pool.target is not aten.max_pool2d_with_indices.default or index != 0 or len(pool.users) != 1:
            return None
        x = cast(fx.Node, pool.args[0])
        if x.target is not fxopt_ops.from_blocked.default:
            return None
        kernel, *rest = _pool_args(pool.args[1:], ([], [0, 0], [1, 1], False))
        stride = rest[0] or kernel
        new = self.graph.call_function(
            fxopt_ops.pool2d_blocked.default, (x.args[0], "max", kernel, stride, *rest[1:], True)
        )
        return new, self.blocks[cast(fx.Node, x.args[0])]

    def _avg_pool(self, pool: fx.Node) -> tuple[fx.Node, int] | None:
        x = cast(fx.Node, pool.args[0])
        if x.target is not fxopt_ops.from_blocked.default or len(pool.args) > 6 or x.meta["val"].dim() != 4:
            return None  # a divisor override stays NCHW
        kernel, stride, padding, ceil_mode, count_include_pad = _pool_args(pool.args[1:], ([], [0, 0], False, True))
        new = self.graph.call_function(
            fxopt_ops.pool2d_blocked.default,
            (x.args[0], "avg", kernel, stride or kernel, padding, [1, 1], ceil_mode, count_include_pad),
        )
        return new, self.blocks[cast(fx.Node, x.args[0])]

    def _mean(self, mean: fx.Node) -> tuple[fx.Node, int] | None:
        """A mean over ``H, W``: over the same dims of the blocked value. Kept dims stay blocked; without them the
        ``[N, C/x, x]`` result is ``[N, C]`` as it is, and the mean's readers read that view."""
        x = cast(fx.Node, mean.args[0])
        dims = mean.args[1] if len(mean.args) > 1 else None
        keepdim = bool(mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False))
        if x.target is not fxopt_ops.from_blocked.default or x.meta["val"].dim() != 4 or mean.kwargs.get("dtype"):
            return None
        if not isinstance(dims, (list, tuple)) or sorted(d % 4 for d in dims) != [2, 3]:
            return None
        blocked = cast(fx.Node, x.args[0])
        new = self.graph.call_function(aten.mean.dim, (blocked, [2, 3], keepdim))
        if keepdim:
            return new, self.blocks[blocked]
        # [N, C] with N left to the view (a symbolic batch is not a number to write here).
        flat = self.graph.call_function(aten.view.default, (new, [-1, mean.meta["val"].shape[1]]))
        flat.meta["val"] = mean.meta["val"]
        stamp_provenance([new, flat], ConvertLayout.name, [mean])
        mean.replace_all_uses_with(flat, propagate_meta=False)
        return None

    def _channel_slice(self, piece: fx.Node) -> tuple[fx.Node, int] | None:
        """A slice of whole blocks of channels (the parts of two convolutions ``fuse-blocks`` merged): the same
        slice of the blocks."""
        given = piece.args[1:]
        dim, start, end, step = cast(
            list[Any], [given[i] if i < len(given) else d for i, d in enumerate((0, None, 2**62, 1))]
        )
        return self._blocks_of(cast(fx.Node, piece.args[0]), dim, start or 0, end, step)

    def _split_part(self, item: fx.Node) -> tuple[fx.Node, int] | None:
        """A part of a split along the channels: a slice (:meth:`_channel_slice`)."""
        split, part = cast(tuple[fx.Node, int], item.args)
        if split.target not in (aten.split_with_sizes.default, aten.split.Tensor):
            return None
        x, sizes = cast(fx.Node, split.args[0]), split.args[1]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        start = cast(int, sizes) * part if split.target is aten.split.Tensor else sum(cast(list[int], sizes)[:part])
        return self._blocks_of(x, cast(int, dim), start, start + item.meta["val"].shape[1], 1)

    def _blocks_of(self, x: fx.Node, dim: int, start: int, end: int, step: int) -> tuple[fx.Node, int] | None:
        """Channels ``start:end`` of a blocked value, where they are whole blocks."""
        if x.target is not fxopt_ops.from_blocked.default or x.meta["val"].dim() != 4 or dim % 4 != 1:
            return None
        blocked = cast(fx.Node, x.args[0])
        block, channels = self.blocks[blocked], x.meta["val"].shape[1]
        start, end = start + channels if start < 0 else start, min(end + channels if end < 0 else end, channels)
        if step != 1 or start % block or end % block or not 0 <= start < end:
            return None
        return self.graph.call_function(aten.slice.Tensor, (blocked, 1, start // block, end // block)), block

    def _channel_cat(self, cat: fx.Node) -> tuple[fx.Node, int] | None:
        """A concatenation along the channels of at least one blocked value: of the blocks, all in one block that
        divides every part's channels."""
        parts = cast(list[fx.Node], cat.args[0])
        dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
        if cat.meta["val"].dim() != 4 or cast(int, dim) % 4 != 1:
            return None
        if not any(p.target is fxopt_ops.from_blocked.default for p in parts):
            return None
        block = channel_block(math.gcd(*(p.meta["val"].shape[1] for p in parts)), self.lanes)
        if block is None:
            return None
        blocked = [self._in_block(part, block) for part in parts]
        return self.graph.call_function(aten.cat.default, (blocked, 1)), block

    def _elementwise(self, node: fx.Node) -> tuple[fx.Node, int] | None:
        """An elementwise op reading a blocked value of its channels. Its other 4-D tensors broadcast as blocked
        values too, those of its channels in its block (a squeeze-excitation's ``[N, C, 1, 1]`` scale), those of
        one channel in a block of one; single values as they are; anything else (a ``[C, 1, 1]`` constant)
        keeps it NCHW."""
        shape = node.meta["val"].shape
        if len(shape) != 4 or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
            return None
        block = next(
            (
                self.blocks[cast(fx.Node, a.args[0])]
                for a in node.args
                if isinstance(a, fx.Node)
                and a.target is fxopt_ops.from_blocked.default
                and a.meta["val"].shape[1] == shape[1]
            ),
            None,
        )
        if block is None:
            return None
        args: list[Any] = []
        for arg in node.args:
            value = arg.meta.get("val") if isinstance(arg, fx.Node) else None
            if isinstance(value, torch.Tensor) and value.dim() == 4 and value.shape[1] in (shape[1], 1):
                args.append(self._in_block(cast(fx.Node, arg), block if value.shape[1] == shape[1] else 1))
            elif value is None or (isinstance(value, torch.Tensor) and value.numel() == 1):
                args.append(arg)
            else:
                return None
        return self.graph.call_function(cast(Any, node.target), tuple(args), dict(node.kwargs)), block


def _zero_pad(pad: fx.Node) -> list[int] | None:
    """``[top, left, bottom, right]`` of a ``constant_pad_nd`` padding H and W (at most) with zeros, else None."""
    sizes = cast(list[int], pad.args[1])
    value = pad.args[2] if len(pad.args) > 2 else pad.kwargs.get("value", 0.0)
    if value != 0 or len(sizes) not in (2, 4) or min(sizes) < 0 or pad.meta["val"].dim() != 4:
        return None
    left, right, top, bottom = [*sizes, 0, 0][:4]
    return [top, left, bottom, right]


def _pool_args(args: tuple, defaults: tuple) -> list:
    """A pool's kernel and the arguments after it, with ``defaults`` for those left out; sizes given as one int
    (or one-element lists) for both dims."""
    values = [args[0], *[args[1 + i] if len(args) > 1 + i else d for i, d in enumerate(defaults)]]
    return [
        [v, v] if isinstance(v, int) and not isinstance(v, bool) and i < 4 else _pair(v) for i, v in enumerate(values)
    ]


def _pair(value: Any) -> Any:
    return [value[0], value[0]] if isinstance(value, (list, tuple)) and len(value) == 1 else value
