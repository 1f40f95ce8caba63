"""The ``fxopt`` command line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from fxopt.errors import FxoptError
from fxopt.loading import load_model

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    # torch's own pytree deprecation notice, printed on every export; not the user's concern
    warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.debug:  # other libraries' log lines and TVM's native log, which fxopt otherwise keeps quiet
        logging.getLogger("fxopt").setLevel(logging.DEBUG)
        logging.getLogger("fxopt").addHandler(logging.StreamHandler())
    try:
        _check_outputs(args)
        return args.run(args)
    except FxoptError as exc:
        if args.debug:
            raise
        print(f"fxopt: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        print(f"fxopt: {exc}" if str(exc) else "fxopt: interrupted", file=sys.stderr)
        return 130


def _check_outputs(args: argparse.Namespace) -> None:
    """Files the command will write go into existing directories: checked before minutes of work, not after."""
    for option in ("output", "export", "kernel_source", "plot", "distill"):
        path = getattr(args, option, None)
        if path is not None and not path.resolve().parent.is_dir():
            flag = "-o/--output" if option == "output" else f"--{option.replace('_', '-')}"
            raise FxoptError(f"{flag} {path}: directory {path.parent} does not exist")


def _parser() -> argparse.ArgumentParser:
    from importlib.metadata import version

    parser = argparse.ArgumentParser(prog="fxopt", description="Compiler-style graph optimization of PyTorch models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    parser.add_argument("--version", action="version", version=f"fxopt {version('fxopt')}")
    sub = parser.add_subparsers(dest="command", required=True)

    opt = sub.add_parser("optimize", help="capture, optimize and build a model")
    _model_arguments(opt)
    group = opt.add_mutually_exclusive_group()
    group.add_argument("-p", "--passes", dest="spec", help="pipeline spec, e.g. 'cleanup,fold-constants'")
    group.add_argument("--pipeline", type=Path, help="TOML pipeline file")
    opt.add_argument("--verify", choices=["each", "end", "off"], default=None)
    opt.add_argument(
        "--print-ir-after",
        action="append",
        default=[],
        metavar="PASS",
        help="dump the IR after this pass ('all', 'change'); repeatable",
    )
    opt.add_argument("--dump-dir", type=Path, help="write IR dumps to files here")
    _calibration_argument(opt)
    opt.add_argument(
        "--tune",
        default=None,
        metavar="BUDGET",
        help="tune kernels first: a trial count (500) or a duration (90s, 10m)",
    )
    _tuning_arguments(opt)
    opt.add_argument("-o", "--output", type=Path, help="write the optimized graph as a torch.export archive (.pt2)")
    opt.add_argument(
        "--export",
        type=Path,
        metavar="DIR",
        help="write a deployable TVM library + manifest here (load with fxopt.load)",
    )
    opt.add_argument(
        "--kernel-source",
        type=Path,
        metavar="FILE",
        help="write the generated kernels here (CUDA C, or LLVM IR for CPU targets)",
    )
    opt.add_argument("--json", action="store_true", help="print the report as JSON")
    opt.set_defaults(run=_optimize)

    tune = sub.add_parser("tune", help="tune a model's kernels for a target into the persistent database")
    _model_arguments(tune)
    tune.add_argument("--budget", default="200", help="trials (200) or a duration (90s, 10m); default 200")
    tune.add_argument(
        "--distill",
        type=Path,
        metavar="DIR",
        help="then write the best record per kernel here, as fxopt ships them (fxopt/codegen/records/<target key>)",
    )
    _tuning_arguments(tune)
    tune.set_defaults(run=_tune)

    prune = _lossy_pass_command(
        sub,
        "prune",
        "prune channels and heads, then optimize; or --explain the groups",
        "prune-channels, e.g. 'ratio=0.5 importance=l2 round-to=8'",
        "pruned",
    )
    prune.add_argument(
        "--explain",
        action="store_true",
        help="print each channel group (its layers, size, importance) and what would be kept; nothing is built",
    )
    prune.set_defaults(run=_prune)

    quant = _lossy_pass_command(
        sub,
        "quantize",
        "quantize, then optimize; or --report each layer's sensitivity",
        "quantize, e.g. 'scheme=w4 rounding=gptq' or 'scheme=mixed max-error=0.02'",
        "quantized",
    )
    quant.add_argument(
        "--report",
        action="store_true",
        help="print each layer's output error when it alone is quantized (and scheme=mixed's choice); nothing is built",
    )
    quant.add_argument(
        "--plot", type=Path, metavar="FILE.svg", help="with --report: also draw it as a bar chart (matplotlib)"
    )
    quant.set_defaults(run=_quantize)

    passes = sub.add_parser("passes", help="list every pass with its options and docs")
    passes.add_argument("--markdown", action="store_true", help="as the README's Markdown table")
    passes.set_defaults(run=_passes)

    pipe = sub.add_parser("pipeline", help="print the canonical form of a pipeline")
    pipe.add_argument("--dump", required=True, metavar="SPEC|FILE", help="a pipeline spec or TOML file")
    pipe.set_defaults(run=_pipeline)

    models = sub.add_parser("models", help="list the built-in models")
    models.set_defaults(run=_models)
    return parser


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        help="path/to/file.py:factory, package.module:factory, or a built-in model name "
        "(`fxopt models`); default: the built-in resnet50",
    )
    parser.add_argument(
        "--example-input",
        "-i",
        action="append",
        default=[],
        metavar="SHAPE[:DTYPE[:LOW-HIGH]]",
        help="one positional input, e.g. 1x3x224x224 or 1x128:int64:0-30522 (repeat for more); "
        "built-in models bring their own",
    )
    parser.add_argument(
        "--target",
        "-t",
        default=None,
        help="cpu, cuda, cuda:sm_90, aarch64 or torch (default: the pipeline file's, else cpu)",
    )
    # SUPPRESS: unless given here, the top-level `fxopt --debug COMMAND` stands (a default would overwrite it).
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show full tracebacks")


def _lossy_pass_command(sub, command: str, help: str, options: str, written: str) -> argparse.ArgumentParser:
    """A command that runs one lossy pass with ``--options`` before the target's pipeline."""
    parser = sub.add_parser(command, help=help)
    _model_arguments(parser)
    parser.add_argument("--options", default="", metavar="'KEY=VALUE ...'", help=f"options of {options}")
    _calibration_argument(parser)
    parser.add_argument("-o", "--output", type=Path, help=f"write the {written} graph as a torch.export archive (.pt2)")
    return parser


def _calibration_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--calibration",
        type=Path,
        metavar="FILE.pt",
        help="inputs for data-driven passes: a torch.save'd list of batches, or one tensor of "
        "samples split into batches of the example input's size (default: a built-in "
        "model's own, where it has some)",
    )


def _tuning_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dispatch",
        choices=["measure", "tvm", "torch"],
        default="measure",
        help="per segment: TVM where measured faster (default), TVM wherever possible, or PyTorch",
    )
    parser.add_argument("--database", type=Path, help="tuning database directory (default: per target, in the cache)")
    parser.add_argument("--rpc", metavar="HOST:PORT", help="measure on remote devices through this RPC tracker")
    parser.add_argument("--device-key", help="the key the remote devices registered with the tracker")


def _tune_options(args: argparse.Namespace, budget: str | None):
    from fxopt.codegen.tune import TuneOptions, parse_budget

    if budget is None:
        if args.rpc or args.device_key:
            raise FxoptError("--rpc and --device-key measure tuning trials: add --tune BUDGET")
        return None
    trials, seconds = parse_budget(budget)
    return TuneOptions(trials=trials, seconds=seconds, database=args.database, rpc=args.rpc, device_key=args.device_key)


# ----------------------------------------------------------------------------- commands


def _optimize(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fxopt.api import optimize
    from fxopt.zoo import DEFAULT_MODEL

    console = Console(stderr=True)
    model, inputs = load_model(args.model or DEFAULT_MODEL, args.example_input)
    pipeline = args.pipeline if args.pipeline is not None else args.spec
    with _progress_bar() as progress:
        result = optimize(
            model,
            inputs,
            target=args.target,
            pipeline=pipeline,
            verify=args.verify,
            print_ir_after=args.print_ir_after,
            dump_dir=args.dump_dir,
            progress=progress,
            tune=_tune_options(args, args.tune),
            dispatch=args.dispatch,
            calibration=_calibration(args),
        )
    report = result.report()
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report)
    if args.output:
        with console.status(f"writing {args.output}"):
            path = result.save(args.output)
        print(f"wrote {path} (load with torch.export.load)")
    if args.export:
        with console.status(f"exporting {args.export}"):
            path = result.export(args.export)
        print(f"wrote {path} (load with fxopt.load)")
    if args.kernel_source:
        args.kernel_source.write_text(result.kernel_source())
        print(f"wrote {args.kernel_source}")
    return 0


def _prune(args: argparse.Namespace) -> int:
    from fxopt.api import optimize
    from fxopt.calibration import Calibration
    from fxopt.ir.capture import capture
    from fxopt.passes import parse_pipeline
    from fxopt.prune.explain import explain
    from fxopt.targets import parse_target
    from fxopt.zoo import DEFAULT_MODEL

    model, inputs = load_model(args.model or DEFAULT_MODEL, args.example_input)
    (pruning,) = parse_pipeline(f"prune-channels{{{args.options}}}")
    if args.explain:
        print(explain(capture(model, inputs), pruning, Calibration.coerce(_calibration(args))))
        return 0
    target = parse_target(args.target or "cpu")
    result = optimize(
        model, inputs, target=target, pipeline=f"{pruning},{target.default_pipeline}", calibration=_calibration(args)
    )
    print(result.report())
    if args.output:
        print(f"wrote {result.save(args.output)} (load with torch.export.load)")
    return 0


def _quantize(args: argparse.Namespace) -> int:

    from fxopt.api import optimize
    from fxopt.calibration import Calibration
    from fxopt.ir.capture import capture
    from fxopt.passes import PassManager, parse_pipeline
    from fxopt.passes.pipeline import with_pass
    from fxopt.quant.plan import format_sensitivity, sensitivity
    from fxopt.targets import parse_target
    from fxopt.zoo import DEFAULT_MODEL

    if args.plot and not args.report:
        raise FxoptError("--plot draws the --report: give both")
    (quantize,) = parse_pipeline(f"quantize{{{args.options}}}")
    target = parse_target(args.target or "cpu")
    calibration = Calibration.coerce(_calibration(args))
    if args.report and calibration is None:
        raise FxoptError(f"--report runs {args.model or DEFAULT_MODEL} on calibration data: give --calibration FILE.pt")
    model, inputs = load_model(args.model or DEFAULT_MODEL, args.example_input)
    with _progress_bar() as progress:
        if args.report:
            # The layers as quantize meets them in the pipeline: after the target's exact rewrites before it.
            pipeline = with_pass(parse_pipeline(target.default_pipeline), quantize)
            before = pipeline[: pipeline.index(quantize)]
            program, _ = PassManager(before, verify="off").run(capture(model, inputs))
            rows, notes = sensitivity(
                program, quantize, calibration, lambda detail: progress(0, None, f"{quantize}: {detail}")
            )
        else:
            result = optimize(
                model,
                inputs,
                target=target,
                pipeline=with_pass(parse_pipeline(target.default_pipeline), quantize),
                calibration=calibration,
                progress=progress,
            )
    if not args.report:
        print(result.report())
        if args.output:
            print(f"wrote {result.save(args.output)} (load with torch.export.load)")
        return 0
    print(format_sensitivity(program.name, quantize, rows, notes, len(calibration)))
    if args.plot:
        _plot_sensitivity(args.plot, f"{program.name}: {quantize}", rows)
        print(f"wrote {args.plot}")
    return 0


def _plot_sensitivity(path: Path, title: str, rows) -> None:
    """A horizontal bar chart of each layer's sensitivity, most sensitive on top, coloured by precision (matplotlib,
    the ``plot`` extra; the format follows the file's suffix: .svg, .png, .pdf)."""
    try:
        import matplotlib
    except ImportError:
        raise FxoptError("--plot needs matplotlib: pip install 'fxopt[plot]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    precisions = list(dict.fromkeys(r.precision for r in rows))
    colours = dict(zip(precisions, plt.get_cmap("tab10").colors))
    figure, axes = plt.subplots(figsize=(8, 1 + 0.25 * max(len(rows), 1)))
    axes.barh([r.label for r in rows], [r.error for r in rows], color=[colours[r.precision] for r in rows])
    axes.invert_yaxis()  # most sensitive on top
    axes.set_xlabel("output error with this layer alone quantized")
    axes.set_title(title, fontsize=10)
    axes.legend(handles=[Patch(color=colours[p], label=p) for p in precisions], fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


@contextlib.contextmanager
def _progress_bar() -> Iterator[Callable[[int, int | None, str], None]]:
    """A progress bar on a terminal's stderr (rich; gone when done): yields ``update(index, total, step)``, the
    callback ``optimize`` calls for each pass, tuning round and measured segment."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    if not console.is_terminal:  # a log or a pipe: no bar, and no stray newline
        yield lambda index, total, step: None
        return
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    with Progress(*columns, TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("capturing", total=None)

        def update(index: int, total: int | None, step: str) -> None:
            bar.update(task, description="capturing" if step == "capture" else step, completed=index, total=total)

        yield update


def _calibration(args: argparse.Namespace):
    """``--calibration``, else the built-in model's own calibration batches, else ``None``."""
    from fxopt.zoo import DEFAULT_MODEL, ZOO

    if args.calibration is not None:
        return args.calibration
    entry = ZOO.get(args.model or DEFAULT_MODEL)
    return entry.calibration() if entry is not None and entry.calibration is not None else None


def _tune(args: argparse.Namespace) -> int:

    from fxopt.api import optimize
    from fxopt.zoo import DEFAULT_MODEL

    model, inputs = load_model(args.model or DEFAULT_MODEL, args.example_input)
    with _progress_bar() as progress:
        result = optimize(
            model,
            inputs,
            target=args.target,
            tune=_tune_options(args, args.budget),
            dispatch=args.dispatch,
            progress=progress,
        )
    report = result.report()
    if not report.tuning:
        print(f"nothing to tune: target '{result.target}' builds no TVM kernels ({report.backend_note})")
        return 0
    print(report.tuning)
    if args.distill:
        from fxopt.codegen.tuning_database import database_dir, distill_database

        kept = distill_database(database_dir(result.target, args.database), args.distill)
        print(f"distilled the best records of {kept} kernels into {args.distill}")
    return 0


def _passes(args: argparse.Namespace) -> int:
    print(passes_markdown() if args.markdown else passes_text())
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from fxopt.passes import Pipeline

    pipeline = Pipeline.coerce(args.dump)
    if args.dump.endswith(".toml"):  # a file: every table of it, not only the passes
        print(pipeline.to_toml(), end="")
    else:
        print(pipeline)
    return 0


def _models(args: argparse.Namespace) -> int:
    from fxopt.zoo import DEFAULT_MODEL, ZOO

    for name, entry in ZOO.items():
        print(f"{name:<20} {entry.description}{'  (default)' if name == DEFAULT_MODEL else ''}")
    return 0


def passes_text() -> str:
    """Every registered pass with its docstring and options, for ``fxopt passes``."""
    from fxopt.passes import BUILTIN_PIPELINES, PASSES
    from fxopt.passes.spec import format_value

    blocks = []
    for name, cls in PASSES.items():
        doc = "\n".join("    " + line.strip() for line in (cls.__doc__ or "").strip().splitlines())
        lines = [f"{name}{'' if cls.exact else '  (lossy)'}", doc]
        for o in cls.options():
            lines.append(f"    option {o.name}: {o.type_name()} = {format_value(o.default)}  {o.doc}")
        blocks.append("\n".join(lines))
    named = "\n".join(f"  {k} = {v}" for k, v in BUILTIN_PIPELINES.items())
    return "\n\n".join(blocks) + f"\n\nnamed pipelines:\n{named}"


def passes_markdown() -> str:
    """The README's table of passes, generated from the registry."""
    from fxopt.passes import PASSES
    from fxopt.passes.spec import format_value

    rows = ["| pass | exact | options | what it does |", "|---|---|---|---|"]
    for name, cls in PASSES.items():
        options = "<br>".join(f"`{o.name}={format_value(o.default)}` {o.doc}" for o in cls.options()) or "–"
        rows.append(f"| `{name}` | {'yes' if cls.exact else 'no'} | {options} | {cls.summary()} |")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- model loading

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
