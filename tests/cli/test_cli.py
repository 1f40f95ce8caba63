import json
import subprocess
import sys

import pytest
import torch

from fxopt.cli import main
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.templates import Choice, TemplateChoices
from fxopt.loading import parse_input_spec
from fxopt.targets import parse_target

MODEL_FILE = """
import torch.nn as nn
import torch

def make():
    return nn.Sequential(nn.Linear(8, 8), nn.Dropout(0.1), nn.ReLU())

def make_with_inputs():
    return make(), (torch.randn(2, 8),)
"""


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "mymodel.py"
    path.write_text(MODEL_FILE)
    return path


def test_optimize_a_file_factory_and_write_an_archive(model_file, tmp_path, capsys):
    out = tmp_path / "opt.pt2"
    assert main(["optimize", f"{model_file}:make", "-i", "2x8", "--target", "torch", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert "backend: torch" in text and "remove-noops" in text and "capture" in text
    loaded = torch.export.load(out).module()
    assert loaded(torch.randn(2, 8)).shape == (2, 8)


def test_factory_that_brings_inputs_and_json_report(model_file, capsys):
    assert main(["optimize", f"{model_file}:make_with_inputs", "-p", "remove-noops,dce", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in report["passes"]] == ["remove-noops", "dce"]
    assert report["passes"][0]["stats"] == {"copy": 1}  # the eval-mode dropout
    assert report["passes"][-1]["max_abs_error"] == 0.0  # exact passes
    assert report["final_error"][0] < 1e-5  # the TVM build, within the default tolerance


def test_builtin_model_and_pipeline_file(tmp_path, capsys):
    pipeline = tmp_path / "p.toml"
    pipeline.write_text('passes = ["cleanup"]\n[target]\nname = "torch"\n')
    assert main(["optimize", "bert-tiny", "--pipeline", str(pipeline)]) == 0
    text = capsys.readouterr().out
    assert "BertModel -> target torch" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (["optimize", "resnet5"], "unknown built-in model 'resnet5'; did you mean resnet50"),
        (["optimize", "nope.py:make", "-i", "2x8"], "model file 'nope.py' does not exist"),
        (["optimize", "bert-tiny", "-p", "dse"], "unknown pass or pipeline 'dse'; did you mean 'dce'"),
        (["optimize", "bert-tiny", "--target", "cuda:90"], "a CUDA architecture is written like cuda:sm_90"),
        (["optimize", "resnet-tiny", "-i", "1x3x32"], "cannot capture"),
        (["pipeline", "--dump", "fold-constants{max-new-elements=x}"], "expects an integer"),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("fxopt: error:") and message in err[-1], err[-1]


BROKEN_MODELS = {
    "raises.py": "import torch\ndef make():\n    raise ValueError('no weights here')\n",
    "syntax.py": "import torch\ndef make(:\n    pass\n",
    "imports.py": "import no_such_module_anywhere\n",
}


@pytest.mark.parametrize(
    "file, argv, message",
    [
        (
            "raises.py",
            ["optimize", "MODEL:make", "-i", "2x8"],
            "model factory {MODEL}:make raised raises.py:3: ValueError: no weights here",
        ),
        (
            "syntax.py",
            ["optimize", "MODEL:make", "-i", "2x8"],
            "cannot load model file '{MODEL}': syntax.py:2: SyntaxError",
        ),
        (
            "imports.py",
            ["optimize", "MODEL:make", "-i", "2x8"],
            "cannot load model file '{MODEL}': imports.py:1: ModuleNotFoundError",
        ),
        (
            "text.pt",
            ["optimize", "bert-tiny", "-t", "torch", "--calibration", "MODEL"],
            "calibration file {MODEL} is not a torch.save'd list of tensor batches",
        ),
        (
            "empty.pt",
            ["optimize", "bert-tiny", "-t", "torch", "--calibration", "MODEL"],
            "calibration file {MODEL} is not a torch.save'd list of tensor batches (it is empty)",
        ),
        (
            "garbage.pt",
            ["optimize", "bert-tiny", "-t", "torch", "--calibration", "MODEL"],
            "calibration file {MODEL} is not a torch.save'd list of tensor batches",
        ),
        (
            "raises.py",
            ["optimize", "MODEL:make", "-i", "2x8", "-o", "missing/dir/out.pt2"],
            "-o/--output missing/dir/out.pt2: directory missing/dir does not exist",
        ),
        (
            "raises.py",
            ["optimize", "MODEL:make", "-i", "2x8", "--export", "missing/lib"],
            "--export missing/lib: directory missing does not exist",
        ),
    ],
)
def test_what_users_get_wrong_is_one_line(file, argv, message, tmp_path, capsys, monkeypatch):
    # Each was a traceback (or, for -o, an error after all the work): IndexError, EOFError, KeyError from the
    # calibration file even for pipelines with no data-driven pass, the model file's own traceback.
    monkeypatch.chdir(tmp_path)
    contents = {"text.pt": "hello\n", "empty.pt": "", "garbage.pt": "\x00\x01\x02 not a pickle", **BROKEN_MODELS}
    (tmp_path / file).write_text(contents[file])
    model = str(tmp_path / file)
    assert main([a.replace("MODEL", model) for a in argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fxopt: error:") and message.format(MODEL=model) in err[0], err


def test_debug_before_the_command_shows_the_traceback(tmp_path):
    (tmp_path / "raises.py").write_text(BROKEN_MODELS["raises.py"])
    with pytest.raises(Exception, match="raised raises.py:3"):
        main(["--debug", "optimize", f"{tmp_path / 'raises.py'}:make", "-i", "2x8"])


def test_version(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"fxopt {version('fxopt')}"


def test_prune_explains_groups_and_writes_the_pruned_model(tmp_path, capsys):
    assert main(["prune", "llama-tiny", "--options", "ratio=0.4 target=params", "--explain"]) == 0
    text = capsys.readouterr().out
    assert "[heads]" in text and "out   linear 'model.layers.0.mlp.gate_proj'" in text
    assert "params reduced by" in text
    out = tmp_path / "pruned.pt2"
    assert main(["prune", "resnet-tiny", "--options", "ratio=0.5", "--target", "torch", "-o", str(out)]) == 0
    assert "prune-channels" in capsys.readouterr().out and out.is_file()
    assert main(["prune", "resnet-tiny", "--options", "ratio=2"]) == 1
    assert "ratio must be in [0, 1)" in capsys.readouterr().err


def test_prune_with_calibration_data_from_a_file(tmp_path, capsys):
    from fxopt.zoo import load_zoo_model

    _, (image,) = load_zoo_model("resnet-tiny")
    torch.save(torch.randn(3, *image.shape[1:]), tmp_path / "calib.pt")  # three samples, batches of one
    options = "ratio=0.3 importance=activation scope=global compensate=true"
    assert (
        main(
            [
                "prune",
                "resnet-tiny",
                "--options",
                options,
                "--target",
                "torch",
                "--calibration",
                str(tmp_path / "calib.pt"),
            ]
        )
        == 0
    )
    assert "compensat" in capsys.readouterr().out
    assert main(["prune", "resnet-tiny", "--options", "importance=taylor", "--explain"]) == 1
    assert "importance=taylor needs calibration data" in capsys.readouterr().err


def test_quantize_reports_sensitivity_plots_it_and_quantizes(tmp_path, capsys):
    import xml.dom.minidom

    from fxopt.zoo import load_zoo_model

    _, (tokens,) = load_zoo_model("bert-tiny")
    torch.save([tokens.roll(i, dims=1) for i in (3, 7)], tmp_path / "calib.pt")  # other sentences, same vocabulary
    calibration = ["--calibration", str(tmp_path / "calib.pt")]
    plot = tmp_path / "sensitivity.svg"
    assert (
        main(
            [
                "quantize",
                "bert-tiny",
                "--options",
                "scheme=mixed max-error=0.01",
                "--report",
                "--plot",
                str(plot),
                *calibration,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "most sensitive first" in out and "encoder.layer.1.output.dense" in out and "float" in out
    assert "mixed: the " in out and "layers at float, the rest at w8a8" in out
    groups = xml.dom.minidom.parse(str(plot)).getElementsByTagName("g")
    assert sum(g.getAttribute("id").startswith("patch_") for g in groups) >= 8  # a bar per layer, and a legend
    archive = tmp_path / "quantized.pt2"
    assert main(["quantize", "bert-tiny", "--options", "scheme=w8", "--target", "torch", "-o", str(archive)]) == 0
    assert "quantize" in capsys.readouterr().out and archive.is_file()
    assert main(["quantize", "bert-tiny", "--report"]) == 1
    assert "--report runs" in capsys.readouterr().err
    assert main(["quantize", "bert-tiny", "--plot", str(plot)]) == 1


def test_missing_inputs_for_a_user_model(model_file, capsys):
    assert main(["optimize", f"{model_file}:make"]) == 1
    assert "--example-input" in capsys.readouterr().err


def test_passes_and_pipeline_dump(capsys):
    assert main(["passes"]) == 0
    text = capsys.readouterr().out
    assert "fold-constants" in text and "option max-new-elements: int = 65536" in text and "named pipelines" in text
    assert main(["pipeline", "--dump", "default"]) == 0
    assert capsys.readouterr().out.strip() == (
        "remove-noops,fold-constants{max-new-elements=65536},fuse-norms{absorb=false},fold-conv-bn{mode=deploy},"
        "fuse-blocks{branches=true serial=true parallel=true min-width=0},fuse-attention,cse,dce,mark-epilogues"
    )


def test_pipeline_dump_of_a_file_keeps_every_table_and_reads_back(tmp_path, capsys):
    # It printed the passes only: [verify] and [instrument] were dropped.
    torch.save([torch.randn(2, 8)], tmp_path / "calib.pt")
    source = tmp_path / "p.toml"
    source.write_text(
        'passes = ["cleanup"]\n[target]\nname = "torch"\n[verify]\nmode = "each"\nrtol = 1e-3\n'
        '[instrument]\nprint-ir-after = "change"\n[calibration]\ndata = "calib.pt"\nbatches = 2\n'
    )
    assert main(["pipeline", "--dump", str(source)]) == 0
    dumped = capsys.readouterr().out
    assert '[verify]\nmode = "each"\nrtol = 0.001' in dumped and 'print-ir-after = ["change"]' in dumped
    assert '[calibration]\ndata = "calib.pt"\nbatches = 2' in dumped and 'name = "torch"' in dumped
    again = tmp_path / "again.toml"
    again.write_text(dumped)
    assert main(["pipeline", "--dump", str(again)]) == 0
    assert capsys.readouterr().out == dumped


def test_input_specs():
    assert parse_input_spec("1x3x4").shape == (1, 3, 4)
    tokens = parse_input_spec("2x5:int64:10-20")
    assert tokens.dtype == torch.int64 and tokens.min() >= 10 and tokens.max() < 20


def test_console_script_is_installed():
    done = subprocess.run(
        [sys.executable, "-m", "fxopt.cli", "pipeline", "--dump", "dce"], capture_output=True, text=True
    )
    assert done.returncode == 0 and done.stdout.strip() == "dce"


def test_users_see_fxopt_output_only_unless_they_ask_for_debug():
    # Every run printed torchao's failed .so loads, torch's pytree deprecations and TVM's "Fast mode segfaults"
    # (bert-tiny's embedding); --debug shows them.
    command = [sys.executable, "-m", "fxopt.cli", "optimize", "bert-tiny", "--dispatch", "tvm"]
    quiet = subprocess.run(command, capture_output=True, text=True)
    assert quiet.returncode == 0 and quiet.stderr == "" and "fxopt report: BertModel" in quiet.stdout
    # TVM's line needs a TVM build (seconds); the other libraries' lines show without one.
    debug = subprocess.run(
        command[:3] + ["--debug"] + command[3:5] + ["--target", "torch"], capture_output=True, text=True
    )
    assert debug.returncode == 0 and "torchao" in debug.stderr


def test_a_capture_error_is_not_preceded_by_torch_graph_dumps(tmp_path, capsys):
    (tmp_path / "branchy.py").write_text(
        "import torch\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
        "        return x[: x.nonzero().shape[0]] * int(x.sum() > 0)\n"
        "def make():\n    return M(), (torch.randn(4, 3),)\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "fxopt.cli", "optimize", f"{tmp_path / 'branchy.py'}:make"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("fxopt: error: cannot capture M:")


def test_optimize_exports_a_library_and_kernel_source(model_file, tmp_path, capsys):
    import fxopt

    lib, source = tmp_path / "lib", tmp_path / "kernels.ll"
    assert (
        main(
            [
                "optimize",
                f"{model_file}:make",
                "-i",
                "2x8",
                "--dispatch",
                "tvm",
                "--export",
                str(lib),
                "--kernel-source",
                str(source),
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "backend: tvm" in text and "segments (measured" in text and "fxopt.load" in text
    assert "define" in source.read_text()
    assert fxopt.load(lib)(torch.randn(2, 8)).shape == (2, 8)


def test_tune_command_reports_the_database_and_distills_it(model_file, tmp_path, capsys):
    database, shipped = tmp_path / "db", tmp_path / "shipped"
    assert (
        main(
            [
                "tune",
                f"{model_file}:make",
                "-i",
                "2x8",
                "--budget",
                "1",
                "--database",
                str(database),
                "--distill",
                str(shipped),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert f"database {database}" in out and f"kernels into {shipped}" in out
    assert (shipped / "database_tuning_record.json.gz").exists()


def test_ctrl_c_during_tune_says_what_was_kept(model_file, tmp_path):
    # Ctrl-C reaches the whole process group: ~117 lines of tracebacks from the builder workers and fxopt before.
    import os
    import signal
    import time

    database = tmp_path / "db"
    records = database / "database_tuning_record.json"
    # The model's GEMM (64x8x8) already timed: Ctrl-C comes during MetaSchedule's rounds, as soon as it can.
    host = Isa.of(parse_target("cpu"))
    database.mkdir()
    TemplateChoices({("gemm_f32", (64, 8, 8)): Choice(GEMM_F32.default((64, 8, 8), host), 1.0)}).save(database)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fxopt.cli",
            "tune",
            f"{model_file}:make",
            "-i",
            "64x8",
            "--budget",
            "400",
            "--database",
            str(database),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while not (records.exists() and records.read_text().count("\n") >= 1):  # inside a round
            assert process.poll() is None and time.monotonic() < deadline, "tuning made no records"
            time.sleep(0.5)
        os.killpg(process.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    kept = records.read_text().count("\n")
    assert process.returncode == 130, err
    assert err.strip() == f"fxopt: interrupted: {kept} tuning records kept in {database}", err


def test_remote_tuning_needs_a_budget_and_a_key(model_file, capsys):
    assert main(["optimize", f"{model_file}:make", "-i", "2x8", "--rpc", "localhost:9190"]) == 1
    assert "add --tune BUDGET" in capsys.readouterr().err
    assert main(["tune", f"{model_file}:make", "-i", "2x8", "--rpc", "localhost"]) == 1
    assert "rpc='HOST:PORT' and a device_key" in capsys.readouterr().err
