"""A CNN's convolutions, each kernel alone, against PyTorch's and the cores' FMA peak.

``python benchmarks/conv.py [resnet50 | path/to/file.py:factory] [--rounds 10] [--threads N] [--tuned]``: the
model is captured and put in the blocked layout (the ``cpu`` pipeline); for each distinct convolution the kernel
fxopt builds for it on this CPU (:mod:`fxopt.codegen.kernels.conv2d_f32`, :mod:`~fxopt.codegen.kernels.depthwise_f32`
or :mod:`~fxopt.codegen.kernels.winograd_f32`, as the lowering picks it, grouped ones in the groups it computes
them in; default config, or with ``--tuned`` the one this machine's tuning database holds; weight packed once) and
PyTorch's ``conv2d`` on NCHW, with the same thread count, timed in warm blocks (:func:`run.measure`). Prints each
shape's milliseconds and GFLOP/s, and the sums over the model (each shape times its count): the time, fxopt /
torch, and fxopt's share of the cores' FMA peak (measured: :func:`run.fma_peak`)."""

import argparse
import collections
import os
import sys

import torch
from run import fma_peak, measure  # benchmarks/run.py, beside this script (sys.path[0])

import fxopt
from fxopt.codegen.compile import compile_kernel
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.conv2d_f32 import ConvShape
from fxopt.codegen.lower_conv import block_diagonal, conv_kernel, conv_shape
from fxopt.codegen.runtime import to_tvm, use_host_cores
from fxopt.codegen.templates import TemplateChoices
from fxopt.codegen.tuning_database import existing_database
from fxopt.loading import load_model
from fxopt.passes.manager import PassManager
from fxopt.targets import host_cpu, parse_target


def model_convolutions(name: str) -> collections.Counter:
    """The shape of each blocked convolution of model ``name`` (built-in, or ``path/to/file.py:factory``), with how
    often it occurs."""
    model, inputs = load_model(name)
    program, _ = PassManager("cpu", verify="off").run(fxopt.capture(model, inputs))
    return collections.Counter(
        conv_shape(node) for node in program.graph.nodes if node.target is torch.ops.fxopt.conv2d_blocked.default
    )


def kernel_kind(shape: ConvShape) -> str:
    """``direct``, ``dw`` or ``winograd``: the family the lowering picks on this CPU."""
    family, _ = conv_kernel(shape, Isa.of(parse_target("cpu")))
    return {"conv2d_f32": "direct", "depthwise_f32": "dw", "winograd_f32": "winograd"}[family.name]


def kernel_runner(shape: ConvShape, templates: TemplateChoices):
    """The kernel the lowering builds for ``shape``, checked against PyTorch, and PyTorch's ``conv2d``: two
    runners."""
    import tvm

    target = parse_target("cpu")
    family, computed = conv_kernel(shape, Isa.of(target))
    config = templates.config(family, computed.workload, Isa.of(target))
    library = compile_kernel(tvm.IRModule({"main": family.build(computed.workload, config)}), target.tvm())
    torch.manual_seed(0)
    x = torch.randn(shape.batch, shape.channels, shape.height, shape.width)
    groups = shape.groups
    weight = torch.randn(shape.out_channels, shape.channels // groups, shape.kernel_h, shape.kernel_w)
    bias = torch.randn(shape.out_channels)
    out = torch.empty(family.result_shape(computed))
    blocked = torch.ops.fxopt.to_blocked(x, shape.in_block)
    packed = family.pack(block_diagonal(weight, groups, computed.groups), computed)
    args = [to_tvm(t) for t in (blocked, packed, bias, out)]
    function = library["main"]
    padded = torch.nn.functional.pad(x, (shape.pad_left, shape.pad_right, shape.pad_top, shape.pad_bottom))
    strides, dilations = (shape.stride_h, shape.stride_w), (shape.dilation_h, shape.dilation_w)

    def reference():
        return torch.nn.functional.conv2d(padded, weight, bias, strides, 0, dilations, groups)

    function(*args)
    expected = torch.ops.fxopt.to_blocked(reference(), shape.out_block)
    # Within fxopt's tolerance (1e-4 of the largest value): Winograd's transforms add roundings.
    torch.testing.assert_close(
        out.reshape(expected.shape), expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
    )
    return lambda: function(*args), reference


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="resnet50")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for both (default: all cores)")
    parser.add_argument("--tuned", action="store_true", help="the configs of this machine's tuning database")
    args = parser.parse_args(argv)
    target = parse_target("cpu")
    if not Isa.of(target).avx2:
        print("this CPU has no AVX2: the fxopt convolution kernels are not built here", file=sys.stderr)
        return 1
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    use_host_cores()
    torch.set_num_threads(args.threads)
    templates = TemplateChoices.load(existing_database(target) if args.tuned else None)
    peak = fma_peak(args.threads)
    print(f"CPU: {host_cpu()}; {args.threads} threads; FMA peak {peak / 1e9:.0f} GFLOP/s (measured)")
    print(
        f"{'count':>5} {'N C H W O KH KW stride pad dilation kernel':<44} "
        f"{'torch ms':>9} {'fxopt ms':>9} {'fxopt GF/s':>10}"
    )
    totals = collections.Counter()
    for shape, count in sorted(model_convolutions(args.model).items(), key=lambda kv: -kv[1]):
        fxopt_runner, torch_runner = kernel_runner(shape, templates)
        seconds = measure({"torch": torch_runner, "fxopt": fxopt_runner}, args.rounds)
        flop = 2 * shape.batch * shape.out_channels * shape.pixels * shape.channels // shape.groups
        flop *= shape.kernel_h * shape.kernel_w
        totals.update({"torch": seconds["torch"] * count, "fxopt": seconds["fxopt"] * count, "flop": flop * count})
        described = " ".join(map(str, shape[:9])) + " " + "/".join(map(str, shape[9:13]))
        described += f" {shape.dilation_h}" + (f" g{shape.groups}" if shape.groups > 1 else "")
        described += f" {kernel_kind(shape)}"
        print(
            f"{count:>5} {described:<44} {seconds['torch'] * 1e3:>9.3f} {seconds['fxopt'] * 1e3:>9.3f} "
            f"{flop / seconds['fxopt'] / 1e9:>10.1f}"
        )
    share = totals["flop"] / totals["fxopt"] / peak
    print(
        f"sum: torch {totals['torch'] * 1e3:.1f} ms, fxopt {totals['fxopt'] * 1e3:.1f} ms "
        f"({totals['fxopt'] / totals['torch']:.2f}x torch), {totals['flop'] / totals['fxopt'] / 1e9:.0f} GFLOP/s: "
        f"{share:.0%} of the FMA peak"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
