import dataclasses
import io
import re
import runpy
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

import fxopt.passes as passes_pkg
from fxopt import (
    PASSES,
    Pass,
    PassError,
    PassManager,
    Pipeline,
    PipelineError,
    VerificationError,
    capture,
    register_pass,
)
from fxopt.passes import BUILTIN_PIPELINES, option
from fxopt.passes.pipeline import check_order
from fxopt.passes.spec import parse_pipeline

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

aten = torch.ops.aten


@dataclass(frozen=True)
class Toy(Pass):
    """A pass with every option type the grammar supports (test only)."""

    name = "toy"
    ratio: float = option(0.5, "a float")
    count: int = option(3, "an int")
    flag: bool = option(False, "a bool")
    mode: Literal["l1", "l2"] = option("l1", "a choice")
    ignore: tuple[str, ...] = option((), "a list")
    label: str = option("x", "a string")

    def apply(self, program, ctx):
        return False


@dataclass(frozen=True)
class BreakMul(Pass):
    """Turns every multiplication into an addition: a deliberately wrong pass (test only)."""

    name = "break-mul"

    def apply(self, program, ctx):
        changed = False
        for node in program.graph.nodes:
            if node.target is aten.mul.Tensor:
                node.target = aten.add.Tensor
                changed = True
        return changed


@dataclass(frozen=True)
class Explode(Pass):
    """Raises halfway through (test only)."""

    name = "explode"

    def apply(self, program, ctx):
        x = next(n for n in program.graph.nodes if n.op == "placeholder")
        with program.graph.inserting_after(x):
            program.graph.call_function(aten.neg.default, (x,))
        raise RuntimeError("boom")


@pytest.fixture
def registry(monkeypatch):
    extended = dict(PASSES, toy=Toy, **{"break-mul": BreakMul, "explode": Explode})
    monkeypatch.setattr(passes_pkg.registry, "PASSES", extended)
    return extended


class MulModel(nn.Module):
    def forward(self, x):
        y = torch.relu(x) * 3
        return y.clone() * y


def test_registry_names_match_and_every_pass_is_documented_and_tested():
    import pathlib

    tests = pathlib.Path(__file__).parent
    for name, cls in PASSES.items():
        assert cls.name == name
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert cls.__doc__ and ("Exact" in cls.__doc__ or "exact" in cls.__doc__), name
        assert (tests / f"test_{name.replace('-', '_')}.py").exists(), f"no tests for {name}"


def test_canonical_text_round_trips_with_defaults(registry):
    pipeline = Pipeline.parse("toy{ratio=0.3 mode=l2 ignore=[fc, 'head 2']},dce")
    text = str(pipeline)
    assert text == 'toy{ratio=0.3 count=3 flag=false mode=l2 ignore=[fc,"head 2"] label=x},dce'
    assert Pipeline.parse(text) == pipeline


@given(
    ratio=st.floats(allow_nan=False, allow_infinity=False),
    count=st.integers(-(10**6), 10**6),
    flag=st.booleans(),
    mode=st.sampled_from(["l1", "l2"]),
    ignore=st.lists(st.text(min_size=1, max_size=6).filter(lambda s: "\x00" not in s), max_size=3),
    label=st.text(min_size=1, max_size=8),
)
def test_round_trip_over_option_values(ratio, count, flag, mode, ignore, label):
    original = Toy(ratio, count, flag, mode, tuple(ignore), label)
    passes_pkg.PASSES["toy"] = Toy
    try:
        (parsed,) = parse_pipeline(str(original))
    finally:
        del passes_pkg.PASSES["toy"]
    assert parsed == original


def test_named_pipelines_expand_wherever_a_pass_name_is():
    assert str(Pipeline.parse("torch")) == str(Pipeline.parse(BUILTIN_PIPELINES["default"]))
    assert str(Pipeline.parse("cpu")) == str(Pipeline.parse(BUILTIN_PIPELINES["cpu"]))
    assert [p.name for p in Pipeline.parse("dce,cleanup").passes] == [
        "dce",
        "remove-noops",
        "fold-constants",
        "cse",
        "dce",
    ]


@pytest.mark.parametrize(
    "spec, message",
    [
        ("fold-constans", "did you mean 'fold-constants'"),
        ("toy{ratio=abc}", "option 'ratio' of pass 'toy' expects a number"),
        ("toy{count=1.5}", "option 'count' of pass 'toy' expects an integer"),
        ("toy{mode=l3}", "expects one of l1, l2"),
        ("toy{flag=maybe}", "expects true or false"),
        ("toy{ratoi=1}", "has no option 'ratoi'; did you mean 'ratio'"),
        ("toy{ratio=1 ratio=2}", "given twice"),
        ("toy{ratio}", "expected '='"),
        ("dce,", "expected a pass name"),
        ("default{x=1}", "takes no options"),
        ("fold-constants{max-new-elements=-1}", "max-new-elements must be >= 0"),
        ("convert-layout{lanes=6}", "lanes must be 0 (the host's) or a power of two >= 4, not 6"),
        ("convert-layout{lanes=2}", "lanes must be 0 (the host's) or a power of two >= 4, not 2"),
    ],
)
def test_bad_specs_name_the_culprit(registry, spec, message):
    with pytest.raises(PipelineError, match=re.escape(message)):
        Pipeline.parse(spec)


def test_ordering_constraints_are_checked_when_a_pipeline_is_built():
    @dataclass(frozen=True)
    class Late(Pass):
        """Needs dce first (test only)."""

        name = "late"
        requires = ("dce",)
        before = ("cse",)

    dce, cse = PASSES["dce"](), PASSES["cse"]()
    check_order([dce, Late(), cse])
    with pytest.raises(PipelineError, match="requires 'dce'"):
        Pipeline((Late(), dce))
    with pytest.raises(PipelineError, match="must run before 'cse'"):
        Pipeline((dce, cse, Late()))


def test_toml_pipeline_file(tmp_path):
    path = tmp_path / "p.toml"
    path.write_text(
        'passes = ["cleanup", "dce"]\n[target]\nname = "torch"\n[verify]\nmode = "each"\nrtol = 1e-3\n'
        '[instrument]\nprint-ir-after = ["dce"]\n'
    )
    pipeline = Pipeline.coerce(str(path))
    assert pipeline.target == "torch" and pipeline.verify == "each"
    assert pipeline.tolerance.rtol == 1e-3 and pipeline.print_ir_after == ("dce",)
    assert [p.name for p in pipeline.passes][-1] == "dce"


@pytest.mark.parametrize(
    "text, message",
    [
        ('passes = "dce"', "must be a list"),
        ('passes = ["dce"]\n[verify]\nmode = "sometimes"', "mode must be one of"),
        ('passes = ["dce"]\n[verfy]\nmode = "each"', "unknown key"),
        ('passes = ["dce"]\n[target]\narch = "x"', r"\[target\]: unknown key"),
        ("passes = [", "not valid TOML"),
    ],
)
def test_bad_toml_files(tmp_path, text, message):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PipelineError, match=message):
        Pipeline.load(path)


def test_failing_pass_names_itself_and_leaves_the_input_untouched(registry):
    program = capture(MulModel(), (torch.randn(4),))
    text = str(program.graph)
    with pytest.raises(PassError, match=r"pass 'explode' raised RuntimeError: boom.*already run: cse"):
        PassManager("cse,explode").run(program)
    assert str(program.graph) == text


def test_verification_bisects_to_the_first_bad_pass_and_node(registry):
    program = capture(MulModel(), (torch.randn(4),))
    with pytest.raises(VerificationError) as info:
        PassManager("cse,break-mul,dce", verify="end").run(program)
    message = str(info.value)
    assert "after pass 'break-mul'" in message
    assert "First diverging value: node 'mul'" in message
    assert "test_manager.py" in message  # the model's source line


def test_verify_each_records_errors_per_pass():
    program = capture(MulModel(), (torch.randn(4),))
    _, records = PassManager("cleanup", verify="each").run(program)
    assert all(r.max_abs_error == 0.0 for r in records)
    _, records = PassManager("cleanup", verify="off").run(program)
    assert all(r.max_abs_error is None for r in records)


def test_print_ir_after_change_and_dump_dir(tmp_path):
    program = capture(MulModel(), (torch.randn(4),))
    stream = io.StringIO()
    PassManager("remove-noops,cse", print_ir_after=["change"], stream=stream).run(program)
    assert "// IR after remove-noops" in stream.getvalue()
    assert "// IR after cse" not in stream.getvalue()  # cse changed nothing here
    PassManager("cleanup", print_ir_after=["all"], dump_dir=tmp_path).run(program)
    assert sorted(p.name for p in tmp_path.iterdir())[0] == "001-remove-noops.after.txt"
    with pytest.raises(PipelineError, match="unknown pass"):
        PassManager("dce", print_ir_after=["dse"])


def test_statistics_and_timing_per_pass():
    program = capture(MulModel(), (torch.randn(4),))
    _, records = PassManager("remove-noops,dce").run(program)
    noops = records[0]
    assert noops.changed and noops.stats == {"copy": 1}
    assert noops.nodes[1] == noops.nodes[0] - 1
    assert noops.seconds >= 0


class _LayerError(VerificationError):
    """An fxopt error whose constructor takes more than a message (test only)."""

    def __init__(self, layer: str, detail: str):
        super().__init__(f"layer {layer}: {detail}")


@dataclass(frozen=True)
class RaiseFxoptError(Pass):
    name = "raise-fxopt-error"

    def apply(self, program, ctx):
        raise _LayerError("fc1", "bad weight")


def test_a_pass_raising_an_fxopt_error_subclass_is_wrapped_not_rebuilt():
    # Rebuilding it as type(exc)(message) raised a TypeError from _LayerError's constructor instead.
    program = capture(nn.Linear(2, 2), (torch.randn(1, 2),))
    with pytest.raises(PassError) as info:
        PassManager([RaiseFxoptError()]).run(program)
    assert "pass 'raise-fxopt-error' failed: layer fc1: bad weight" in str(info.value)
    assert isinstance(info.value.__cause__, _LayerError)


def test_register_pass_makes_a_users_pass_usable_by_name_in_specs_files_and_the_cli(tmp_path, monkeypatch):
    monkeypatch.setattr(passes_pkg.registry, "PASSES", dict(passes_pkg.PASSES))  # registering is process-wide
    user = runpy.run_path(str(EXAMPLES / "custom_pass.py"))  # its @register_pass runs on import
    assert passes_pkg.registry.PASSES["fold-double-negation"] is user["FoldDoubleNegation"]

    program = capture(user["Model"](), (torch.randn(4),))
    toml = tmp_path / "mine.toml"
    toml.write_text('passes = ["fold-double-negation", "dce"]\n')
    for pipeline in ["fold-double-negation,dce", toml]:
        optimized, records = PassManager(pipeline).run(program)
        assert records[0].stats == {"rewritten": 1}, pipeline
        assert not any(n.target is torch.ops.aten.neg.default for n in optimized.graph.nodes)

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "fxopt.cli",
            "optimize",
            f"{EXAMPLES / 'custom_pass.py'}:Model",
            "-i",
            "4",
            "-p",
            "fold-double-negation,dce",
            "--target",
            "torch",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert "fold-double-negation" in done.stdout and "rewritten=1" in done.stdout, done.stdout

    with pytest.raises(PipelineError, match="is taken by DeadCodeElimination"):
        register_pass(dataclass(frozen=True)(type("Dce", (Pass,), {"name": "dce"})))
    with pytest.raises(PipelineError, match="kebab-case"):
        register_pass(dataclass(frozen=True)(type("Bad", (Pass,), {"name": "Bad_Name"})))


class _ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x))


def test_the_report_names_the_rules_that_fired_and_where_they_are_written():
    import fxopt

    fast = fxopt.optimize(_ConvBN().eval(), (torch.randn(1, 3, 6, 6),), target="torch", pipeline="fold-conv-bn")
    (record,) = fast.report().passes
    assert record.stats["fold-affine"] == 1 and record.rules["fold-affine"].startswith("fold_conv_bn.py:")
    assert f"fold-affine=1 ({record.rules['fold-affine']})" in str(fast.report())
