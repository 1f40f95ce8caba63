"""Pre-LN vs Pre-RMSNorm: GPT-2 small before and after ``layernorm-to-rmsnorm``, in PyTorch eager and compiled.

The same optimized graph is timed with its LayerNorms, with the RMSNorms the
conversion makes of them and with CRMSNorms and a stream one feature narrower
(``variant=crms``), all with equal outputs, at batch 1 and 8, sequence 128, then
the norm ops alone at GPT-2's width, so the speedup the Pre-RMSNorm paper
reports (1-10%) is measured here rather than assumed.

    python benchmarks/pre_rmsnorm.py --rounds 20
    python benchmarks/pre_rmsnorm.py --model gpt2-tiny --rounds 3     # a quick smoke run
"""

from __future__ import annotations

import argparse
import sys
import warnings

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from run import measure  # benchmarks/run.py, beside this script

from fxopt import optimize
from fxopt.passes import BUILTIN_PIPELINES
from fxopt.zoo import ZOO

PIPELINES = {
    "Pre-LN": BUILTIN_PIPELINES["default"],
    "Pre-RMSNorm": BUILTIN_PIPELINES["pre-rmsnorm"],
    "Pre-CRMSNorm": BUILTIN_PIPELINES["pre-rmsnorm"].replace(
        "layernorm-to-rmsnorm", "layernorm-to-rmsnorm{variant=crms}"
    ),
}


def _runners(model: torch.nn.Module, ids: torch.Tensor, compile: bool) -> dict:
    graphs = {name: optimize(model, (ids,), target="torch", pipeline=spec).program for name, spec in PIPELINES.items()}
    with torch.no_grad():
        want = pytree.tree_leaves(graphs["Pre-LN"](ids))
        for name, graph in list(graphs.items())[1:]:
            error = max(
                float((g - w).abs().max() / w.abs().max()) for g, w in zip(pytree.tree_leaves(graph(ids)), want)
            )
            print(f"  {name} outputs: max |{name} - Pre-LN| / max|Pre-LN| = {error:.1e}")
    runners = {"eager (transformers)": lambda: model(ids)}
    for name, graph in graphs.items():
        runners[f"{name} graph"] = lambda graph=graph: graph(ids)
    if compile:
        for name, graph in graphs.items():
            compiled = torch.compile(graph)
            runners[f"{name} graph, torch.compile"] = lambda compiled=compiled: compiled(ids)
    for runner in runners.values():
        with torch.no_grad():
            runner()  # warm-up and compilation
    return runners


def _norm_runners(rows: int, width: int, compile: bool) -> dict:
    x = torch.randn(rows, width)
    weight, bias = torch.rand(width) + 0.5, torch.randn(width)

    def layer_norm():
        return F.layer_norm(x, [width], weight, bias, 1e-5)

    def rms_norm_and_bias():
        return F.rms_norm(x, [width], weight, 1e-5) + bias

    runners = {"layer_norm": layer_norm, "rms_norm + bias": rms_norm_and_bias}
    if compile:
        runners |= {
            "layer_norm, compiled": torch.compile(layer_norm),
            "rms_norm + bias, compiled": torch.compile(rms_norm_and_bias),
        }
    for runner in runners.values():
        runner()
    return runners


def _table(medians: dict[str, float], baseline: str) -> None:
    print(f"  {'runner':<34} {'median ms':>10} {'/ ' + baseline:>16}")
    for name, seconds in medians.items():
        print(f"  {name:<34} {seconds * 1e3:>10.3f} {seconds / medians[baseline]:>15.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt2", choices=[n for n in ZOO if n.startswith("gpt2")])
    parser.add_argument("--batches", default="1,8", help="comma-separated batch sizes")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile runners")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of warm blocks")
    for name, spec in PIPELINES.items():
        print(f"{name}: {spec}")
    model = ZOO[args.model].build()
    width, vocab = model.config.n_embd, model.config.vocab_size
    for batch in map(int, args.batches.split(",")):
        ids = torch.randint(0, vocab, (batch, args.seq), generator=torch.Generator().manual_seed(0))
        print(f"\n{args.model}, batch {batch}, sequence {args.seq}")
        _table(measure(_runners(model, ids, args.compile), args.rounds), "Pre-LN graph")
        print(f"\nthe norm alone, {batch * args.seq} x {width}")
        _table(measure(_norm_runners(batch * args.seq, width, args.compile), args.rounds * 10), "layer_norm")
    return 0


if __name__ == "__main__":
    sys.exit(main())
