"""Post-training quantization side by side: fxopt, ONNX Runtime's quantization tool, torchao, and the bf16 paths
of OpenVINO and PyTorch.

Every tool quantizes the same float model with the same calibration batches.
Quality: MiniLM (trained weights) mean/min cosine of the sentence embeddings
against float32 on held-out sentences; BERT-base (random init, sequence 128) mean/min
cosine of its tokens' last hidden states against float32 on held-out random tokens;
ResNet-50 and MobileNetV2 (random init, 1x3x224x224) the cosine of their logits against float32 on a held-out
random image; a CNN trained on scikit-learn's digits, test accuracy. Size: bytes of the model's
constants. Speed: CPU latency (medians over rounds of warm blocks, benchmarks/run.py's
``measure``) against the float32 model in PyTorch eager.

    python benchmarks/quantization.py                                   # MiniLM and digits, every tool
    python benchmarks/quantization.py bert --tools fxopt-cpu onnxruntime openvino pytorch-bf16
    python benchmarks/quantization.py resnet50 --tools fxopt-cpu onnxruntime openvino
    python benchmarks/quantization.py resnet50 bert --tools fxopt-cpu --target cpu:avx2   # the AVX2 kernels
    python benchmarks/quantization.py digits --rounds 3 --tools fxopt onnxruntime      # a smoke run

Install the peers with ``pip install -e ".[bench]"``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from run import export_onnx, measure, openvino_request  # benchmarks/run.py, beside this script (sys.path[0])

import fxopt
from fxopt import PassManager, capture
from fxopt.passes import parse_pipeline
from fxopt.passes.pipeline import with_pass
from fxopt.zoo import SENTENCES, ZOO, calibration_batches, digits_cnn, minilm_encoder

FXOPT_SCHEMES = {
    "minilm": [
        "quantize",
        "smooth-activations,quantize",
        "quantize{scheme=w8a8-dynamic}",
        "quantize{scheme=fp8}",
        "quantize{scheme=w8}",
        "quantize{scheme=w4}",
        "awq{weights=asymmetric},quantize{scheme=w4 weights=asymmetric rounding=gptq weight-ranges=search}",
        "quantize{scheme=mixed mix=[w4,w8] max-error=0.1}",
        "quantize{scheme=mixed max-error=0.05}",
        "quantize{scheme=bf16}",
        "quantize{attention=int8}",
        "quantize{weight-bits=7}",
    ],
    "bert": [
        "quantize",
        "quantize{attention=int8}",
        "quantize{scheme=w8a8-dynamic}",
        "quantize{scheme=bf16}",
        "quantize{weight-bits=7}",
    ],
    "digits": [
        "quantize",
        "quantize{observer=percentile}",
        "quantize{scheme=fp8}",
        "quantize{scheme=w8a8-dynamic}",
        "quantize{weight-bits=7}",
    ],
    "resnet50": ["quantize", "quantize{weight-bits=7}"],
    "mobilenet_v2": ["quantize"],
}
TOOLS = ["fxopt", "fxopt-cpu", "onnxruntime", "openvino", "pytorch-bf16", "torchao"]
# The schemes whose CPU latency is measured through fxopt's TVM build (measured dispatch, and all in TVM); seven-bit
# weights are what AVX2 CPUs without VNNI multiply with vpmaddubsw.
TVM_SCHEMES = {
    "minilm": [
        "quantize",
        "quantize{attention=int8}",
        "quantize{scheme=w4}",
        "quantize{scheme=bf16}",
        "quantize{weight-bits=7}",
    ],
    "bert": ["quantize", "quantize{attention=int8}", "quantize{scheme=bf16}", "quantize{weight-bits=7}"],
    "digits": ["quantize", "quantize{scheme=w4}"],
    "resnet50": ["quantize", "quantize{weight-bits=7}"],
    "mobilenet_v2": ["quantize"],
}


@dataclass
class Case:
    """A float model, its evaluation inputs, calibration batches and a quality score of its outputs."""

    name: str
    model: torch.nn.Module
    inputs: tuple
    calibration: list[tuple]
    score: Callable[[torch.Tensor], str]  # of the model's output on ``inputs``


def load_case(name: str) -> Case:
    if name == "minilm":
        encoder, tokens = minilm_encoder()
        inputs = tokens(SENTENCES)
        with torch.no_grad():
            reference = encoder(*inputs)

        def cosine(out: torch.Tensor) -> str:
            similarity = torch.nn.functional.cosine_similarity(out, reference, dim=-1)
            return f"{similarity.mean():.4f} (min {similarity.min():.4f})"

        return Case(name, encoder, inputs, calibration_batches(tokens), cosine)
    if name == "bert":
        model = _LastHiddenState(ZOO["bert"].build())

        def tokens(seed: int) -> tuple:
            return (torch.randint(0, 30522, (1, 128), generator=torch.Generator().manual_seed(seed)),)

        inputs = tokens(1000)  # held out: calibration draws seeds 0-7
        with torch.no_grad():
            reference = model(*inputs)

        def token_cosine(out: torch.Tensor) -> str:
            similarity = torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1)
            return f"{similarity.mean():.4f} (min {similarity.min():.4f})"

        return Case(name, model, inputs, [tokens(seed) for seed in range(8)], token_cosine)
    if name in ("resnet50", "mobilenet_v2"):
        model = _Logits(ZOO[name].build())

        def images(seed: int) -> tuple:
            return (torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(seed)),)

        if name == "mobilenet_v2":  # its random init shrinks activations to 1e-22 by the logits: measure real ones
            _batch_statistics(model, torch.cat([images(seed)[0] for seed in range(100, 108)]))

        inputs = images(1000)  # held out: calibration draws seeds 0-3
        with torch.no_grad():
            reference = model(*inputs)

        def logit_cosine(out: torch.Tensor) -> str:
            return f"{torch.nn.functional.cosine_similarity(out.float(), reference, dim=-1).item():.4f} logit cosine"

        return Case(name, model, inputs, [images(seed) for seed in range(4)], logit_cosine)
    if name == "digits":
        model, (train_images, _), (test_images, test_labels) = digits_cnn()

        def accuracy(out: torch.Tensor) -> str:
            return f"{(out.argmax(1) == test_labels).float().mean():.2%} accuracy"

        # Calibration: training images, batches of the evaluation size (the model is captured for it).
        size = len(test_images)
        return Case(name, model, (test_images,), [(train_images[i : i + size],) for i in (0, size)], accuracy)
    raise SystemExit(f"unknown model {name!r}: minilm, bert, resnet50, mobilenet_v2 or digits")


def _batch_statistics(model: torch.nn.Module, images: torch.Tensor) -> None:
    """Set ``model``'s batch-norm statistics to those of ``images`` (then back to eval mode)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # a cumulative average: one batch sets the statistics
    model.train()
    with torch.no_grad():
        model(images)
    model.eval()


class _LastHiddenState(torch.nn.Module):
    """A ``transformers`` encoder returning its last hidden state: one tensor, the same for every tool."""

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids).last_hidden_state


class _Logits(torch.nn.Module):
    """A ``transformers`` image classifier returning its logits: one tensor, the same for every tool."""

    def __init__(self, classifier: torch.nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.classifier(pixels).logits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "models", nargs="*", default=["minilm", "digits"], help="minilm, bert, resnet50, mobilenet_v2, digits"
    )
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument(
        "--tools",
        nargs="*",
        default=list(TOOLS),
        choices=TOOLS,
        help="fxopt-cpu: the TVM CPU builds (minutes on MiniLM)",
    )
    parser.add_argument(
        "--target", default="cpu", help="fxopt-cpu's target: cpu:avx2 times the AVX2 kernels on a wider host"
    )
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rounds} rounds of warm blocks")
    for name in args.models:
        case = load_case(name)
        rows, runners = compare(case, args.tools, args.target)
        latency = measure(runners, args.rounds)
        eager = latency["float32 (eager)"]
        print(f"\n### {name}\n")
        print("| tool | method | quality | weights | CPU latency | vs eager float32 |")
        print("|---|---|---|---|---|---|")
        for tool, method, quality, size, runner in rows:
            timing = (
                f"{latency[runner] * 1e3:.1f} ms | {latency[runner] / eager:.2f}x" if runner in latency else "– | –"
            )
            print(f"| {tool} | {method} | {quality} | {size} | {timing} |")
    return 0


def compare(case: Case, tools: list[str], target: str = "cpu") -> tuple[list[tuple], dict[str, Callable[[], object]]]:
    """Quality rows ``(tool, method, quality, weights, runner name)`` and the runners to time (fxopt's TVM builds
    for ``target``)."""
    rows, runners = [], {}

    def add(
        tool: str, method: str, build: Callable[[], tuple[Callable[[], torch.Tensor], int]], timed: bool = True
    ) -> None:
        try:
            run, size = build()
            out = run()
        except Exception as exc:  # a tool failing on a model is a result, not a crash
            rows.append((tool, method, f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}", "–", ""))
            return
        rows.append((tool, method, case.score(out), f"{size / 1e6:.2f} MB", f"{tool} {method}" if timed else ""))
        if timed:
            runners[f"{tool} {method}"] = run

    model, inputs = case.model, case.inputs
    float_bytes = sum(t.nbytes for t in model.state_dict().values())
    add("float32", "(eager)", lambda: (lambda: model(*inputs), float_bytes))
    program = capture(model, inputs) if "fxopt" in tools else None
    for spec in FXOPT_SCHEMES[case.name] if "fxopt" in tools else ():
        # Quality through the reference kernels (PyTorch, exact integer sums): for accuracy, not timed.
        add("fxopt", spec, lambda spec=spec: _fxopt_reference(program, spec, case.calibration), timed=False)
    for spec in ["", *TVM_SCHEMES[case.name]] if "fxopt-cpu" in tools else ():
        for dispatch in ("measure", "tvm"):
            method = (spec or "default (float32)") + (", all in TVM" if dispatch == "tvm" else "")
            add(
                "fxopt cpu",
                method,
                lambda spec=spec, dispatch=dispatch: _fxopt_built(
                    model, inputs, spec, case.calibration, dispatch, target
                ),
            )
    if "onnxruntime" in tools:
        exported = functools.cache(lambda: export_onnx(model, inputs))  # once for the three; a failure is each's row
        for method in ("float32", "quantize_static QDQ", "quantize_dynamic"):
            add("onnxruntime", method, lambda method=method: _onnxruntime(exported(), inputs, case.calibration, method))
    if "openvino" in tools:
        for precision in ("f32", "bf16"):
            add("openvino", precision, lambda precision=precision: _openvino(model, inputs, precision))
    if "pytorch-bf16" in tools:
        add("pytorch", "bf16 (eager)", lambda: _pytorch_bf16(model, inputs))
    if "torchao" in tools:
        for method in ("Int8DynamicActivationInt8Weight", "Int8WeightOnly", "Int4WeightOnly"):
            add("torchao", method, lambda method=method: _torchao(model, inputs, method))
    return rows, runners


def _fxopt_reference(program, spec: str, calibration: list[tuple]):
    quantized, _ = PassManager(f"default,{spec}", verify="off", calibration=calibration).run(program)
    size = sum(t.nbytes for _, t in quantized.constants())
    return (lambda: quantized.run_flat()[0]), size


def _fxopt_built(model, inputs, spec: str, calibration: list[tuple], dispatch: str, target: str):
    # The CPU target's own pipeline (its convert-layout blocks a CNN's float convolutions), ``spec``'s passes
    # inserted as `fxopt quantize` inserts them. dispatch="measure" is what fxopt.optimize gives; "tvm" runs every
    # segment TVM can lower in TVM, to time its integer kernels against its float ones.
    pipeline = parse_pipeline("cpu")
    for added in parse_pipeline(spec) if spec else ():
        pipeline = with_pass(pipeline, added)
    optimized = fxopt.optimize(
        model, inputs, target=target, pipeline=pipeline, calibration=calibration, dispatch=dispatch
    )
    optimized(*inputs)
    size = sum(t.nbytes for _, t in optimized.program.constants())
    print(f"fxopt cpu {spec or 'float32'} (dispatch={dispatch}): {optimized.report().backend_note}", file=sys.stderr)
    return (lambda: optimized(*inputs)), size


def _onnxruntime(path: Path, inputs, calibration: list[tuple], method: str):
    """An ONNX Runtime session of the exported float model at ``path``, quantized by ``method`` unless float32."""
    import onnxruntime as ort

    if method != "float32":
        path = _ort_quantize(path, calibration, method)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)}
    size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))  # and external data
    return (lambda: torch.from_numpy(session.run(None, feed)[0])), size


def _ort_quantize(path: Path, calibration: list[tuple], method: str) -> Path:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    directory = Path(tempfile.mkdtemp())
    embedded, prepared, quantized = (directory / f"{n}.onnx" for n in ("embedded", "prepared", "quantized"))
    model = onnx.load(str(path))
    onnx.save(model, str(embedded))  # the tool cannot read the exporter's external data
    try:
        quant_pre_process(str(embedded), str(prepared))
    except TypeError:  # its symbolic shape inference fails on the exported BERT attention mask (Expand)
        quant_pre_process(str(embedded), str(prepared), skip_symbolic_shape=True)
    if method == "quantize_dynamic":
        quantize_dynamic(str(prepared), str(quantized), weight_type=QuantType.QInt8, per_channel=True)
        return quantized
    weights = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in weights]

    class Batches(CalibrationDataReader):
        def __init__(self):
            self.batches = iter(calibration)

        def get_next(self):
            batch = next(self.batches, None)
            return None if batch is None else {n: t.numpy() for n, t in zip(names, batch)}

    # fxopt w8a8's choices: asymmetric uint8 activations per tensor (min/max), symmetric int8 weights per output
    # channel, and only the layers with weights (by default the tool quantizes every op it knows, embeddings, norms
    # and attention included).
    quantize_static(
        str(prepared),
        str(quantized),
        Batches(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=WEIGHTED_OPS,
        nodes_to_exclude=_activation_matmuls(prepared),
    )
    return quantized


WEIGHTED_OPS = ["MatMul", "Gemm", "Conv"]


def _activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no constant operand (attention's): fxopt leaves them in float, so the tool does too."""
    import onnx

    graph = onnx.load(str(path)).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    return [n.name for n in graph.node if n.op_type == "MatMul" and not constants & set(n.input)]


def _openvino(model, inputs, precision: str):
    """OpenVINO's CPU plugin at ``INFERENCE_PRECISION_HINT=precision``: bf16 runs on AMX or AVX-512-BF16 and
    falls back to f32 elsewhere (the plugin's own choice, read back and reported)."""
    infer, compiled = openvino_request(model, inputs, {"INFERENCE_PRECISION_HINT": precision})
    print(f"openvino {precision}: the plugin runs {compiled.get_property('INFERENCE_PRECISION_HINT')}", file=sys.stderr)
    size = sum(t.nbytes for t in model.state_dict().values())
    return (lambda: torch.from_numpy(infer()[0].copy())), size


def _pytorch_bf16(model, inputs):
    """The model's weights and float inputs in bfloat16, run by PyTorch (oneDNN's bf16 kernels where the CPU has
    them)."""
    half = copy.deepcopy(model).to(torch.bfloat16)
    half_inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]  # token ids stay ints
    size = sum(t.nbytes for t in half.state_dict().values())
    return (lambda: half(*half_inputs).float()), size


def _torchao(model, inputs, method: str):
    from torchao.quantization import (
        Int4WeightOnlyConfig,
        Int8DynamicActivationInt8WeightConfig,
        Int8WeightOnlyConfig,
        quantize_,
    )

    config = {
        "Int8DynamicActivationInt8Weight": Int8DynamicActivationInt8WeightConfig,
        "Int8WeightOnly": Int8WeightOnlyConfig,
        "Int4WeightOnly": lambda: Int4WeightOnlyConfig(group_size=128),
    }[method]()
    quantized = copy.deepcopy(model)
    quantize_(quantized, config)
    size = sum(_storage_bytes(t) for t in quantized.state_dict().values())
    return (lambda: quantized(*inputs)), size


def _storage_bytes(tensor: torch.Tensor) -> int:
    """Bytes of a plain or torchao tensor subclass (its inner tensors)."""
    if hasattr(tensor, "__tensor_flatten__"):
        names, _ = tensor.__tensor_flatten__()
        return sum(_storage_bytes(getattr(tensor, n)) for n in names)
    return tensor.nbytes


if __name__ == "__main__":
    started = time.time()
    code = main()
    print(f"\n({time.time() - started:.0f} s)", file=sys.stderr)
    raise SystemExit(code)
