"""The GPU check: everything fxopt does on a CUDA GPU, in one run of a few minutes (issue 19).

GPU time comes in short slots, on a machine with its own PyTorch, no TVM and no network, reached with at most
64 MiB carried. So the work is split in two:

    python benchmarks/gpu_check.py package            # here, where TVM is installed: writes .carry/ (~15 min)
    bash benchmarks/gpu_check.sh OUT                  # on the GPU machine: installs .carry/, runs, writes OUT/

``package`` writes ``.carry/`` (ignored by git):

- ``tvm-runtime.tar.xz``: TVM's Python package without its compiler library (~4 MB instead of ~60 MB
  compressed): :func:`fxopt.load` needs only the runtime (``TVM_USE_RUNTIME_LIB=1``);
- ``wheels/``: ``apache-tvm-ffi`` built for the GPU machine's Python (``--python``, 3.12);
- ``exports/CASE/``: each case's whole graph compiled for ``cuda:sm_90`` and exported *without weights*
  (kernels and bytecode: a few MB whatever the model's size). The GPU machine optimizes the same model again
  in PyTorch (capture and passes need no TVM) and hands its weights to :func:`fxopt.load`; a weight whose name or
  shape differs there (another torch or transformers version) is reported by name.

``run`` (what ``gpu_check.sh`` calls) records, in ``OUT/gpu_check.json`` and ``OUT/gpu_check.md``:

1. the machine: GPU, driver, Python, torch, fxopt, and whether TVM's compiler is there;
2. ``pytest -m gpu`` where TVM's compiler is importable (not with the runtime-only carry: the exports below
   run the same kernels);
3. every export loaded on the GPU with the rebuilt weights and checked against eager PyTorch on the GPU;
4. timings, in warm blocks of CUDA-synchronized calls per runner (medians over rounds; never one call of each
   in turn), of eager, ``torch.compile`` (Inductor) and fxopt per timed case, in the order of ``CASES`` until
   ``--budget`` seconds have passed.

``package --dry-run`` exports each case for the CPU as well, and ``run --dry-run`` puts those through the same
path with TVM's runtime alone and no GPU (tests/test_benchmarks.py does, on every CI run).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.utils._pytree as pytree

ROOT = Path(__file__).resolve().parent.parent
GPU_ARCH = "cuda:sm_90"  # the H100 and H200 lent to this project


@dataclass(frozen=True)
class Case:
    """A zoo model at a dtype and batch size; ``timed`` cases are also timed against eager and torch.compile."""

    model: str
    dtype: str = "float32"
    batch: int = 1
    timed: bool = True

    @property
    def name(self) -> str:
        return f"{self.model}-{self.dtype}-b{self.batch}"


# Timed in this order until the budget is spent: the acceptance pair (BERT-base and ResNet-50, fp16, batch 1)
# first. Then every zoo model once at float32, for correctness.
CASES = [
    Case("bert", "float16"),
    Case("resnet50", "float16"),
    Case("gpt2", "float16"),
    Case("bert"),
    Case("resnet50"),
    Case("gpt2"),
    Case("resnet50", "float16", 32),
    Case("gpt2", "float16", 8),
    Case("bert", "bfloat16"),
    Case("resnet50", "bfloat16"),
    *(
        Case(name, timed=False)
        for name in (
            "mobilenet_v2",
            "convnext",
            "vit",
            "llama",
            "resnet-tiny",
            "mobilenet_v2-tiny",
            "vit-tiny",
            "bert-tiny",
            "gpt2-tiny",
            "llama-tiny",
        )
    ),
]
QUICK = [Case("resnet-tiny"), Case("gpt2-tiny"), Case("bert-tiny", "float16", 2)]


def model_and_inputs(case: Case) -> tuple[torch.nn.Module, tuple]:
    """The case's model (seeded weights, the same on every machine) and inputs, at its dtype and batch."""
    from fxopt.zoo import ZOO

    zoo = ZOO[case.model]
    dtype = getattr(torch, case.dtype)
    model = zoo.build().to(dtype)
    inputs = tuple(x.expand(case.batch, *x.shape[1:]).contiguous() for x in zoo.example_inputs())
    return model, tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


def optimized_program(case: Case):
    """The case's graph after the CUDA target's default pipeline, optimized in PyTorch alone (no TVM needed)."""
    import fxopt

    model, inputs = model_and_inputs(case)
    result = fxopt.optimize(model, inputs, target="torch", pipeline=fxopt.parse_target("cuda").default_pipeline)
    result.build(inputs, {})
    return result.program, model, inputs


# --- package (where TVM is installed) ---------------------------------------------------------------------


def package(carry: Path, cases: list[Case], python: str, dry_run: bool) -> int:
    import tvm
    import tvm_ffi

    from fxopt.codegen.export import export_program
    from fxopt.targets import parse_target

    carry.mkdir(parents=True, exist_ok=True)
    same_python = python == platform.python_version().rpartition(".")[0]
    without = ("libtvm_compiler.so", "__pycache__")
    with tarfile.open(carry / "tvm-runtime.tar.xz", "w:xz") as tar:
        tar.add(Path(tvm.__file__).parent, "tvm", filter=lambda info: None if info.name.endswith(without) else info)
        if same_python:  # tvm-ffi's compiled extension as installed here fits
            tar.add(Path(tvm_ffi.__file__).parent, "tvm_ffi", filter=lambda i: None if "__pycache__" in i.name else i)
    wheels = carry / "wheels"
    shutil.rmtree(wheels, ignore_errors=True)
    wheels.mkdir()
    if not same_python:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--only-binary=:all:",
                "--python-version",
                python,
                "--implementation",
                "cp",
                "--platform",
                "manylinux_2_28_x86_64",
                "--platform",
                "manylinux_2_17_x86_64",
                "--platform",
                "manylinux2014_x86_64",
                "-d",
                str(wheels),
                f"apache-tvm-ffi=={_installed_version('apache-tvm-ffi')}",
            ],
            check=True,
        )
    exports = carry / "exports"
    shutil.rmtree(exports, ignore_errors=True)
    targets = [GPU_ARCH] + (["cpu"] if dry_run else [])
    packaged = []
    for case in cases:
        start = time.perf_counter()
        entry = {"case": asdict(case), "exports": {}}
        try:
            program, _, _ = optimized_program(case)
            for target in targets:
                path = exports / case.name / target.replace(":", "_")
                export_program(program, parse_target(target), path, weights=False)
                entry["exports"][target] = str(path.relative_to(carry))
        except Exception as exc:  # one case that does not build is a result, not the end of packaging
            entry["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0]
        entry["seconds"] = round(time.perf_counter() - start, 1)
        packaged.append(entry)
        print(f"{case.name}: {entry.get('error', 'exported')} ({entry['seconds']} s)", flush=True)
    (carry / "cases.json").write_text(json.dumps(packaged, indent=1))
    size = sum(f.stat().st_size for f in carry.rglob("*") if f.is_file())
    print(f"wrote {carry} ({size / 2**20:.1f} MiB; the device carries at most 64 MiB with the working tree)")
    return 0


def _installed_version(distribution: str) -> str:
    from importlib.metadata import version

    return version(distribution)


# --- run (on the GPU machine) ------------------------------------------------------------------------------


def run(carry: Path, out: Path, budget: float, dry_run: bool, rounds: int) -> int:
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "dry_run": dry_run,
        "machine": _machine(),
        "gpu_tests": None,
        "cases": [],
    }
    device = "cpu" if dry_run else "cuda"
    if not dry_run and not torch.cuda.is_available():
        results["error"] = "no CUDA device is visible"
    else:
        try:
            results["gpu_tests"] = _gpu_tests(out, dry_run)
        except Exception as exc:  # TVM does not import: every check below says so too, case by case
            results["gpu_tests"] = f"not run: {type(exc).__name__}: {exc}"
        entries = json.loads((carry / "cases.json").read_text())
        for entry in entries:  # correctness first: it is cheap, and every export should run
            entry.update(_check(carry, entry, device, "cpu" if dry_run else GPU_ARCH))
            print(f"{entry['case']['model']}: {entry.get('check', entry.get('error'))}", flush=True)
        for entry in entries:
            if entry["case"]["timed"] and "loaded" in entry:
                if time.perf_counter() - started > budget:
                    entry["timing"] = "skipped: the time budget was spent"
                    continue
                try:  # one failing case is a result: the GPU slot goes on to the next
                    entry["timing"] = _time(entry, device, rounds)
                except Exception as exc:
                    entry["timing"] = f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        results["cases"] = [{k: v for k, v in e.items() if k not in ("loaded", "model", "inputs")} for e in entries]
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(markdown(results))
    print(markdown(results))
    return 0


def _machine() -> dict:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        smi = shutil.which("nvidia-smi")
        if smi:
            query = subprocess.run(
                [smi, "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                capture_output=True,
                text=True,
            )
            info["driver"] = query.stdout.strip()
    try:
        import tvm

        import fxopt

        info["fxopt"] = fxopt.__version__
        info["tvm"] = f"{tvm.__version__} ({'runtime only' if tvm.base._RUNTIME_ONLY else 'with compiler'})"
    except Exception as exc:
        info["import_error"] = f"{type(exc).__name__}: {exc}"
    return info


def _gpu_tests(out: Path, dry_run: bool) -> str:
    import tvm

    if tvm.base._RUNTIME_ONLY:
        return "not run: TVM's compiler is not carried (runtime only); the exports below run the same kernels"
    if dry_run:
        return "not run: dry run"
    log = out / "pytest_gpu.log"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "gpu", str(ROOT / "tests")],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    log.write_text(done.stdout + done.stderr)
    return (done.stdout.strip().splitlines() or ["no output"])[-1]


def _check(carry: Path, entry: dict, device: str, target: str) -> dict:
    """Load the case's export with weights rebuilt here and compare it with eager PyTorch on ``device``."""
    import fxopt
    from fxopt.ir.numerics import Tolerance, compare_outputs

    if target not in entry.get("exports", {}):
        return {"check": f"not exported: {entry.get('error', 'no export for ' + target)}"}
    case = Case(**entry["case"])
    try:
        program, model, inputs = optimized_program(case)
        loaded = fxopt.load(carry / entry["exports"][target], device=device, weights=fxopt.program_weights(program))
        model, inputs = model.to(device), tuple(x.to(device) for x in inputs)
        with torch.no_grad():
            reference = pytree.tree_leaves(model(*inputs))
            outputs = pytree.tree_leaves(loaded(*inputs))
        worst, _, failing = compare_outputs([o.cpu() for o in outputs], [r.cpu() for r in reference], Tolerance())
        verdict = "matches" if failing is None else f"DIFFERS at output {failing}"
        return {
            "check": f"{verdict} eager PyTorch (max abs error {worst:.3g})",
            "loaded": loaded,
            "model": model,
            "inputs": inputs,
        }
    except Exception as exc:
        return {
            "check": f"FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            "traceback": traceback.format_exc(limit=3),
        }


def _time(entry: dict, device: str, rounds: int) -> dict:
    """Milliseconds per call of each runner: ``rounds`` rounds, each timing a warm block of every runner in turn."""
    from fxopt.codegen.dispatch import device_sync
    from fxopt.timing import time_call

    model, inputs = entry["model"], entry["inputs"]
    runners = {"eager": model, "fxopt": entry["loaded"]}
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(*inputs)  # compiling is not what is timed
        runners["torch.compile"] = compiled
    except Exception as exc:
        entry["torch.compile"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    samples: dict[str, list[float]] = {name: [] for name in runners}
    sync = device_sync(device)
    with torch.no_grad():
        for _ in range(rounds):
            for name, runner in runners.items():
                samples[name].append(time_call(runner, inputs, sync=sync, budget=0.3))
    return {name: round(statistics.median(times) * 1e3, 3) for name, times in samples.items()}


def markdown(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"GPU check {results['date']}{' (dry run)' if results['dry_run'] else ''}: "
        + ", ".join(f"{k} {v}" for k, v in machine.items()),
        "",
    ]
    if "error" in results:
        return "\n".join(lines + [f"not run: {results['error']}"]) + "\n"
    lines += [
        f"pytest -m gpu: {results['gpu_tests']}",
        "",
        "| case | check against eager PyTorch | eager ms | torch.compile | fxopt |",
        "|---|---|---|---|---|",
    ]
    for entry in results["cases"]:
        timing = entry.get("timing")
        cells = ["", "", ""]
        if isinstance(timing, dict):
            eager = timing["eager"]
            cells = [f"{eager:.3f}"] + [
                f"{timing[k] / eager:.2f}x" if k in timing else "-" for k in ("torch.compile", "fxopt")
            ]
        elif timing:
            cells = [timing, "", ""]
        lines.append(
            f"| {Case(**entry['case']).name} | {entry.get('check', entry.get('error', ''))} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines + ["", f"{results['seconds']} s in all; ratios are latency relative to eager"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("package", help="build .carry/ here, where TVM is installed")
    pack.add_argument("--python", default="3.12", help="the GPU machine's Python, for the tvm-ffi wheel")
    pack.add_argument("--quick", action="store_true", help="three tiny cases only")
    pack.add_argument("--only", nargs="+", metavar="CASE", help="these cases (names like gpt2-tiny-float32-b1)")
    pack.add_argument("--dry-run", action="store_true", help="also export each case for this CPU")
    check = commands.add_parser("run", help="on the GPU machine, after gpu_check.sh installed .carry/")
    check.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    check.add_argument("--budget", type=float, default=420, help="seconds after which no further case is timed")
    check.add_argument("--rounds", type=int, default=5)
    check.add_argument("--dry-run", action="store_true", help="no GPU: the CPU exports of package --dry-run")
    for command in (pack, check):
        command.add_argument("--carry", type=Path, default=ROOT / ".carry", help="the folder carried (default .carry)")
    args = parser.parse_args(argv)
    if args.command == "package":
        cases = QUICK if args.quick else CASES
        if args.only:
            known = {c.name: c for c in CASES + QUICK}
            unknown = [name for name in args.only if name not in known]
            if unknown:
                parser.error(f"unknown case {', '.join(unknown)} (known: {', '.join(known)})")
            cases = [known[name] for name in args.only]
        return package(args.carry, cases, args.python, args.dry_run)
    return run(args.carry, args.out, args.budget, args.dry_run, args.rounds)


if __name__ == "__main__":
    sys.exit(main())
