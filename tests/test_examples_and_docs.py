"""The examples run, the pipeline files load, and the README's pass table is the registry's."""

import pathlib
import runpy

import pytest

import fxopt.passes.registry  # the module itself: fxopt.passes loads it lazily
from fxopt import Pipeline
from fxopt.cli import passes_markdown

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("script", sorted((ROOT / "examples").glob("*.py")), ids=lambda p: p.name)
def test_example_runs(script, capsys, monkeypatch):
    monkeypatch.setattr(fxopt.passes.registry, "PASSES", dict(fxopt.passes.PASSES))  # an example may register a pass
    runpy.run_path(str(script), run_name="__main__")
    assert "fxopt report" in capsys.readouterr().out


@pytest.mark.parametrize("path", sorted((ROOT / "pipelines").glob("*.toml")), ids=lambda p: p.name)
def test_pipeline_files_load(path):
    assert Pipeline.load(path).passes


def test_readme_pass_table_is_generated_from_the_registry():
    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- passes:begin -->\n", "\n<!-- passes:end -->"
    table = readme.split(start, 1)[1].split(end, 1)[0]
    assert table == passes_markdown(), "README pass table is stale: regenerate with `fxopt passes --markdown`"
