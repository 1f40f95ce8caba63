"""Side-by-side latency: PyTorch eager, torch.compile, ONNX Runtime, OpenVINO and fxopt, in one process.

Each round times every runner in turn in a warm block of calls (so machine
noise hits every runner alike, and no runner pays for the one before it); the
table reports medians over rounds, ratios to eager, and GFLOP/s (the model's
FLOPs, counted by PyTorch's flop counter, per second) beside the CPU's FMA peak.

    python benchmarks/run.py resnet50 bert --rounds 30 --target cpu
    python benchmarks/run.py resnet-tiny --rounds 5      # a quick smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.utils._pytree as pytree

import fxopt
from fxopt.codegen.compile import compile_kernel
from fxopt.codegen.runtime import use_host_cores
from fxopt.loading import load_model
from fxopt.targets import host_cpu, parse_target
from fxopt.timing import time_call
from fxopt.zoo import ZOO

Runner = Callable[[], object]


def make_runners(
    model: torch.nn.Module,
    inputs: tuple,
    target: str,
    tune: str | None = None,
) -> tuple[dict[str, Runner], dict[str, str], dict[str, str]]:
    """Build every runner; a runner that cannot be built is reported with the reason, not dropped silently.

    Returns the runners, the failures and, per fxopt runner, its dispatch note (how many segments run in TVM).
    ``fxopt(torch)`` runs the optimized graph in PyTorch; with ``tune``, a tuned fxopt runner is measured
    beside the untuned one.
    """
    runners: dict[str, Runner] = {}
    failures: dict[str, str] = {}
    notes: dict[str, str] = {}

    def add(name: str, build: Callable[[], Runner]) -> None:
        try:
            runner = build()
            runner()  # warm-up (and compilation for lazy runners)
            runners[name] = runner
        except Exception as exc:  # a peer failing must not stop the comparison
            failures[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"

    def fxopt_runner(name: str, target: str, budget: str | None) -> Runner:
        start = time.perf_counter()
        optimized = fxopt.optimize(model, inputs, target=target, tune=budget)
        seconds = time.perf_counter() - start
        optimized(*inputs)
        report = optimized.report()
        notes[name] = f"optimize() took {seconds:.0f} s; {report.backend_note}" + (
            f"; {report.tuning}" if report.tuning else ""
        )
        return lambda: optimized(*inputs)

    add("eager", lambda: lambda: model(*inputs))
    add("torch.compile", lambda: (lambda compiled: lambda: compiled(*inputs))(torch.compile(model)))
    add("torch.compile(freezing)", lambda: _compiled_frozen(model, inputs))
    add("onnxruntime", lambda: _onnxruntime(model, inputs))
    add("openvino", lambda: _openvino(model, inputs))
    # The optimized graph run by PyTorch: what the passes alone (BatchNorm folding, ...) change.
    add("fxopt(torch)", lambda: fxopt_runner("fxopt(torch)", "torch", None))
    for budget in (None, tune) if tune else (None,):
        name = f"fxopt({target}{', tuned ' + budget if budget else ''})"
        add(name, lambda: fxopt_runner(name, target, budget))
    return runners, failures, notes


def export_onnx(model: torch.nn.Module, inputs: tuple, path: Path | None = None) -> Path:
    """The model as ONNX (torch's dynamo exporter), at ``path`` or in a fresh temporary directory."""
    path = path or Path(tempfile.mkdtemp()) / "model.onnx"
    torch.onnx.export(model, inputs, str(path), dynamo=True, optimize=True)
    return path


def _onnxruntime(model: torch.nn.Module, inputs: tuple) -> Runner:
    import onnxruntime as ort

    path = export_onnx(model, inputs)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), pytree.tree_leaves(inputs))}
    return lambda: session.run(None, feed)


def _compiled_frozen(model: torch.nn.Module, inputs: tuple) -> Runner:
    """Inductor with ``freezing``: weights folded in as constants, the layout-optimized inference mode."""
    import torch._inductor.config as inductor_config

    compiled = torch.compile(model)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled(*inputs)  # compiles here, frozen
    return lambda: compiled(*inputs)


def _openvino(model: torch.nn.Module, inputs: tuple) -> Runner:
    # float32 like every runner here: the plugin's own default is bfloat16 where the CPU has AVX-512 BF16 or AMX
    # (a Zen 4 host ran ResNet-50 at 370 GFLOP/s, past the cores' float32 peak); benchmarks/quantization.py times
    # its bfloat16.
    return openvino_request(model, inputs, {"INFERENCE_PRECISION_HINT": "f32"})[0]


def openvino_request(model: torch.nn.Module, inputs: tuple, config: dict | None = None) -> tuple[Runner, object]:
    """A call of the model compiled by OpenVINO's CPU plugin (with ``config``, e.g. a precision hint) on
    ``inputs``, returning its outputs; and the compiled model."""
    import openvino as ov

    compiled = ov.Core().compile_model(ov.convert_model(model, example_input=inputs), "CPU", config or {})
    request = compiled.create_infer_request()
    feed = [t.numpy() for t in pytree.tree_leaves(inputs)]
    return (lambda: request.infer(feed)), compiled


def fma_peak(threads: int) -> float:
    """Measured FLOP/s of ``threads`` cores doing nothing but vector FMAs: what a kernel could reach on this
    machine, whatever clock the OS reports (this project's VMs report a 2.45 GHz base clock and run at ~3 GHz).

    A TVM kernel per core keeps 12 accumulator vectors, enough independent FMAs to hide their latency, each
    step adding ``b * b`` with ``b`` in registers: the fastest of 5 blocks of calls (each its lower quartile,
    :func:`fxopt.timing.time_call`). Nothing runs faster than the peak, so the fastest block is the one no other
    process slowed (one block once measured half the peak: a thread waiting for a busy core).
    """
    import numpy as np
    import tvm
    from tvm import s_tir, te

    use_host_cores()  # TVM's pool starts with half the cores otherwise
    lanes, chains, steps = host_cpu().vector_bits // 32, 12, 1 << 22
    b = te.placeholder((lanes,), "float32", name="b")
    k = te.reduce_axis((0, steps), "k")
    acc = te.compute((threads, chains, lanes), lambda t, j, lane: te.sum(b[lane] * b[lane], axis=k), name="acc")
    sch = s_tir.Schedule(te.create_prim_func([b, acc]))
    block = sch.get_sblock("acc")
    core, chain, lane, step = sch.get_loops(block)
    sch.reorder(core, step, chain, lane)
    sch.parallel(core)
    sch.unroll(chain)
    sch.vectorize(lane)
    sch.decompose_reduction(block, step)
    kernel = compile_kernel(sch.mod, parse_target("cpu").tvm())["main"]
    args = (
        tvm.runtime.tensor(np.full(lanes, 0.5, "float32")),
        tvm.runtime.tensor(np.zeros((threads, chains, lanes), "float32")),
    )
    return threads * chains * lanes * 2 * steps / min(time_call(kernel, args) for _ in range(5))


def model_flops(model: torch.nn.Module, inputs: tuple) -> int:
    """FLOPs of one call, as PyTorch's flop counter counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*inputs)
    return counter.get_total_flops()


def measure(runners: dict[str, Runner], rounds: int, block_seconds: float = 0.2) -> dict[str, float]:
    """Median latency of each runner over ``rounds`` rounds; in each round every runner in turn is timed in a
    warm block of calls (:func:`fxopt.timing.time_call`: one warm-up call, then calls for about
    ``block_seconds``, their lower quartile), the same helper fxopt's dispatch and the GPU check use.

    Blocks, not single calls in turn: what one runner leaves behind slows the call right after it (ONNX
    Runtime's spinning thread pool made the next PyTorch call 2-10x slower on the reference machine).
    """
    samples: dict[str, list[float]] = {name: [] for name in runners}
    with torch.no_grad():
        for _ in range(rounds):
            for name, runner in runners.items():
                samples[name].append(time_call(runner, budget=block_seconds))
    return {name: statistics.median(times) for name, times in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", default=["resnet50"], help=f"built-in models ({', '.join(ZOO)}) or path/to/file.py:factory"
    )
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--target", default="cpu")
    parser.add_argument(
        "--tune",
        default=None,
        metavar="BUDGET",
        help="also measure fxopt with tuned kernels (trials or a duration, e.g. 2000 or 30m)",
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(torch.get_num_threads())
    peak = fma_peak(len(os.sched_getaffinity(0)))
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of warm blocks; "
        f"CPU {host_cpu()}, FMA peak {peak / 1e9:.0f} GFLOP/s (measured)"
    )
    for name in args.models:
        try:
            model, inputs = load_model(name)
        except fxopt.FxoptError as exc:
            parser.error(str(exc))
        flops = model_flops(model, inputs)
        runners, failures, notes = make_runners(model, inputs, args.target, args.tune)
        medians = measure(runners, args.rounds)
        eager = medians.get("eager")
        print(f"\n{name} ({flops / 1e9:.2f} GFLOP per call)")
        print(f"  {'runner':<28} {'median ms':>10} {'/ eager':>8} {'GFLOP/s':>8}")
        for runner, seconds in medians.items():
            ratio = f"{seconds / eager:.2f}x" if eager else "-"
            print(f"  {runner:<28} {seconds * 1e3:>10.2f} {ratio:>8} {flops / seconds / 1e9:>8.1f}")
        for runner, reason in failures.items():
            print(f"  {runner:<28} failed: {reason}")
        for runner, note in notes.items():
            print(f"  {runner}: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
