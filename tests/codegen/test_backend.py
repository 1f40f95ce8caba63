"""The TVM backend end to end: real model classes, measured dispatch, kernel source, export/load, CUDA and cross builds.

Bound: fxopt's default Tolerance (1e-5 + 1e-4 * max|reference|, float32), checked by optimize(verify="end")
and again here against the original model.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.utils._pytree as pytree

import fxopt
from fxopt import CodegenError, InputMismatchError
from fxopt.codegen.isa import Isa
from fxopt.ir.numerics import Tolerance, compare_outputs
from fxopt.targets import parse_target
from fxopt.zoo import load_zoo_model


def assert_close(got, expected):
    worst, _, failing = compare_outputs(pytree.tree_leaves(got), pytree.tree_leaves(expected), Tolerance())
    assert failing is None, f"max abs error {worst}"


def reference(model, args):
    with torch.no_grad():
        return model.eval()(*args)


@pytest.mark.parametrize(
    "name", ["resnet-tiny", "mobilenet_v2-tiny", "bert-tiny", "gpt2-tiny", "vit-tiny", "llama-tiny"]
)
def test_zoo_models_run_in_tvm_and_match_pytorch(name):
    model, args = load_zoo_model(name)
    optimized = fxopt.optimize(model, args, target="cpu", dispatch="tvm")
    report = optimized.report()
    assert report.backend == "tvm", report.backend_note  # every op lowers
    assert report.segments and all(s.backend == "tvm" for s in report.segments)
    assert_close(optimized(*args), reference(model, args))


def test_measured_dispatch_reports_both_timings_and_never_picks_the_slower():
    model, args = load_zoo_model("resnet-tiny")
    optimized = fxopt.optimize(model, args, target="cpu")
    report = optimized.report()
    for segment in report.segments:
        assert segment.torch_ms > 0 and segment.tvm_ms > 0
        if segment.backend == "tvm" and segment.tvm_ms >= segment.torch_ms:
            # Slower alone, in TVM only as part of one VM call with its neighbours that measured faster as a whole.
            assert "with its neighbours" in segment.reason, segment
    if report.backend != "torch":
        eager, built = report.latency
        assert built < eager  # the whole model, as built, against all of it in PyTorch
    text = str(report)
    assert "segments (measured on the example inputs)" in text and "torch ms" in text
    assert_close(optimized(*args), reference(model, args))


def test_dispatch_torch_keeps_everything_in_pytorch():
    model, args = load_zoo_model("bert-tiny")
    report = fxopt.optimize(model, args, target="cpu", dispatch="torch").report()
    assert report.backend == "torch" and {s.backend for s in report.segments} == {"torch"}


def test_kernel_source_for_cpu():
    model, args = load_zoo_model("resnet-tiny")
    optimized = fxopt.optimize(model, args, target="cpu", dispatch="tvm")
    assert "define" in optimized.kernel_source()  # LLVM IR functions
    assert "vfmadd" in optimized.kernel_source("asm") or "vmul" in optimized.kernel_source("asm")
    with pytest.raises(CodegenError, match="format 'ptx'"):
        optimized.kernel_source("ptx")


def test_export_and_load_roundtrip(tmp_path):
    model, args = load_zoo_model("gpt2-tiny")
    optimized = fxopt.optimize(model, args, target="cpu")
    path = optimized.export(tmp_path / "gpt2")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["target"] == "cpu" and (path / manifest["library"]).exists()
    assert manifest["inputs"][0]["dtype"] == "int64"
    loaded = fxopt.load(path)
    out = loaded(*args)
    assert type(out).__name__ == "CausalLMOutputWithCrossAttentions"  # the model's own output structure
    assert_close(out, reference(model, args))
    with pytest.raises(InputMismatchError, match="must be int64"):
        loaded(args[0].float())


def test_an_export_without_weights_takes_them_at_load_and_runs_on_the_tvm_runtime_alone(tmp_path):
    model, args = load_zoo_model("resnet-tiny")
    optimized = fxopt.optimize(model, args, target="cpu")
    path = optimized.export(tmp_path / "kernels", weights=False)
    weights = fxopt.program_weights(optimized.program)
    assert [w["name"] for w in json.loads((path / "manifest.json").read_text())["weights"]] == list(weights)
    assert_close(fxopt.load(path, weights=weights)(*args), reference(model, args))
    with pytest.raises(CodegenError, match="written without its weights"):
        fxopt.load(path)
    name, first = next(iter(weights.items()))
    with pytest.raises(CodegenError, match=f"weight '{name}' must be"):
        fxopt.load(path, weights={**weights, name: first[:1]})
    doubled = fxopt.load(path, weights={**weights, name: first * 2})(*args)  # the weights given are the ones used
    assert not torch.allclose(pytree.tree_leaves(doubled)[0], pytree.tree_leaves(reference(model, args))[0])

    # Where the GPU check runs: TVM's runtime library only, no compiler (benchmarks/gpu_check.py).
    torch.save({"weights": weights, "args": args}, tmp_path / "inputs.pt")
    script = (
        "import torch, tvm, fxopt; assert tvm.base._RUNTIME_ONLY; "
        f"saved = torch.load({str(tmp_path / 'inputs.pt')!r}); "
        f"out = fxopt.load({str(path)!r}, weights=saved['weights'])(*saved['args']); "
        f"torch.save(out.logits, {str(tmp_path / 'out.pt')!r})"
    )
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "TVM_USE_RUNTIME_LIB": "1"})
    assert_close(torch.load(tmp_path / "out.pt"), reference(model, args).logits)


def test_an_export_without_weights_merges_grouped_convolutions_weights_at_load(tmp_path):
    # RegNet's groups of 4 channels, fewer than a block: the load's weight transform builds the block diagonal.
    model, args = load_zoo_model("regnet-tiny")
    optimized = fxopt.optimize(model, args, target="cpu")
    path = optimized.export(tmp_path / "regnet", weights=False)
    assert_close(fxopt.load(path, weights=fxopt.program_weights(optimized.program))(*args), reference(model, args))


def test_export_refuses_ops_without_lowering(tmp_path):
    class Erfinv(torch.nn.Module):
        def forward(self, x):
            return torch.special.erfinv(x * 0.5)

    optimized = fxopt.optimize(Erfinv(), (torch.randn(3),), target="cpu")
    with pytest.raises(CodegenError, match="no lowering for 'erfinv.default'"):
        optimized.export(tmp_path / "x")


def test_load_names_a_missing_manifest(tmp_path):
    with pytest.raises(CodegenError, match="not an fxopt export"):
        fxopt.load(tmp_path)


@pytest.mark.parametrize(
    "name", ["resnet-tiny", "mobilenet_v2-tiny", "vit-tiny", "bert-tiny", "gpt2-tiny", "llama-tiny"]
)
def test_cuda_kernels_are_generated_without_a_gpu(name):
    model, args = load_zoo_model(name)
    optimized = fxopt.optimize(model, args, target="cuda:sm_90")
    source = optimized.kernel_source()
    assert "__global__" in source and "threadIdx" in source
    if not torch.cuda.is_available():
        assert "cannot run them" in optimized.report().backend_note
    assert_close(optimized(*args), reference(model, args))


def test_aarch64_cross_build_exports_object_files(tmp_path):
    model, args = load_zoo_model("resnet-tiny")
    optimized = fxopt.optimize(model, args, target="aarch64")
    assert "aarch64" in optimized.kernel_source()  # the target triple in the LLVM IR
    path = optimized.export(tmp_path / "arm")
    assert (path / "model.tar").exists()
    with pytest.raises(CodegenError, match="link and run them on that device"):
        fxopt.load(path)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["resnet-tiny", "gpt2-tiny"])
def test_cuda_target_runs_on_the_gpu(name, tmp_path):
    model, args = load_zoo_model(name)
    optimized = fxopt.optimize(model, args, target="cuda", dispatch="tvm")
    assert optimized.report().backend == "tvm"
    out = optimized(*args)
    assert pytree.tree_leaves(out)[0].device.type == "cuda"
    assert_close(pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, out), reference(model, args))
    loaded = fxopt.load(optimized.export(tmp_path / name))
    assert_close(
        pytree.tree_map(lambda t: t.cpu() if isinstance(t, torch.Tensor) else t, loaded(*args)), reference(model, args)
    )


def test_a_tvm_segment_hands_on_pytorch_strides(monkeypatch):
    # Attention in PyTorch, the rest in TVM: GPT-2's Q/K/V leave their segment as permuted views, PyTorch's
    # attention lays its output out after its inputs' strides, and the view after it relies on that layout.
    # A TVM segment's contiguous outputs broke it (a CI failure whenever measured dispatch chose this split).
    import fxopt.codegen

    real_choose = fxopt.codegen.choose

    def attention_in_pytorch(torch_fn, tvm_fn, args, tolerance, *, device, measure_speed=True, timed=None):
        choice, _ = real_choose(torch_fn, tvm_fn, args, tolerance, device=device, measure_speed=False)
        if any(n.target is torch.ops.aten.scaled_dot_product_attention.default for n in torch_fn.graph.nodes):
            choice.backend = "torch"
        return choice, None

    monkeypatch.setattr(fxopt.codegen, "choose", attention_in_pytorch)
    model, args = load_zoo_model("gpt2-tiny")
    optimized = fxopt.optimize(model, args, target="cpu", dispatch="tvm")
    assert 0 < sum(s.backend == "tvm" for s in optimized.report().segments) < len(optimized.report().segments)
    assert_close(optimized(*args), reference(model, args))


def test_cpu_kernels_run_on_every_core_the_process_may_use():
    # TVM's own default is half the hardware threads; a fresh process shows what fxopt sets up.
    import os
    import subprocess
    import sys

    script = (
        "import torch, tvm, fxopt\n"
        "fxopt.optimize(torch.nn.Linear(8, 8), (torch.randn(2, 8),), target='cpu', pipeline=[])\n"
        "print(tvm.get_global_func('runtime.NumThreads')())"
    )
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    threads = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert int(threads.stdout.split()[-1]) == fxopt.targets.host_cpu().cores


class _Broadcast(torch.nn.Module):
    def forward(self, x):
        return torch.relu(x).expand(2, 8, 16), x.unsqueeze(1).expand(2, 3, 8, 16).transpose(1, 2)


@pytest.mark.parametrize("dispatch", ["tvm", "measure"])
def test_broadcast_outputs_keep_pytorch_values_and_layout(dispatch):
    # expand() gives an output stride 0: laying the TVM result out with those strides overlapped and raised.
    x = torch.randn(2, 1, 16)
    optimized = fxopt.optimize(_Broadcast(), (x,), target="cpu", dispatch=dispatch)
    got, expected = optimized(x), _Broadcast()(x)
    assert_close(got, expected)
    if dispatch == "tvm":
        assert {s.backend for s in optimized.report().segments} == {"tvm"}
        assert [g.stride() for g in got] == [e.stride() for e in expected]


def test_a_segment_whose_check_raises_runs_in_pytorch(monkeypatch):
    from fxopt.codegen.runtime import TVMFunction

    def broken(self, *args):
        raise RuntimeError("kernel exploded\nsecond line")

    monkeypatch.setattr(TVMFunction, "forward", broken)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
    x = torch.randn(2, 8)
    optimized = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    (segment,) = optimized.report().segments
    assert segment.backend == "torch"
    assert segment.reason == "checking TVM's kernel failed: RuntimeError: kernel exploded"
    assert_close(optimized(x), reference(model, (x,)))


def _scripted_time_call(monkeypatch, seconds):
    """Make the dispatcher's timer return ``seconds`` in turn (torch, tvm, torch, tvm, ...)."""
    import fxopt.codegen.dispatch as dispatch

    script = iter(seconds)
    monkeypatch.setattr(dispatch, "time_call", lambda fn, args, **kwargs: next(script))


@pytest.mark.parametrize(
    "seconds, faster",
    [
        ([1.0, 0.5, 1.0, 0.5, 1.0, 0.5], True),
        # One round lost: timed again, and the second timing decides.
        ([1.0, 0.5, 1.0, 1.2, 1.0, 0.5] + [1.0, 0.5, 1.0, 1.2, 1.0, 0.5], False),
        ([1.0, 0.5, 1.0, 1.2, 1.0, 0.5] + [1.0, 0.5, 1.0, 0.5, 1.0, 0.5], True),
        ([1.0, 0.95, 1.0, 0.95, 1.0, 0.95], False),  # within the margin
        ([1.0, 4.0], False),  # far slower in the first round: not timed again
        # Best blocks compared: PyTorch's rounds that lost scheduler ticks do not make TVM's 0.95 a win.
        ([1.0, 0.95, 5.0, 0.95, 9.0, 0.95], False),
    ],
)
def test_tvm_is_chosen_only_when_it_wins_every_round_by_the_margin(monkeypatch, seconds, faster):
    from fxopt.codegen.dispatch import measure

    _scripted_time_call(monkeypatch, seconds)
    assert measure(lambda: None, lambda: None, ()).second_is_faster is faster
    assert next(iter(seconds[len(seconds) :]), None) is None


def test_a_block_of_calls_is_timed_by_the_calls_no_scheduler_tick_delayed(monkeypatch):
    # On a busy core most calls of a block can wait for the next 4 ms tick: the block's time is the calls' work.
    import fxopt.timing as timing

    calls_ms = [5, 1, 5, 5, 1, 5]  # 22 ms: a budget of 20 ms ends the block after these six
    clock = iter(t / 1e3 for start in range(0, 600, 100) for t in (start, start + calls_ms[start // 100]))
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    assert timing.time_call(lambda: None, budget=0.020, warm_up=False) == pytest.approx(0.001)  # the median: 5 ms
    assert next(clock, None) is None  # all six calls timed


def test_a_runner_whose_first_call_after_another_waits_is_timed_by_its_other_calls():
    # PyTorch's OpenMP threads spin after its block; the TVM call right after can wait for scheduler ticks.
    import time

    from fxopt.codegen.dispatch import Timing, measure_runners

    waited = []

    def pytorch():
        time.sleep(0.004)
        waited.clear()

    def tvm():
        time.sleep(0.0002 if waited else 0.02)  # 5x PyTorch's call, once per block
        waited.append(True)

    samples = measure_runners([pytorch, tvm], ())
    assert [len(s) for s in samples] == [3, 3] and max(samples[1]) < 0.004
    assert Timing.of(*samples).second_is_faster


def test_other_processes_busy_while_timing_are_measured():
    import subprocess
    import sys
    import time

    from fxopt.timing import OtherLoad

    def cores_while(work) -> float:
        load = OtherLoad()
        work()
        cores = load.cores()
        assert cores is not None  # Linux: /proc/stat
        return cores

    def spin():
        end = time.perf_counter() + 0.6
        while time.perf_counter() < end:
            pass

    quiet = cores_while(lambda: time.sleep(0.6))  # whatever else this machine runs
    if quiet > (os.cpu_count() or 1) - 0.75:  # e.g. the other test workers: a child cannot add a core's load
        pytest.skip("other processes keep every core busy; .ci/run runs this test alone (-n 0)")
    assert cores_while(spin) < quiet + 0.5  # this process's own work is not another's
    busy = subprocess.Popen(
        [sys.executable, "-c", "import time\nend = time.time() + 1.6\nwhile time.time() < end: pass"]
    )
    try:
        time.sleep(0.3)  # the child's start-up
        assert cores_while(lambda: time.sleep(1.0)) > quiet + 0.5
    finally:
        busy.wait()


def test_plans_timed_together_share_rounds_and_one_far_slower_is_dropped(monkeypatch):
    # The whole model's plans (PyTorch, per segment, chained) are timed in the same rounds, one block each; only
    # the first round warms up untimed, and a plan 3x slower than the first in it is not timed again.
    import fxopt.codegen.dispatch as dispatch

    times = {"torch": [1.0, 1.0, 1.0], "segments": [0.5, 0.6, 0.5], "chained": [3.5]}
    blocks = []

    def scripted(runner, args, *, warm_up, give_up_after, **kwargs):
        blocks.append((runner, warm_up, give_up_after))
        return times[runner].pop(0)

    monkeypatch.setattr(dispatch, "time_call", scripted)
    samples = dispatch.measure_runners(["torch", "segments", "chained"], ())
    assert samples == [[1.0, 1.0, 1.0], [0.5, 0.6, 0.5], [3.5]]
    assert [(runner, warm) for runner, warm, _ in blocks] == [
        ("torch", True),
        ("segments", True),
        ("chained", True),
        *[("torch", False), ("segments", False)] * 2,
    ]
    assert all(limit == (3.0 if warm and runner != "torch" else None) for runner, warm, limit in blocks)
    assert dispatch.Timing.of(samples[0], samples[1]).second_is_faster
    assert not dispatch.Timing.of(samples[0], samples[2]).second_is_faster
    assert dispatch.Timing.of(samples[2], samples[1]) == dispatch.Timing(3.5, 0.5, 1, 1)
    assert dispatch.Timing.of(samples[0], samples[1]) == dispatch.Timing(1.0, 0.5, 3, 3)  # each one's best block


class _TwinBlocks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x):
        return torch.relu(self.b(torch.relu(self.a(x))))


def _tvm_twice_as_fast(fn, args, **kwargs):
    """A deterministic timer: whatever runs TVM kernels takes half PyTorch's time."""
    from fxopt.codegen.runtime import TVMFunction

    return 0.5e-3 if any(isinstance(m, TVMFunction) for m in fn.modules()) else 1e-3


def test_identical_segments_are_timed_once_and_decided_alike(monkeypatch):
    import fxopt.codegen.dispatch as dispatch

    timed = []
    monkeypatch.setattr(dispatch, "time_call", lambda fn, *a, **k: timed.append(fn) or _tvm_twice_as_fast(fn, *a))
    report = fxopt.optimize(_TwinBlocks(), (torch.randn(4, 16),), target="cpu", pipeline=[]).report()
    first, second = report.segments
    assert "(timed as segment_0)" in second.reason and first.backend == second.backend == "tvm"
    segment_runners = [fn for fn in timed if isinstance(fn, torch.fx.GraphModule)]
    assert len(segment_runners) == dispatch.ROUNDS  # the first segment's PyTorch side, in each round; not the twin's


def test_the_report_gives_the_whole_models_latency_before_and_after(monkeypatch):
    import fxopt.codegen.dispatch as dispatch

    monkeypatch.setattr(dispatch, "time_call", _tvm_twice_as_fast)
    report = fxopt.optimize(_TwinBlocks(), (torch.randn(4, 16),), target="cpu", pipeline=[]).report()
    assert report.latency == (1.0, 0.5) and report.backend == "tvm"
    assert "latency on the example inputs: 1.000 ms in PyTorch -> 0.500 ms as built (2.00x" in str(report)


def test_a_mix_that_is_slower_as_a_whole_runs_in_pytorch(monkeypatch):
    import fxopt.codegen.dispatch as dispatch
    from fxopt.ir.program import Program

    def whole_model_slower(fn, args, **kwargs):
        return (
            2e-3
            if isinstance(fn, Program) and fn.graph_module.graph.find_nodes(op="call_module")
            else _tvm_twice_as_fast(fn, args)
        )

    monkeypatch.setattr(dispatch, "time_call", whole_model_slower)
    model, x = _TwinBlocks(), torch.randn(4, 16)
    optimized = fxopt.optimize(model, (x,), target="cpu", pipeline=[])
    report = optimized.report()
    assert report.backend == "torch" and "the whole model measured no faster" in report.backend_note
    assert all(s.backend == "torch" and s.reason.endswith("the whole model was not faster") for s in report.segments)
    assert_close(optimized(x), reference(model, (x,)))


class _DeepMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.layers = torch.nn.ModuleList(torch.nn.Linear(32, 32) for _ in range(6))

    def forward(self, x):
        for layer in self.layers:  # a float residual stream between the segments, as in a transformer
            x = x + torch.nn.functional.gelu(layer(x))
        return x


def _tvm_outputs_scaled(monkeypatch, factor):
    """TVM segments' float outputs times ``factor``: 1 + 3e-5 is the last-bit difference of TVM's GELU or layer
    norm (within the float tolerance), 1.2 a wrong kernel."""
    from fxopt.codegen.runtime import TVMFunction

    real = TVMFunction.forward
    monkeypatch.setattr(
        TVMFunction,
        "forward",
        lambda self, *args: tuple(o * factor if o.is_floating_point() else o for o in real(self, *args)),
    )


def test_a_quantized_build_is_held_to_what_quantization_moved(monkeypatch):
    # A 12-layer BERT's w8a8 build failed its own check (0.08): last-bit differences before a quantize flip
    # activations to the neighbouring step, and the next layers carry that on.
    _tvm_outputs_scaled(monkeypatch, 1 + 3e-5)
    model, x = _DeepMLP().eval(), torch.randn(64, 32)
    optimized = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm", pipeline="quantize", calibration=[x])
    report = optimized.report()
    assert sum(s.backend == "tvm" for s in report.segments) >= 6, report.segments
    quantization_error = next(p.max_abs_error for p in report.passes if p.name == "quantize")
    assert (optimized(x) - model(x)).abs().max() <= 2 * quantization_error


def test_a_wrong_quantized_build_is_still_rejected(monkeypatch):
    import fxopt.codegen
    from fxopt import VerificationError
    from fxopt.codegen.dispatch import Choice

    _tvm_outputs_scaled(monkeypatch, 1.2)
    monkeypatch.setattr(fxopt.codegen, "choose", lambda *args, **kwargs: (Choice("tvm", None, None, "forced"), None))
    model, x = _DeepMLP().eval(), torch.randn(64, 32)
    with pytest.raises(VerificationError, match="differs from the optimized graph"):
        fxopt.optimize(model, (x,), target="cpu", dispatch="tvm", pipeline="quantize", calibration=[x])


def test_quantized_segment_outputs_may_round_one_step_apart():
    from fxopt.codegen.dispatch import rounding_allowance
    from fxopt.codegen.partition import partition
    from fxopt.ir.numerics import Tolerance, compare_outputs

    model, x = _DeepMLP().eval(), torch.randn(8, 32)
    quantized, _ = fxopt.PassManager("quantize", calibration=[x]).run(fxopt.capture(model, (x,)))
    allowances = []
    for segment in partition(quantized).segments:
        (outputs,) = segment.graph_module.graph.output_node().args
        allowance = rounding_allowance(segment.graph_module, [torch.ones(1)] * len(outputs))
        assert allowance == [float(o.target is torch.ops.fxopt.quantize.default) for o in outputs]
        allowances += allowance
    assert 1.0 in allowances
    q = torch.tensor([3, -7], dtype=torch.int8)
    assert compare_outputs([q + 1], [q], Tolerance(), allowance=[1.0])[2] is None
    assert compare_outputs([q + 2], [q], Tolerance(), allowance=[1.0])[2] == 0
    assert compare_outputs([q + 1], [q], Tolerance())[2] == 0


def test_bf16_segment_outputs_may_differ_by_one_bf16_step():
    from fxopt.codegen.dispatch import BF16_STEP, rounding_allowance
    from fxopt.codegen.partition import partition

    model, x = _DeepMLP().eval(), torch.randn(8, 32)
    program, _ = fxopt.PassManager("quantize{scheme=bf16}").run(fxopt.capture(model, (x,)))
    (segment,) = partition(program).segments
    with torch.no_grad():
        expected = segment.graph_module(x)
    (scale,) = [float(e.abs().max()) for e in expected]
    assert rounding_allowance(segment.graph_module, expected) == [BF16_STEP * scale]
    float_segment = partition(fxopt.capture(model, (x,))).segments[0].graph_module
    assert rounding_allowance(float_segment, float_segment(x)) == [0.0]


def test_int8_attention_segment_outputs_may_differ_by_one_weight_level():
    from fxopt.codegen.dispatch import ATTENTION_LEVEL_STEP, rounding_allowance
    from fxopt.codegen.partition import partition
    from tests.passes.test_quantize import SelfAttention, attention_batches

    calibration = attention_batches()
    program = fxopt.capture(SelfAttention().eval(), calibration[0])
    quantized, _ = fxopt.PassManager("quantize{scheme=w8 attention=int8}", calibration=calibration).run(program)
    attention, steps = torch.ops.fxopt.attention_q.default, []
    for segment in partition(quantized).segments:
        graph_module = segment.graph_module
        inputs = [torch.randn(p.meta["val"].shape) for p in graph_module.graph.find_nodes(op="placeholder")]
        with torch.no_grad():
            expected = graph_module(*inputs)
        step = ATTENTION_LEVEL_STEP if any(n.target is attention for n in graph_module.graph.nodes) else 0.0
        assert rounding_allowance(graph_module, expected) == [step * float(e.abs().max()) for e in expected]
        steps.append(step)
    assert ATTENTION_LEVEL_STEP in steps


class _Unlowerable(torch.nn.Module):
    """Two TVM runs around an op TVM has no lowering for (erfinv), which PyTorch runs."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.c = (torch.nn.Linear(16, 16) for _ in range(3))

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.c(torch.special.erfinv(torch.tanh(x) * 0.5))


def _segment_calls(optimized):
    from fxopt.codegen.runtime import TVMFunction

    module = optimized.executable.module.graph_module
    return [
        n.target
        for n in module.graph.nodes
        if n.op == "call_module" and isinstance(module.get_submodule(n.target), TVMFunction)
    ]


@pytest.mark.parametrize("name", ["bert-tiny", "gpt2-tiny"])
def test_consecutive_tvm_segments_run_as_one_vm_call(name, monkeypatch):
    from fxopt.codegen.runtime import TVMFunction

    model, args = load_zoo_model(name)
    optimized = fxopt.optimize(model, args, target="cpu", dispatch="tvm")
    assert _segment_calls(optimized) == ["chain_0"] and len(optimized.report().segments) > 2
    assert "as one call (1 call)" in optimized.report().backend_note
    calls = []
    real = TVMFunction.forward
    monkeypatch.setattr(TVMFunction, "forward", lambda self, *a: calls.append(self.function) or real(self, *a))
    assert_close(optimized(*args), reference(model, args))
    assert calls == ["chain_0"]


def test_an_op_pytorch_runs_ends_a_chain():
    model, x = _Unlowerable(), torch.randn(4, 16)
    optimized = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm", pipeline=[])
    assert _segment_calls(optimized) == ["chain_0", "segment_2"]  # a, b as one call; erfinv; then c
    assert_close(optimized(x), reference(model, (x,)))


@pytest.mark.parametrize("chained_faster", [True, False])
def test_measured_dispatch_chains_the_segments_only_when_the_whole_model_is_faster(monkeypatch, chained_faster):
    # Each segment alone is slower in TVM; as one call the whole model is faster, or not.
    import fxopt.codegen.dispatch as dispatch
    from fxopt.ir.program import Program

    def timer(fn, args, **kwargs):
        calls = (
            [n.target for n in fn.graph_module.graph.nodes if n.op == "call_module"] if isinstance(fn, Program) else []
        )
        if any(str(t).startswith("chain_") for t in calls):
            return 0.5e-3 if chained_faster else 1.5e-3
        return 1e-3 if not calls else 2e-3

    monkeypatch.setattr(dispatch, "time_call", timer)
    model, x = _TwinBlocks(), torch.randn(4, 16)
    optimized = fxopt.optimize(model, (x,), target="cpu", pipeline=[])
    report = optimized.report()
    if chained_faster:
        assert _segment_calls(optimized) == ["chain_0"] and report.latency == (1.0, 0.5)
        assert all(s.backend == "tvm" and "in TVM with its neighbours" in s.reason for s in report.segments)
    else:
        assert report.backend == "torch" and _segment_calls(optimized) == []
    assert_close(optimized(x), reference(model, (x,)))


def test_outputs_only_tvm_reads_are_not_laid_out_for_pytorch(monkeypatch):
    # A GEMM's result leaves its segment transposed, a view, and only the next GEMM's segment reads it: TVM takes
    # it contiguous, so laying it out for PyTorch first would be a PyTorch copy between two TVM calls. Segments
    # called one by one here.
    import fxopt.codegen

    class TransposedBetweenGemms(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.weight = torch.nn.Linear(16, 24), torch.nn.Parameter(torch.randn(8, 12))

        def forward(self, x):
            return self.first(x).transpose(0, 1) @ self.weight

    monkeypatch.setattr(fxopt.codegen, "find_chains", lambda parent, segments: [])
    model, args = TransposedBetweenGemms(), (torch.randn(8, 16),)
    optimized = fxopt.optimize(model, args, target="cpu", dispatch="tvm")
    parent = optimized.executable.module.graph_module
    read_by_tvm_only = [
        (parent.get_submodule(call.target).strides[item.args[1]], item.meta["val"])
        for call in parent.graph.find_nodes(op="call_module")
        for item in call.users
        if all(user.op == "call_module" for user in item.users)
    ]
    assert any(not value.is_contiguous() for _, value in read_by_tvm_only)  # the transposed view among them
    assert all(strides is None for strides, _ in read_by_tvm_only)
    assert_close(optimized(*args), reference(model, args))


@pytest.mark.skipif(not Isa.of(parse_target("cpu")).avx2, reason="the hand-scheduled GEMM is for AVX2 CPUs")
def test_kernels_equal_but_for_their_names_are_compiled_once():
    # Two layers of one shape: the hand GEMM of each is named after its node, the library holds one of them.
    class TwoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(32, 32), torch.nn.Linear(32, 32)

        def forward(self, x):
            return self.second(torch.relu(self.first(x))).relu()

    model, x = TwoLayers(), torch.randn(8, 32)
    optimized = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    source = optimized.kernel_source("ll").splitlines()
    functions = [line.split("@")[1].split("(")[0] for line in source if line.startswith("define")]
    gemms = [name for name in functions if "linear" in name]
    assert gemms and not [name for name in gemms if "linear_1" in name], functions
    torch.testing.assert_close(optimized(x), model(x))
