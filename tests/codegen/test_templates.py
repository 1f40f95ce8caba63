"""Template tuning (fxopt.codegen.templates): every candidate computes the GEMM, tuning times each shape once and
keeps the fastest, builds use what it stored, and a file that is not ours never fails a build."""

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
from fxopt.codegen import x86
from fxopt.codegen.isa import Isa
from fxopt.codegen.runtime import to_tvm
from fxopt.codegen.templates import DenseChoice, TemplateChoices, dense_candidates
from fxopt.codegen.tune import TuneOptions
from fxopt.codegen.tuning_database import database_dir
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
    candidates = [(tile, panels) for tile in x86.DENSE_TILES[lanes] for panels in (1, 3)]
    kernels = {
        f"c{i}": x86.dense_f32(rows, in_features, out_features, tile, panels).with_attr("global_symbol", f"c{i}")
        for i, (tile, panels) in enumerate(candidates)
    }
    if flag not in host_cpu().features:
        library = tvm.compile(tvm.IRModule(kernels), target=tvm.target.Target({"kind": "llvm", **llvm}))
        assert re.search(registers, library.mod.inspect_source("asm"))
        return
    library = tvm.compile(tvm.IRModule(kernels), target=CPU.tvm())
    x, weight, bias = torch.randn(rows, in_features), torch.randn(out_features, in_features), torch.randn(out_features)
    expected = torch.nn.functional.linear(x, weight, bias)
    for name, (tile, panels) in zip(kernels, candidates):
        out = torch.full((rows, out_features), float("nan"))
        library[name](*map(to_tvm, (x, x86.pack_dense_weight(weight, tile.panel), bias, out)))
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4, msg=f"{tile}, {panels} panels per task")


@pytest.mark.parametrize("target", [CPU, parse_target("aarch64")], ids=["host", "aarch64"])
def test_candidates_are_the_isas_tiles_with_the_panel_groups_the_l2_holds(target):
    if target is CPU and not HOST.avx2:
        pytest.skip("the float32 GEMM template is for x86 CPUs with AVX2 here")
    isa = Isa.of(target)
    tiles = x86.DENSE_TILES[x86.dense_tile(isa).lanes]
    assert len(dense_candidates(16, isa)) == 3 * len(tiles)  # small panels: groups of 1, 2 and 3
    for in_features in (768, 2048, 3072, 50000):
        candidates = dense_candidates(in_features, isa)
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

    candidates = [DenseChoice(x86.AVX2_TILE, 1), DenseChoice(x86.DenseTile(6, 2, 8), 2), DenseChoice(x86.AVX2_TILE, 3)]
    builder = SimpleNamespace(build=lambda inputs: [SimpleNamespace(artifact_path="a", error_msg=None)] * len(inputs))
    # Two rounds of three: the second candidate is slowest in round one (a neighbour's burst) and fastest in two.
    seconds = iter([[3e-3, 4e-3], [9e-3], [2.5e-3, 2.6e-3], [3e-3], [1e-3, 5e-3], [2.6e-3]])
    runner = SimpleNamespace(run=lambda inputs: [FakeFuture(next(seconds)) for _ in inputs])
    best = tune_module._fastest_candidate(ms, (8, 16, 48), candidates, CPU.tvm(), builder, runner)
    assert best == DenseChoice(x86.DenseTile(6, 2, 8), 2, pytest.approx(1e3))

    # A candidate that fails (a timeout on a busy device) is left out with a warning; none running fails tuning.
    timed_out = "Traceback (most recent call last):\n  ...\nRuntimeError: timed out\n"
    seconds = iter([[3e-3], [2e-3], [3e-3], [2e-3]])
    runner = SimpleNamespace(
        run=lambda inputs: [FakeFuture(None, timed_out) if i % 3 == 1 else FakeFuture(next(seconds)) for i in range(6)]
    )
    with caplog.at_level("WARNING"):
        best = tune_module._fastest_candidate(ms, (8, 16, 48), candidates, CPU.tvm(), builder, runner)
    assert best == DenseChoice(x86.AVX2_TILE, 3, pytest.approx(2e3))
    assert "dense_f32 8x16x48, candidate 6x2 tile, 2 panels per task failed: RuntimeError: timed out" in caplog.text
    runner = SimpleNamespace(run=lambda inputs: [FakeFuture(None, timed_out) for _ in inputs])
    with pytest.raises(CodegenError, match=r"no candidate ran \(4x3 tile, 1 panels per task failed: .* timed out\)$"):
        tune_module._fastest_candidate(ms, (8, 16, 48), candidates, CPU.tvm(), builder, runner)


class TwoLinears(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = torch.nn.Linear(40, 56), torch.nn.Linear(56, 24)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))  # the ReLU keeps fuse-blocks from merging the two


@contextlib.contextmanager
def dense_calls():
    """``(rows, in, out, tile, panels per task)`` of every ``dense_f32`` built inside the block."""
    calls, real = [], x86.dense_f32
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(x86, "dense_f32", lambda *a: calls.append(a[:5]) or real(*a))
        yield calls


@needs_avx2
def test_tuning_times_each_gemm_shape_once_and_builds_use_its_choice(monkeypatch):
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    shapes = [(12, 40, 56), (12, 56, 24)]
    monkeypatch.setattr(tune_module, "dense_candidates", lambda k, t: dense_candidates(k, t)[:3])  # 3 of 15: seconds
    trials = sum(len(tune_module.dense_candidates(k, HOST)) for _, k, _ in shapes)  # none for MetaSchedule

    # A budget smaller than a shape's candidates times none of them.
    short = fxopt.optimize(model, (x,), target="cpu", tune=TuneOptions(trials=2))._latest()[0].tuning
    assert [k.trials_after for k in short.templates] == [0, 0] and short.stopped == "trial budget spent"

    progress: list[str] = []
    tuned = fxopt.optimize(
        model, (x,), target="cpu", tune=TuneOptions(trials=trials), progress=lambda i, n, s: progress.append(s)
    )
    summary = tuned._latest()[0].tuning
    assert sorted(k.name for k in summary.templates) == ["dense_f32 12x40x56", "dense_f32 12x56x24"]
    assert summary.new_trials == trials and all(k.best_us > 0 for k in summary.templates)
    assert "2 of 2 template kernel shapes timed" in str(summary)
    assert sum(s.startswith("tune dense_f32 12x") and " panels per task, " in s for s in progress) == 2
    stored = TemplateChoices.load(database_dir(CPU)).dense
    assert sorted(stored) == sorted(shapes)
    for (_, in_features, _), choice in stored.items():
        assert dataclasses.replace(choice, us=None) in tune_module.dense_candidates(in_features, HOST)
    torch.testing.assert_close(tuned(x), model(x), rtol=1e-4, atol=1e-4)

    with dense_calls() as calls:  # a later build, untuned, reads the choices
        again = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert sorted(calls) == sorted((*shape, stored[shape].tile, stored[shape].panels_per_task) for shape in shapes)
    torch.testing.assert_close(again(x), model(x), rtol=1e-4, atol=1e-4)
    retuned = fxopt.optimize(model, (x,), target="cpu", tune=TuneOptions(trials=2))._latest()[0].tuning
    assert [k.trials_after - k.trials_before for k in retuned.templates] == [0, 0]  # timed once


def write_templates(entries: dict) -> None:
    (database_dir(CPU) / "templates.json").write_text(json.dumps({"dense_f32": entries}))


@needs_avx2
def test_a_stored_choice_other_than_the_default_computes_the_same():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    lanes = x86.dense_tile(HOST).lanes
    write_templates(
        {"12x40x56": {"rows": 2, "vectors": 6, "lanes": lanes, "panels_per_task": 1, "us": 5.0}}  # panels of 48
    )
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert (12, 40, 56, x86.DenseTile(2, 6, lanes), 1) in calls
    assert (
        12,
        56,
        24,
        x86.dense_tile(HOST),
        x86.default_panels_per_task(56, x86.dense_tile(HOST), HOST.l2_bytes),
    ) in calls  # untuned
    assert built.report().backend == "tvm"
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)


@needs_avx2
@pytest.mark.parametrize(
    "text",
    ["{not json", '{"dense_f32": {"12x40": {"rows": 2}}}', '{"dense_f32": {"12x40x56": {"rows": "two"}}}', "[]"],
)
def test_a_template_file_that_is_not_ours_never_fails_a_build(text, caplog):
    (database_dir(CPU) / "templates.json").write_text(text)
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu", dispatch="tvm")
    assert {call[3] for call in calls} == {x86.dense_tile(HOST)}
    assert "is not a template database" in caplog.text and "templates.json" in caplog.text
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)


def test_choices_for_other_vectors_are_not_used():
    other = 24 - x86.dense_tile(HOST).lanes  # 16 on an AVX2 host, 8 on an AVX-512 one
    write_templates({"12x40x56": {"rows": 4, "vectors": 3, "lanes": other, "panels_per_task": 1, "us": 5.0}})
    choices = TemplateChoices.load(database_dir(CPU))
    assert choices.dense[12, 40, 56].tile.lanes == other  # kept in the file
    default = DenseChoice(x86.dense_tile(HOST), x86.default_panels_per_task(40, x86.dense_tile(HOST), HOST.l2_bytes))
    assert choices.dense_schedule(12, 40, 56, HOST) == default


def test_an_aarch64_build_gets_the_gemm_with_neon_tiles():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="aarch64")  # cross-built: it runs in PyTorch here
    l2 = Isa.named("aarch64").l2_bytes
    assert sorted(calls) == [
        (12, 40, 56, x86.NEON_TILE, x86.default_panels_per_task(40, x86.NEON_TILE, l2)),
        (12, 56, 24, x86.NEON_TILE, x86.default_panels_per_task(56, x86.NEON_TILE, l2)),
    ]
    assert re.search(r"fmla\s+v\d+\.4s", built.kernel_source("asm"))


def test_an_avx512_build_gets_the_gemm_with_zmm_tiles_on_any_host():
    model, x = TwoLinears().eval(), torch.randn(12, 40)
    isa = Isa.named("cpu:avx512")
    with dense_calls() as calls:
        built = fxopt.optimize(model, (x,), target="cpu:avx512", dispatch="tvm")
    assert sorted(calls) == [
        (12, 40, 56, x86.AVX512_TILE, x86.default_panels_per_task(40, x86.AVX512_TILE, isa.l2_bytes)),
        (12, 56, 24, x86.AVX512_TILE, x86.default_panels_per_task(56, x86.AVX512_TILE, isa.l2_bytes)),
    ]
    assert re.search(r"vfmadd\w+ps\s.*zmm", built.kernel_source("asm"))
    report = built.report()
    assert report.backend == ("torch" if parse_target("cpu:avx512").is_cross else "tvm")
    torch.testing.assert_close(built(x), model(x), rtol=1e-4, atol=1e-4)
