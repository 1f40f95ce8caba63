"""Structured pruning side by side: fxopt ``prune-channels`` and Torch-Pruning (DepGraph) on the same models.

For each model and FLOP reduction, both prune with L1 importance (uniform per
group, whole attention heads); the table gives whether each pruned at all,
the FLOPs and parameters reached (counted by one counter, fxopt's, on both
results), the output's relative L2 error against the unpruned model, and the
eager PyTorch latency of the pruned model (medians over rounds of warm blocks).
Torch-Pruning prunes by channel ratio; it is stepped up until it meets the
FLOP target.

    python benchmarks/pruning.py                                  # ResNet-50, MobileNetV2, ViT, BERT, LLaMA-GQA
    python benchmarks/pruning.py resnet-tiny llama-tiny --rounds 3 # a quick smoke run
    python benchmarks/pruning.py --minilm                          # MiniLM embeddings: cosine vs ratio, both tools

Install the peers with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import signal
import sys
import time
import warnings
from collections.abc import Callable

import torch
from run import measure  # benchmarks/run.py, beside this script (sys.path[0])

from fxopt import PassManager, capture
from fxopt.ir import count_flops, count_parameters
from fxopt.ir.numerics import relative_rms_error
from fxopt.zoo import SENTENCES, ZOO, calibration_batches, load_zoo_model, minilm_encoder

DEFAULT_MODELS = ["resnet50", "mobilenet_v2", "vit", "bert-classifier", "llama"]


class Primary(torch.nn.Module):
    """The model with its main output only (logits), so both pruners see a plain tensor-valued module."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        out = self.model(*args)
        return out.logits if hasattr(out, "logits") else out[0]


def load(name: str) -> tuple[torch.nn.Module, tuple]:
    if name == "bert-classifier":  # BERT-base with a classification head: logits out, the hidden stream prunable
        import transformers

        torch.manual_seed(0)
        model = transformers.BertForSequenceClassification(transformers.BertConfig(num_labels=2)).eval()
        return Primary(model), (torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(0)),)
    model, inputs = load_zoo_model(name)
    return Primary(model), inputs


def fxopt_prune(model: torch.nn.Module, inputs: tuple, ratio: float) -> tuple[Callable[[], object], torch.nn.Module]:
    program = capture(model, inputs)
    pruned, _ = PassManager(f"prune-channels{{ratio={ratio} importance=l1}}", verify="off").run(program)
    return (lambda: pruned.run_flat()[0]), pruned


def attention_heads(model: torch.nn.Module) -> dict[torch.nn.Module, int]:
    """Torch-Pruning's ``num_heads``: each Q/K/V projection and its head count (GQA: K/V have fewer)."""
    heads = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        names = {
            "q_proj": "num_attention_heads",
            "k_proj": "num_key_value_heads",
            "v_proj": "num_key_value_heads",
            "query": "num_attention_heads",
            "key": "num_attention_heads",
            "value": "num_attention_heads",
        }
        for attr, field in names.items():
            layer = getattr(module, attr, None)
            if isinstance(layer, torch.nn.Linear) and config is not None:
                heads[layer] = getattr(config, field, None) or config.num_attention_heads
    return heads


def torch_pruning_prune(
    model: torch.nn.Module, inputs: tuple, ratio: float
) -> tuple[Callable[[], object], torch.nn.Module]:
    """Torch-Pruning's MetaPruner with L1 group importance, the channel ratio bisected to the FLOP target."""
    import torch_pruning as tp

    example = inputs[0] if len(inputs) == 1 else inputs
    full, _ = tp.utils.count_ops_and_params(model, example)  # its own counter: fast enough to bisect with
    heads = attention_heads(model)
    outputs = [
        m
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
        and m.out_features
        in (
            getattr(getattr(model.model, "config", None), "num_labels", -1),
            getattr(getattr(model.model, "config", None), "vocab_size", -1),
        )
    ]

    def pruned_at(channel_ratio: float) -> torch.nn.Module:
        work = copy.deepcopy(model)
        mapping = dict(zip(model.modules(), work.modules()))
        pruner = tp.pruner.MetaPruner(
            work,
            example,
            importance=tp.importance.GroupMagnitudeImportance(p=1),
            pruning_ratio=channel_ratio,
            ignored_layers=[mapping[m] for m in outputs],
            num_heads={mapping[m]: h for m, h in heads.items()},
            prune_num_heads=bool(heads),
            prune_head_dims=False,
            head_pruning_ratio=channel_ratio,
        )
        pruner.step()
        _sync_head_counts(work, pruner)
        return work

    best = _bisect(pruned_at, lambda m: tp.utils.count_ops_and_params(m, example)[0] <= (1 - ratio) * full, ratio)
    return (lambda: best(*inputs)), best


def _bisect(pruned_at: Callable[[float], torch.nn.Module], meets: Callable[[torch.nn.Module], bool], ratio: float):
    """The model Torch-Pruning gives at the smallest channel ratio (bisected, 7 steps) whose FLOPs meet the target."""
    low, high, best = 0.0, 0.95, None
    for _ in range(7):
        middle = (low + high) / 2
        candidate = pruned_at(middle)
        if meets(candidate):
            best, high = candidate, middle
        else:
            low = middle
    if best is None:
        raise RuntimeError(f"no channel ratio up to {high:.2f} reaches {ratio:.0%} fewer FLOPs")
    return best


def _sync_head_counts(model: torch.nn.Module, pruner) -> None:
    """transformers' attention modules keep their head counts as attributes: set them to what was kept."""
    for module in model.modules():
        for attr in ("q_proj", "query"):
            layer = getattr(module, attr, None)
            if layer in pruner.num_heads:
                for name in ("num_heads", "num_attention_heads"):
                    if hasattr(module, name):
                        setattr(module, name, pruner.num_heads[layer])
                if hasattr(module, "all_head_size"):
                    module.all_head_size = layer.out_features
        for attr in ("k_proj",):
            layer = getattr(module, attr, None)
            if layer in pruner.num_heads and hasattr(module, "num_key_value_groups"):
                module.num_key_value_groups = pruner.num_heads[module.q_proj] // pruner.num_heads[layer]


class TimeLimit(BaseException):  # not an Exception: library code catching those must not swallow it
    pass


@contextlib.contextmanager
def time_limit(seconds: int):
    """Interrupt a pruner that runs too long (Torch-Pruning's dependency search can run for hours)."""

    def interrupt(signum, frame):
        raise TimeLimit(f"did not finish in {seconds} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def compare(names: list[str], ratios: list[float], rounds: int, limit: int) -> list[str]:
    rows = [
        "| model | FLOPs cut asked | tool | prunes | FLOPs | params | rel. output error | eager latency |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)  # rows follow as each model finishes
    for name in names:
        model, inputs = load(name)
        with torch.no_grad():
            reference = model(*inputs)
        program = capture(model, inputs)
        flops, params = count_flops(program), count_parameters(program)
        runners = {"original": lambda: model(*inputs)}
        results = {}
        for ratio in ratios:
            for tool, prune in (("fxopt", fxopt_prune), ("Torch-Pruning", torch_pruning_prune)):
                start = time.perf_counter()
                try:
                    with time_limit(limit):
                        run, pruned = prune(model, inputs, ratio)
                    with torch.no_grad():
                        out = run()
                    if out.shape != reference.shape:
                        raise RuntimeError(f"output shape changed to {tuple(out.shape)}")
                    small = capture(pruned, inputs) if not hasattr(pruned, "graph_module") else pruned
                    error = relative_rms_error([out], [reference])
                    results[tool, ratio] = (
                        count_flops(small),
                        count_parameters(small),
                        error,
                        time.perf_counter() - start,
                    )
                    runners[f"{tool} {ratio}"] = run
                except (Exception, TimeLimit) as exc:  # a pruner failing on a model is a result, not a crash
                    results[tool, ratio] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
        latency = measure(runners, rounds)
        rows.append(
            f"| {name} | - | original | - | {_si(flops)} | {_si(params)} | 0 | {latency['original'] * 1e3:.1f} ms |"
        )
        for (tool, ratio), result in results.items():
            if isinstance(result, str):
                rows.append(f"| {name} | {ratio:.0%} | {tool} | no: {result} | | | | |")
                continue
            f, p, error, seconds = result
            speed = latency[f"{tool} {ratio}"] / latency["original"]
            rows.append(
                f"| {name} | {ratio:.0%} | {tool} | yes ({seconds:.1f} s) | {_si(f)} (-{1 - f / flops:.0%}) "
                f"| {_si(p)} | {error:.3f} | {latency[f'{tool} {ratio}'] * 1e3:.1f} ms ({speed:.2f}x) |"
            )
        print("\n".join(rows[-1 - len(results) :]), flush=True)
    return rows


def _si(n: float) -> str:
    return next(
        f"{n / scale:.3g}{unit}"
        for scale, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k"), (1, ""))
        if n >= scale or scale == 1
    )


MINILM_FXOPT = [  # (importance, scope, reconstruct)
    ("l1", "uniform", "false"),
    ("activation", "global", "false"),
    ("fisher", "global", "false"),
    ("fisher", "global", "true"),
]


def minilm(ratios: list[float], sentences: int) -> list[str]:
    """Embedding cosine similarity of pruned MiniLM (real trained weights) against the original, fxopt and
    Torch-Pruning given the same calibration sentences and FLOP target."""
    encoder, tokens = minilm_encoder()
    calibration = calibration_batches(tokens, count=sentences)
    inputs = tokens(SENTENCES)
    with torch.no_grad():
        reference = encoder(*inputs)
    program = capture(encoder, inputs)
    full = count_flops(program)
    rows = [
        "| FLOPs cut | tool | importance | reconstruct | mean cosine | min cosine | FLOPs | pruning time |",
        "|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(rows), flush=True)

    def row(
        ratio: float, tool: str, importance: str, reconstruct: str, out: torch.Tensor, flops: float, seconds: float
    ):
        cosine = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
        rows.append(
            f"| {ratio:.0%} | {tool} | {importance} | {reconstruct} | {cosine.mean():.4f} | {cosine.min():.4f} "
            f"| -{1 - flops / full:.1%} | {seconds:.1f} s |"
        )
        print(rows[-1], flush=True)

    start = time.perf_counter()
    hessian = minilm_hessian(encoder, calibration)
    hessian_seconds = time.perf_counter() - start  # counted in Torch-Pruning's time, as fxopt's gradients are in its
    for ratio in ratios:
        for importance, scope, reconstruct in MINILM_FXOPT:
            start = time.perf_counter()
            spec = f"prune-channels{{ratio={ratio} importance={importance} scope={scope} reconstruct={reconstruct}}}"
            pruned, (record,) = PassManager(spec, verify="off", calibration=calibration).run(program)
            seconds = time.perf_counter() - start
            (out,) = pruned.run_flat(list(inputs))
            row(ratio, "fxopt", f"{importance} ({scope})", reconstruct, out, record.flops[1], seconds)
        for name, gradients in (("l1 (global)", None), ("hessian (global)", hessian)):
            start = time.perf_counter()
            pruned = torch_pruning_encoder(encoder, inputs, ratio, gradients)
            seconds = time.perf_counter() - start + (hessian_seconds if gradients else 0.0)
            with torch.no_grad():
                out = pruned(*inputs)
            row(ratio, "Torch-Pruning", name, "-", out, count_flops(capture(pruned, inputs)), seconds)
    return rows


def minilm_hessian(encoder: torch.nn.Module, calibration: list[tuple], projections: int = 4) -> dict[str, torch.Tensor]:
    """Torch-Pruning's OBD input: the mean squared per-sample gradient of every parameter, for the loss fxopt's
    ``importance=fisher`` uses without labels (``v · embedding``, ``v`` random Gaussian, a few per batch)."""
    generator = torch.Generator().manual_seed(0)
    squares = {name: torch.zeros_like(p) for name, p in encoder.named_parameters()}
    count = 0
    for batch in calibration:
        for _ in range(projections):
            out = encoder(*batch)
            losses = (torch.randn(out.shape, generator=generator) * out).sum(1)
            for loss in losses:
                encoder.zero_grad()
                loss.backward(retain_graph=True)
                for name, p in encoder.named_parameters():
                    if p.grad is not None:
                        squares[name] += p.grad.square()
                count += 1
    encoder.zero_grad()
    return {name: s / count for name, s in squares.items()}


def torch_pruning_encoder(
    encoder: torch.nn.Module, inputs: tuple, ratio: float, hessian: dict[str, torch.Tensor] | None
) -> torch.nn.Module:
    """Torch-Pruning's global MetaPruner on the sentence encoder (heads and MLP neurons; the hidden size, which
    is the embedding's, kept), L1 magnitude or Hessian (OBD) importance, the ratio bisected to the FLOP target."""
    import torch_pruning as tp

    full, _ = tp.utils.count_ops_and_params(encoder, inputs)
    heads = attention_heads(encoder)
    stream = [m for name, m in encoder.named_modules() if name.endswith("output.dense") or name.endswith("embeddings")]

    def pruned_at(channel_ratio: float) -> torch.nn.Module:
        work = copy.deepcopy(encoder)
        mapping = dict(zip(encoder.modules(), work.modules()))
        if hessian is None:
            importance = tp.importance.GroupMagnitudeImportance(p=1)
        else:
            importance = tp.importance.GroupHessianImportance()  # reads each weight's .grad as its Hessian diagonal
            for name, p in work.named_parameters():
                p.grad = hessian[name].clone()
        pruner = tp.pruner.MetaPruner(
            work,
            inputs,
            importance=importance,
            global_pruning=True,
            pruning_ratio=channel_ratio,
            ignored_layers=[mapping[m] for m in stream],
            num_heads={mapping[m]: h for m, h in heads.items()},
            prune_num_heads=True,
            prune_head_dims=False,
            head_pruning_ratio=channel_ratio,
        )
        pruner.step()
        _sync_head_counts(work, pruner)
        work.zero_grad(set_to_none=True)
        return work

    return _bisect(pruned_at, lambda m: tp.utils.count_ops_and_params(m, inputs)[0] <= (1 - ratio) * full, ratio)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "models", nargs="*", help=f"zoo models or bert-classifier (default: {' '.join(DEFAULT_MODELS)})"
    )
    parser.add_argument("--ratios", default="0.3,0.5", help="FLOP reductions to ask for (default 0.3,0.5)")
    parser.add_argument("--rounds", type=int, default=10, help="latency rounds (default 10)")
    parser.add_argument("--limit", type=int, default=600, help="seconds each pruning run may take (default 600)")
    parser.add_argument("--minilm", action="store_true", help="the MiniLM cosine table instead")
    parser.add_argument(
        "--sentences", type=int, default=192, help="MiniLM: calibration sentences (of fxopt.zoo's 192; default all)"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    ratios = [float(r) for r in args.ratios.split(",")]
    torch.set_num_threads(torch.get_num_threads())
    if args.minilm:
        minilm(ratios, args.sentences)
        return 0
    unknown = [m for m in args.models if m not in ZOO and m != "bert-classifier"]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}")
    compare(args.models or DEFAULT_MODELS, ratios, args.rounds, args.limit)
    return 0


if __name__ == "__main__":
    sys.exit(main())
