"""The float32 GEMM kernel alone against ``torch.nn.functional.linear`` on BERT-base's shapes.

``python benchmarks/gemm.py [--rounds 10] [--threads N]``: for each shape (M x K x N: 128 rows for a 128-token
sequence, 1 row for decoding) the kernel fxopt emits for a ``linear`` with a constant weight on this CPU
(:mod:`fxopt.codegen.kernels.gemm_f32` with its default config, the weight packed once) and PyTorch's (MKL), both
with the same thread count, timed in warm blocks (:func:`run.measure`: rounds of a block of calls per runner, each
block's lower quartile, the median of rounds). Prints milliseconds, GFLOP/s, the ratio (>1: fxopt faster) and
fxopt's share of the cores' FMA peak (measured: :func:`run.fma_peak`)."""

import argparse
import os
import sys

import torch
from run import fma_peak, measure  # benchmarks/run.py, beside this script (sys.path[0])

from fxopt.codegen.compile import compile_kernel
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.runtime import to_tvm, use_host_cores
from fxopt.targets import host_cpu, parse_target

SHAPES = [(128, 768, 768), (128, 768, 3072), (128, 3072, 768), (1, 768, 3072)]


def kernel_runner(rows: int, in_features: int, out_features: int, x, weight, bias):
    import tvm

    workload = (rows, in_features, out_features)
    config = GEMM_F32.default(workload, Isa.of(parse_target("cpu")))
    library = compile_kernel(tvm.IRModule({"main": GEMM_F32.build(workload, config)}), parse_target("cpu").tvm())
    out = torch.empty(rows, out_features)
    args = [to_tvm(x), to_tvm(GEMM_F32.pack(weight, config)), to_tvm(bias), to_tvm(out)]
    function = library["main"]
    torch.testing.assert_close(
        function(*args) or out, torch.nn.functional.linear(x, weight, bias), rtol=1e-4, atol=1e-3
    )
    return lambda: function(*args)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="for both (default: all cores)")
    args = parser.parse_args(argv)
    if not Isa.of(parse_target("cpu")).avx2:
        print("this CPU has no AVX2: the fxopt GEMM kernel is not built here", file=sys.stderr)
        return 1
    # Both runtimes sized alike (TVM reads its thread count once, when its pool starts: one count per process).
    os.environ["TVM_NUM_THREADS"] = str(args.threads)
    use_host_cores()
    torch.set_num_threads(args.threads)
    peak = fma_peak(args.threads)
    print(f"CPU: {host_cpu()}; {args.threads} threads; FMA peak {peak / 1e9:.0f} GFLOP/s (measured)")
    print(
        f"{'M x K x N':<16} {'torch ms':>9} {'fxopt ms':>9} {'torch GF/s':>10} {'fxopt GF/s':>10} "
        f"{'fxopt/torch':>11} {'of peak':>8}"
    )
    for rows, in_features, out_features in SHAPES:
        torch.manual_seed(0)
        x, weight = torch.randn(rows, in_features), torch.randn(out_features, in_features)
        bias = torch.randn(out_features)
        runners = {
            "torch": lambda: torch.nn.functional.linear(x, weight, bias),
            "fxopt": kernel_runner(rows, in_features, out_features, x, weight, bias),
        }
        seconds = measure(runners, args.rounds)
        flop = 2 * rows * in_features * out_features
        share = f"{flop / seconds['fxopt'] / peak:.0%}"
        print(
            f"{f'{rows}x{in_features}x{out_features}':<16} {seconds['torch'] * 1e3:>9.3f} "
            f"{seconds['fxopt'] * 1e3:>9.3f} {flop / seconds['torch'] / 1e9:>10.1f} "
            f"{flop / seconds['fxopt'] / 1e9:>10.1f} {seconds['torch'] / seconds['fxopt']:>10.2f}x {share:>8}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
