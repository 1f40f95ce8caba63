"""Static speed of the hand kernels' innermost loops per CPU, from ``llvm-mca``: for the ISAs a host lacks.

``python benchmarks/kernels_mca.py [--cpus sapphirerapids znver4 znver3] [--mca llvm-mca-19]``: each kernel family
(:mod:`fxopt.codegen.kernels`: the float32 GEMM on BERT's 128x768x3072, attention on BERT's 12 heads x 128 x 64, the
direct convolution on ResNet-50's 3x3 64-channel layer blocked by the ISA's lanes, the int8 GEMM and (where the
CPU has AVX-512 BF16) the bfloat16 GEMM on BERT's 128x768x3072, the int8 direct convolution on that 3x3 layer,
int8 attention (Q·Kᵀ and P·V as ``vpdpbusd``) where the CPU has VNNI, the weight-only GEMM (4-bit weights, groups
of 128) on a decode step's 1x4096x4096 (its per-group sums; rows of
several tiles run the float GEMM's loop on panels dequantized once), the int8 Winograd convolution where the int8
dot product is ``vpmaddwd`` (ResNet-50's 3x3 256-channel layer on 14 x 14);
not the depthwise convolution, whose taps LLVM unrolls whole, leaving no loop, and which memory bounds) is built
with its default config for each CPU (``x86_64:CPU``: its ISA's tiles, lanes and instructions, cross-compiled
where this host lacks the ISA); the loops of its assembly that hold its multiply-adds (float FMAs, the int8
kernels' ``vpmaddwd``/``vpdpbusd``, the bfloat16 one's ``vdpbf16ps``; a label, a body, a jump back to the label)
go to ``llvm-mca -mcpu=CPU``, which predicts their cycles per iteration on that CPU's pipeline model. Printed per loop:
its multiply-add instructions and their width, the predicted operations (FLOP, or int8 multiplies and adds) per
cycle, and that as a share of the model's own peak for that instruction (its prediction for independent ones of
the same width; for FMAs beside the CPU's real peak, :data:`PEAK_FLOP_PER_CYCLE`: LLVM's models differ from the
chips and between versions;
LLVM 19 gives Sapphire Rapids one 512-bit FMA per cycle, it has two, and LLVM 14 gives Zen 3 one 256-bit FMA per
cycle, it has two). AMX tile products are not predicted: LLVM's models give ``tdpbusd``/``tdpbf16ps`` a
placeholder latency (100 cycles in LLVM 14), so on AMX CPUs the GEMMs are built as the vector kernels they take
where tiles do not divide the workload (``benchmarks/README.md`` gives AMX's rate from Intel's tables). A
prediction is of the loop alone with its data in L1: what packing, blocking and the loops
around it cost is not in it (``benchmarks/gemm.py`` measures the host's kernel whole). LLVM 14's ``llvm-mca`` knows
no Zen 4: the newest ``llvm-mca-NN`` on the PATH is used (Debian: ``apt-get install llvm-19``)."""

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys

from fxopt.codegen.compile import compile_kernel
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32, AttentionF32Config, AttentionInputs
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32
from fxopt.codegen.kernels.conv2d_int8 import CONV2D_INT8
from fxopt.codegen.kernels.gemm_bf16 import GEMM_BF16
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.kernels.gemm_int8 import GEMM_INT8, dot_instruction
from fxopt.codegen.kernels.gemm_wq import GEMM_WQ
from fxopt.codegen.kernels.winograd_int8 import WINOGRAD_INT8
from fxopt.targets import parse_target

#: float32 FLOP per cycle of one core at its FMA peak: FMA units x lanes x 2. Zen 4 runs a 512-bit FMA as two
#: 256-bit halves (2 x 8 x 2); Zen 5 and Intel's server cores have two 512-bit FMA units.
PEAK_FLOP_PER_CYCLE = {
    "skylake-avx512": 64,
    "icelake-server": 64,
    "sapphirerapids": 64,
    "emeraldrapids": 64,
    "znver5": 64,
    "znver4": 32,
    "znver3": 32,
}
_LANES = {"zmm": 16, "ymm": 8, "xmm": 4}
#: A multiply-add instruction on 32-bit lanes (its mnemonic, its register width) and the operations it does per
#: lane: an FMA 2 FLOP; ``vpmaddwd`` 2 int16 products summed (4); ``vpdpbusd`` 4 byte products summed in (8);
#: ``vdpbf16ps`` 2 bfloat16 products summed in (4 FLOP).
_MULTIPLY_ADD = re.compile(
    r"\s+(?:\{vex\}\s+)?(vfn?m(?:add|sub)\w*ps|vpmaddwd|vpdpbusd|vdpbf16ps)\s.*%(zmm|ymm|xmm)\d+\s*$"
)
_OPS_PER_LANE = {"vpmaddwd": 4, "vpdpbusd": 8, "vdpbf16ps": 4}


def _kind(match: re.Match) -> str:
    """``"FMA"``, ``"vpmaddwd"``, ``"vpdpbusd"`` or ``"vdpbf16ps"``: the multiply-add ``match`` matched."""
    return "FMA" if match.group(1).startswith("vf") else match.group(1)


def _ops(match: re.Match) -> int:
    """Operations of the multiply-add ``match`` matched."""
    return _OPS_PER_LANE.get(_kind(match), 2) * _LANES[match.group(2)]


def kernels(isa: Isa) -> dict:
    """The kernels measured, by name, scheduled for ``isa`` (without its AMX tiles, which no model predicts)."""
    isa = dataclasses.replace(isa, features=frozenset(f for f in isa.features if not f.startswith("amx-")))
    lanes = isa.lanes()
    measured = [
        (GEMM_F32, (128, 768, 3072)),
        (ATTENTION_F32, (1, 12, 128, 128, 64)),
        (CONV2D_F32, (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, lanes, lanes)),
        (GEMM_INT8, (128, 768, 3072)),
        # the int8 direct convolution: output blocks of its dot instruction's lanes
        (CONV2D_INT8, (1, 64, 56, 56, 64, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, dot_instruction(isa)[0])),
        (GEMM_BF16, (128, 768, 3072)),
        # the weight-only GEMM's decode: 4-bit weights in groups of 128, converted in the loop, sums per group
        (GEMM_WQ, (1, 4096, 4096, 128, 4)),
        # int8 Winograd where the dot product is vpmaddwd (no VNNI): ResNet-50's 3x3 layer on 14 x 14
        (WINOGRAD_INT8, (1, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 8, 8)),
    ]
    built = {
        family.kernel_name(w): family.build(w, family.default(w, isa))
        for family, w in measured
        if family.applies(w, isa)
    }
    if isa.vnni:  # int8 attention: Q·Kᵀ and P·V as vpdpbusd on int8 levels (a tile whose 8 rows divide the queries)
        workload = (1, 12, 128, 128, 64)
        quantized = AttentionInputs((1, 1, 128, 128), 0.125, quantized=True, vnni=True)
        config = AttentionF32Config(8, 2, isa.lanes())
        built[f"{ATTENTION_F32.kernel_name(workload)}/int8"] = ATTENTION_F32.build(workload, config, quantized)
    return built


def multiply_add_loops(asm: str) -> list[list[str]]:
    """The single-block loops of ``asm`` that hold multiply-adds, most first: each loop's instructions."""
    loops, label, body = [], None, []
    for line in asm.splitlines():
        start = re.match(r"^(\.LBB\w+):", line)
        if start:
            label, body = start.group(1), []
            continue
        if label is None or not line.startswith("\t") or line.lstrip().startswith((".", "#")):
            continue
        body.append(line)
        jump = re.match(r"\s+j\w+\s+(\.LBB\w+)", line)
        if jump:
            if jump.group(1) == label and any(_MULTIPLY_ADD.match(op) for op in body):
                loops.append(body)
            label = None
    return sorted(loops, key=lambda loop: -sum(bool(_MULTIPLY_ADD.match(op)) for op in loop))


def predict(loop: list[str], mcpu: str, mca: str) -> float:
    """``llvm-mca``'s cycles per iteration of ``loop`` on ``mcpu``."""
    result = subprocess.run(
        [mca, "-mtriple=x86_64-unknown-linux-gnu", f"-mcpu={mcpu}", "-iterations=200"],
        input="\n".join(loop) + "\n",
        capture_output=True,
        text=True,
        check=True,
    )
    iterations = int(re.search(r"Iterations:\s+(\d+)", result.stdout).group(1))
    cycles = int(re.search(r"Total Cycles:\s+(\d+)", result.stdout).group(1))
    return cycles / iterations


def model_peak(kind: str, width: str, mcpu: str, mca: str) -> float:
    """The operations per cycle ``llvm-mca``'s model of ``mcpu`` gives independent multiply-adds of ``kind``
    (:func:`_kind`) on ``width`` registers."""
    mnemonic = "vfmadd231ps" if kind == "FMA" else kind
    instructions = [f"{mnemonic} %{width}30, %{width}31, %{width}{i}" for i in range(24)]
    ops = _ops(_MULTIPLY_ADD.match(f"\t{instructions[0]}"))
    return 24 * ops / predict(instructions, mcpu, mca)


def newest_mca() -> str | None:
    """The newest ``llvm-mca-NN`` on the PATH, else ``llvm-mca``."""
    versioned = (shutil.which(f"llvm-mca-{n}") for n in range(30, 13, -1))
    return next((path for path in versioned if path), None) or shutil.which("llvm-mca")


def known_cpus(mca: str) -> set[str]:
    """The CPUs ``mca`` has a model of (its ``-mcpu=help`` listing, which LLVM prints on either stream)."""
    listing = subprocess.run([mca, "-mtriple=x86_64", "-mcpu=help"], capture_output=True, text=True)
    return set(re.findall(r"^\s+(\S+)\s+- Select", listing.stdout + listing.stderr, re.M))


def main(argv: list[str] | None = None) -> int:
    import tvm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", nargs="+", default=["sapphirerapids", "znver4", "znver3"])
    parser.add_argument("--mca", default=None, help="the llvm-mca to run (default: the newest on the PATH)")
    parser.add_argument("--loops", type=int, default=2, help="loops per kernel, most FMAs first")
    args = parser.parse_args(argv)
    mca = args.mca or newest_mca()
    if mca is None:
        print("no llvm-mca on the PATH (Debian: apt-get install llvm-19)", file=sys.stderr)
        return 1
    known = known_cpus(mca)
    version = subprocess.run([mca, "--version"], capture_output=True, text=True).stdout
    llvm = re.search(r"LLVM version (\S+)", version)
    print(f"{mca}: LLVM {llvm.group(1) if llvm else '?'}")
    print(
        f"{'CPU':<15} {'kernel':<44} {'loop':>4} {'multiply-adds':>18} {'cycles':>7} {'ops/cycle':>10} "
        f"{'model peak':>10} {'CPU peak':>8} {'of model peak':>13}"
    )
    for cpu in args.cpus:
        if cpu not in known:
            print(f"{cpu:<15} (this llvm-mca has no model of {cpu}; a newer LLVM has)")
            continue
        target = parse_target(f"x86_64:{cpu}")
        isa = Isa.of(target)
        for name, kernel in kernels(isa).items():
            asm = compile_kernel(tvm.IRModule({"main": kernel}), target.tvm()).mod.inspect_source("asm")
            for number, loop in enumerate(multiply_add_loops(asm)[: args.loops], 1):
                found = [match for match in map(_MULTIPLY_ADD.match, loop) if match]
                widest = max(found, key=lambda match: _LANES[match.group(2)])
                ops = sum(map(_ops, found))
                cycles = predict(loop, cpu, mca)
                peak = model_peak(_kind(widest), widest.group(2), cpu, mca)
                kinds = "/".join(sorted(set(map(_kind, found))))
                count = f"{len(found)} {kinds} {'/'.join(sorted({m.group(2) for m in found}))}"
                fma_peak = PEAK_FLOP_PER_CYCLE.get(cpu, "?") if _kind(widest) == "FMA" else "-"
                print(
                    f"{cpu:<15} {name:<44} {number:>4} {count:>18} {cycles:>7.1f} {ops / cycles:>10.1f} "
                    f"{peak:>10.0f} {fma_peak:>8} {ops / cycles / peak:>13.0%}"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
