"""The pruning benchmark runs end to end on a tiny model (its numbers live in the README, not here)."""

import pathlib
import runpy

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
