"""The benchmarks run end to end on small models (their numbers live in the READMEs, not here)."""

import pathlib
import runpy

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_pruning_benchmark_compares_both_pruners(capsys):
    pruning = runpy.run_path(str(ROOT / "benchmarks" / "pruning.py"))
    assert pruning["main"](["resnet-tiny", "--ratios", "0.3", "--rounds", "1", "--limit", "120"]) == 0
    rows = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| resnet-tiny | 30%")]
    assert {r.split("|")[3].strip() for r in rows} == {"fxopt", "Torch-Pruning"}
    for row in rows:
        cells = [c.strip() for c in row.split("|")]
        assert cells[4].startswith("yes"), row  # both prune it
        reduction = float(cells[5].split("(-")[1].rstrip("%)")) / 100
        assert reduction >= 0.3 - 0.01, row  # and meet the FLOP target


def test_quantization_benchmark_compares_fxopt_with_onnxruntime(capsys):
    pytest.importorskip("sklearn.datasets")
    quantization = runpy.run_path(str(ROOT / "benchmarks" / "quantization.py"))
    assert quantization["main"](["digits", "--rounds", "1", "--tools", "fxopt", "onnxruntime"]) == 0
    rows = [r.split("|")[1:-1] for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    table = {(tool.strip(), method.strip()): [c.strip() for c in rest] for tool, method, *rest in rows[1:]}
    for key in [("fxopt", "quantize"), ("onnxruntime", "quantize_static QDQ"), ("float32", "(eager)")]:
        accuracy = float(table[key][0].split("%")[0])
        assert accuracy > 90, (key, table[key])  # both tools quantized the trained CNN and kept it working
    assert table[("onnxruntime", "quantize_static QDQ")][2].endswith("ms")  # timed side by side
