"""Tuning the kernel families (fxopt.codegen.templates): every GEMM candidate computes the GEMM, tuning times each
workload of every family once and keeps the fastest, builds use what it stored, and a file that is not ours never
fails a build."""

import contextlib
import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
import torch

import fxopt
import fxopt.codegen.tune as tune_module
from fxopt import CodegenError
from fxopt.codegen.compile import compile_kernel
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.attention_f32 import ATTENTION_F32
from fxopt.codegen.kernels.conv2d_f32 import CONV2D_F32, ConvShape
from fxopt.codegen.kernels.depthwise_f32 import DEPTHWISE_F32
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32, TILES, GemmF32Config, default_tile
from fxopt.codegen.kernels.winograd_f32 import WINOGRAD_F32
from fxopt.codegen.runtime import to_tvm
from fxopt.codegen.templates import Choice, TemplateChoices
from fxopt.codegen.tune import TuneOptions
from fxopt.codegen.tuning_database import BLOCKS_FILE, database_dir
from fxopt.targets import host_cpu, parse_target

CPU = parse_target("cpu")
HOST = Isa.of(CPU)
needs_avx2 = pytest.mark.skipif(not HOST.avx2, reason="the float32 GEMM template is for x86 CPUs with AVX2")


@pytest.mark.parametrize(
    "lanes, flag, llvm, registers",
    [
        (4, "neon", {"mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, r"fmla\s+v\d+\.4s"),
        (8, "avx2", {"mcpu": "znver3"}, "%ymm"),
        (16, "avx512f", {"mcpu": "znver4"}, "%zmm"),
    ],
    ids=["neon", "avx2", "avx512"],
)
def test_every_candidate_tile_matches_pytorch_or_builds_for_its_isa(lanes, flag, llvm, registers):
    import tvm

    # Partial row tiles and panels; with 3 panels per task a partial last group.
    rows, in_features, out_features = 13, 37, 173
    candidates = [GemmF32Config(t.rows, t.vectors, t.lanes, panels) for t in TILES[lanes] for panels in (1, 3)]
    kernels = {
        f"c{i}": GEMM_F32.build((rows, in_features, out_features), config).with_attr("global_symbol", f"c{i}")
        for i, config in enumerate(candidates)
    }
    if flag not in host_cpu().features:
        library = compile_kernel(tvm.IRModule(kernels), tvm.target.Target({"kind": "llvm", **llvm}))
        assert re.search(registers, library.mod.inspect_source("asm"))
        return
    library = compile_kernel(tvm.IRModule(kernels), CPU.tvm())
    x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    expected = torch.nn.functional.linear(x, weight, bias)
    for name, config in zip(kernels, candidates):
        out = torch.full((rows, out_features), float("nan"))
        library[name](*map(to_tvm, (x, GEMM_F32.pack(weight, config), bias, out)))
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=str(config))


@pytest.mark.parametrize("target", [CPU, parse_target("aarch64")], ids=["host", "aarch64"])
def test_candidates_are_the_isas_tiles_with_the_panel_groups_the_l2_holds(target):
    if target is CPU and not HOST.avx2:
        pytest.skip("the float32 GEMM template is for x86 CPUs with AVX2 here")
    isa = Isa.of(target)
    tiles = TILES[default_tile(isa).lanes]
    assert len(GEMM_F32.space((8, 16, 8), isa)) == 3 * len(tiles)  # small panels: groups of 1, 2 and 3
    for in_features in (768, 2048, 3072, 50000):
        candidates = GEMM_F32.space((8, in_features, 8), isa)
        assert {c.tile for c in candidates} == set(tiles)
        for tile in tiles:
            panel_bytes = in_features * tile.panel * 4
            fit = min(3, max(1, isa.l2_bytes // panel_bytes))  # groups of 1 to 3, as the L2 holds
            assert sorted(c.panels_per_task for c in candidates if c.tile == tile) == list(range(1, fit + 1))


class FakeFuture:
    def __init__(self, run_secs, error_msg=None):
        self.outcome = SimpleNamespace(run_secs=run_secs, error_msg=error_msg)

    def result(self):
        return self.outcome


def test_the_fastest_candidate_is_kept_by_its_fastest_repeat_over_both_rounds(caplog):
    from tvm.s_tir import meta_schedule as ms

    candidates = [GemmF32Config(4, 3, 8, 1), GemmF32Config(6, 2, 8, 2), GemmF32Config(4, 3, 8, 3)]
    builder = SimpleNamespace(build=lambda inputs: [SimpleNamespace(artifact_path="a", error_msg=None)] * len(inputs))
    # Two rounds of three: the second candidate is slowest in round one (a neighbour's burst) and fastest in two.
    seconds = iter([[3e-3, 4e-3], [9e-3], [2.5e-3, 2.6e-3], [3e-3], [1e-3, 5e-3], [2.6e-3]])
    runner = SimpleNamespace(run=lambda inputs: [FakeFuture(next(seconds)) for _ in inputs])
    best = tune_module._fastest_candidate(ms, GEMM_F32, (8, 16, 48), candidates, CPU.tvm(), builder, runner)
    assert best == Choice(GemmF32Config(6, 2, 8, 2), pytest.approx(1e3))

    # A candidate that fails (a timeout on a busy device) is left out with a warning; none running fails tuning.
    timed_out = "Traceback (most recent call last):\n  ...\nRuntimeError: timed out\n"
    seconds = iter([[3e-3], [2e-3], [3e-3], [2e-3]])
    runner = SimpleNamespace(
        run=lambda inputs: [FakeFuture(None, timed_out) if i % 3 == 1 else FakeFuture(next(seconds)) for i in range(6)]
    )
    with caplog.at_level("WARNING"):
        best = tune_module._fastest_candidate(ms, GEMM_F32, (8, 16, 48), candidates, CPU.tvm(), builder, runner)
    assert best == Choice(GemmF32Config(4, 3, 8, 3), pytest.approx(2e3))
    assert "gemm_f32 8x16x48, candidate 6x2 tile, 2 panels per task failed: RuntimeError: timed out" in caplog.text
    runner = SimpleNamespace(run=lambda inputs: [FakeFuture(None, timed_out) for _ in inputs])
    with pytest.raises(CodegenError, match=r"no candidate ran \(4x3 tile, 1 panels per task failed: .* timed out\)$"):
        tune_module._fastest_candidate(ms, GEMM_F32, (8, 16, 48), candidates, CPU.tvm(), builder, runner)


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(40, 56), torch.nn.Linear(56, 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))  # the ReLU keeps fuse-blocks from merging the two


@contextlib.contextmanager
def dense_calls():
    """``(rows, in, out, config)`` of every float32 GEMM built inside the block."""
    calls, real = [], GEMM_F32.build
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            GEMM_F32,
            "build",
            lambda workload, config, *a: calls.append((*workload, config)) or real(workload, config, *a),
        )
        yield calls


@needs_avx2
def test_tuning_times_each_gemm_shape_once_and_builds_use_its_choice(monkeypatch):
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    shapes = [(12, 40, 56), (12, 56, 24)]
    space = GEMM_F32.space
    monkeypatch.setattr(GEMM_F32, "space", lambda workload, isa: space(workload, isa)[:3])  # 3 of 15: seconds
    trials = sum(len(GEMM_F32.space(shape, HOST)) for shape in shapes)  # none for MetaSchedule

    # A budget smaller than a shape's candidates times none of them.
    short = fxopt.optimize(model, (x,), target="cpu", tune=TuneOptions(trials=2))._latest()[0].tuning
    assert [k.trials_after for k in short.templates] == [0, 0] and short.stopped == "trial budget spent"

    progress: list[str] = []
    tuned = fxopt.optimize(
        model, (x,), target="cpu", tune=TuneOptions(trials=trials), progress=lambda i, n, s: progress.append(s)
    )
    summary = tuned._latest()[0].tuning
    assert sorted(k.name for k in summary.templates) == ["gemm_f32 12x40x56", "gemm_f32 12x56x24"]
    assert summary.new_trials == trials and all(k.best_us > 0 for k in summary.templates)
    assert "2 of 2 template kernels timed" in str(summary)
    assert sum(s.startswith("tune gemm_f32 12x") and " panels per task, " in s for s in progress) == 2
    stored = {workload: c.config for (_, workload), c in TemplateChoices.load(database_dir(CPU)).chosen.items()}
    assert sorted(stored) == sorted(shapes)
    assert all(config in GEMM_F32.space(shape, HOST) for shape, config in stored.items())
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-4, atol=1e-4)

    with dense_calls() as calls:  # a later build, untuned, reads the choices
        again = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert sorted(calls, key=str) == sorted(((*shape, stored[shape]) for shape in shapes), key=str)
    torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)
    retuned = fxopt.optimize(model, (x,), target="cpu", tune=TuneOptions(trials=2))._latest()[0].tuning
    assert [k.trials_after - k.trials_before for k in retuned.templates] == [0, 0]  # timed once


def write_templates(entries: dict) -> None:
    (database_dir(CPU) / "templates.json").write_text(json.dumps({"gemm_f32": entries}))


@needs_avx2
def test_a_stored_choice_other_than_the_default_computes_the_same():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    # a tile of the host's space other than its default (AVX2: 2 x 6, panels of 48; AVX-512: 6 x 4, of 64)
    default = GEMM_F32.default((12, 40, 56), HOST)
    other = next(c for c in GEMM_F32.space((12, 40, 56), HOST) if c.tile != default.tile)
    write_templates({"12x40x56": {**dataclasses.asdict(other), "us": 5.0}})
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert (12, 40, 56, other) in calls
    assert (12, 56, 24, GEMM_F32.default((12, 56, 24), HOST)) in calls  # untuned
    assert built.report().backend == "tvm"
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize(
    "text",
    ["{not json", '{"gemm_f32": {"12x40": {"rows": 2}}}', '{"gemm_f32": {"12x40x56": {"rows": "two"}}}', "[]"],
)
def test_a_template_file_that_is_not_ours_never_fails_a_build(text, caplog):
    (database_dir(CPU) / "templates.json").write_text(text)
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert {call[3].tile for call in calls} == {default_tile(HOST)}
    assert "is not a template database" in caplog.text and "templates.json" in caplog.text
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)


def test_choices_for_other_vectors_are_not_used():
    other = 24 - default_tile(HOST).lanes  # 16 on an AVX2 host, 8 on an AVX-512 one
    write_templates({"12x40x56": {"rows": 4, "vectors": 3, "lanes": other, "panels_per_task": 1, "us": 5.0}})
    choices = TemplateChoices.load(database_dir(CPU))
    assert choices.chosen["gemm_f32", (12, 40, 56)].config.lanes == other  # kept in the file
    assert choices.config(GEMM_F32, (12, 40, 56), HOST) == GEMM_F32.default((12, 40, 56), HOST)


def test_an_aarch64_build_gets_the_gemm_with_neon_tiles():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="aarch64")  # cross-built: it runs in PyTorch here
    isa = Isa.named("aarch64")
    assert sorted(calls, key=str) == [
        (12, 40, 56, GEMM_F32.default((12, 40, 56), isa)),
        (12, 56, 24, GEMM_F32.default((12, 56, 24), isa)),
    ]
    assert {config.lanes for *_, config in calls} == {4}
    assert re.search(r"fmla\s+v\d+\.4s", built.kernel_source("asm"))


def test_an_avx512_build_gets_the_gemm_with_zmm_tiles_on_any_host():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    isa = Isa.named("cpu:avx512")
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu:avx512", dispatch="tvm")
    assert sorted(calls, key=str) == [
        (12, 40, 56, GEMM_F32.default((12, 40, 56), isa)),
        (12, 56, 24, GEMM_F32.default((12, 56, 24), isa)),
    ]
    assert {config.lanes for *_, config in calls} == {16}
    assert re.search(r"vfmadd\w+ps\s.*zmm", built.kernel_source("asm"))
    report = built.report()
    assert report.backend == ("torch" if parse_target("cpu:avx512").is_cross else "tvm")
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)


class Attention(torch.nn.Module):
    def forward(self, q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@needs_avx2
def test_attention_is_tuned_like_the_gemm_and_builds_use_its_choice(monkeypatch):
    model, inputs = Attention().eval(), tuple(torch.randn(1, 2, 16, 8) for _ in range(3))
    workload = (1, 2, 16, 16, 8)
    space = ATTENTION_F32.space(workload, HOST)
    monkeypatch.setattr(ATTENTION_F32, "space", lambda workload, isa: space[1:3])  # two others than the default
    tuned = fxopt.optimize(model, inputs, target="cpu", tune=TuneOptions(trials=2))
    assert [k.name for k in tuned._latest()[0].tuning.templates] == ["attention_f32 1x2x16x16x8"]
    chosen = TemplateChoices.load(database_dir(CPU)).chosen
    assert list(chosen) == [("attention_f32", workload)] and chosen["attention_f32", workload].config in space[1:3]

    calls, real = [], ATTENTION_F32.build
    monkeypatch.setattr(ATTENTION_F32, "build", lambda w, config, *a: calls.append(config) or real(w, config, *a))
    again = fxopt.optimize(model, inputs, target="cpu", dispatch="tvm")
    assert calls == [chosen["attention_f32", workload].config]
    torch.testing.assert_close(again(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)


@needs_avx2
@pytest.mark.parametrize("family, size", [(CONV2D_F32, 6), (DEPTHWISE_F32, 6), (WINOGRAD_F32, 12)])
def test_convolutions_are_tuned_like_the_gemm_and_builds_use_their_choice(monkeypatch, family, size):
    torch.manual_seed(0)
    lanes = HOST.lanes()
    channels = 2 * lanes  # two output blocks: Winograd's space at one block is its default alone
    groups = channels if family is DEPTHWISE_F32 else 1
    model, inputs = (
        torch.nn.Sequential(torch.nn.Conv2d(channels, channels, 3, padding=1, groups=groups)).eval(),
        (torch.randn(1, channels, size, size),),
    )
    workload = ConvShape(1, channels, size, size, channels, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, lanes, lanes, groups).workload
    space = family.space(workload, HOST)
    assert len(space) >= 2
    monkeypatch.setattr(family, "space", lambda workload, isa: space[1:3])  # one or two others than the default
    built, real = [], family.build
    monkeypatch.setattr(family, "build", lambda w, config, *a: built.append((w, config)) or real(w, config, *a))
    tuned = fxopt.optimize(model, inputs, target="cpu", tune=TuneOptions(trials=2))
    assert [k.name for k in tuned._latest()[0].tuning.templates] == [family.kernel_name(workload)]
    chosen = TemplateChoices.load(database_dir(CPU)).chosen
    assert list(chosen) == [(family.name, workload)] and chosen[family.name, workload].config in space[1:3]
    # The candidates, then the convolution's blocks timed as builds will run them: this block with its choice.
    assert [config for w, config in built if w == workload][-1] == chosen[family.name, workload].config

    # Tuning timed the convolution at other blocks too; on a host where another measured faster, the next build's
    # block search would build that workload instead. This test is about the template choice.
    (database_dir(CPU) / BLOCKS_FILE).unlink()

    built.clear()
    again = fxopt.optimize(model, inputs, target="cpu", dispatch="tvm")
    assert [config for _, config in built] == [chosen[family.name, workload].config]
    torch.testing.assert_close(again(*inputs), model(*inputs), rtol=1e-4, atol=2e-4)
