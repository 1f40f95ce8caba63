"""MetaSchedule tuning: budgets, the persistent database, reuse, and surviving a killed run."""

import dataclasses
import gzip
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fxopt
import fxopt.codegen.tune as tune_module
import fxopt.codegen.tuning_database as tuning_database
from fxopt import CodegenError
from fxopt.codegen.isa import Isa
from fxopt.codegen.kernels.gemm_f32 import GEMM_F32
from fxopt.codegen.tune import TuneOptions, parse_budget
from fxopt.codegen.tuning_database import database_dir, distill_database, repair_database, target_key
from fxopt.targets import parse_target


class Tiny(torch.nn.Module):
    def forward(self, x, weight):
        # A matmul of two inputs: MetaSchedule has it (a constant operand would make it the hand GEMM).
        return torch.relu(x @ weight)


ARGS = (torch.randn(8, 64), torch.randn(64, 60) / 8)


def test_budgets_parse():
    assert parse_budget(200) == (200, None) and parse_budget("200") == (200, None)
    assert parse_budget("90s") == (None, 90) and parse_budget("5m") == (None, 300)
    for bad in ("0", "ten", "1.5", -3):
        with pytest.raises(CodegenError, match="budget"):
            parse_budget(bad)
    assert TuneOptions.coerce(None) is None and TuneOptions.coerce(True) == TuneOptions()


@pytest.fixture
def unnamed_handler_on_metaschedule_logger():
    """What pytest's log capture leaves behind; MetaSchedule's own logging setup crashed on it."""
    logger, handler = logging.getLogger("tvm.s_tir.meta_schedule"), logging.NullHandler()
    logger.addHandler(handler)
    yield
    logger.removeHandler(handler)


@pytest.mark.usefixtures("unnamed_handler_on_metaschedule_logger")
def test_tuning_writes_the_database_and_a_second_run_reuses_it(tmp_path):
    options = TuneOptions(trials=16, trials_per_kernel=16, database=tmp_path)
    progress = []
    first = fxopt.optimize(Tiny(), ARGS, target="cpu", tune=options, progress=lambda i, n, s: progress.append(s))
    summary = first._latest()[0].tuning
    # Candidates that fail to build are not records, so a round of 16 may keep fewer.
    assert 0 < summary.new_trials <= 16 and summary.database_dir == tmp_path
    assert any(s.startswith("tune fused_matmul") and "best" in s for s in progress)
    assert (tmp_path / "database_tuning_record.json").read_text().count("\n") == summary.new_trials
    assert "tuning: 1 kernel, 1 with tuned schedules" in str(first.report())

    options = TuneOptions(trials=16, trials_per_kernel=summary.new_trials, database=tmp_path)
    second = fxopt.optimize(Tiny(), ARGS, target="cpu", tune=options)
    assert second._latest()[0].tuning.new_trials == 0  # every kernel already has its trials
    torch.testing.assert_close(second(*ARGS), Tiny.forward(second._model, *ARGS))

    # The records are applied: the kernel is the tuned one, in a build that tunes and in one that does not but
    # finds them in the target's database (the conftest's cache holds none before they are copied there).
    def kernels(optimized) -> str:  # LLVM IR, but for the addresses of TVM's objects in its alias metadata
        return re.sub(r"0x[0-9a-f]+", "0x", optimized.kernel_source())

    untuned = kernels(fxopt.optimize(Tiny(), ARGS, target="cpu", dispatch="tvm"))
    shutil.copytree(tmp_path, database_dir(parse_target("cpu").resolved()), dirs_exist_ok=True)
    reused = kernels(fxopt.optimize(Tiny(), ARGS, target="cpu", dispatch="tvm"))
    assert kernels(first) == kernels(second) == reused != untuned


def test_distilled_records_keep_the_best_per_kernel_and_seed_new_databases(tmp_path, monkeypatch):
    source = tmp_path / "tuned"
    source.mkdir()
    (source / "database_workload.json").write_text('["1", "a"]\n["2", "b"]\n["3", "c"]\n')
    (source / "database_tuning_record.json").write_text(
        '[0, [["slow"], [3.0, 3.0], {}, []]]\n[0, [["fast"], [1.0, 2.0], {}, []]]\n[2, [["only"], [5.0], {}, []]]\n'
    )
    templates = '{"gemm_f32": {"128x768x768": {"rows": 6, "vectors": 2, "lanes": 8, "panels_per_task": 2, "us": 9}}}'
    (source / "templates.json").write_text(templates)
    target = parse_target("cpu")
    shipped = tmp_path / "records"
    assert distill_database(source, shipped / target_key(target)) == 2  # workload "b" has no record
    monkeypatch.setattr(tuning_database, "SHIPPED_RECORDS", shipped)
    seeded = database_dir(target)  # a fresh cache (see conftest): seeded from the shipped records
    assert seeded != source and (seeded / "database_workload.json").read_text() == '["1", "a"]\n["3", "c"]\n'
    records = [json.loads(line) for line in (seeded / "database_tuning_record.json").read_text().splitlines()]
    assert records == [[0, [["fast"], [1.0, 2.0], {}, []]], [1, [["only"], [5.0], {}, []]]]
    assert (seeded / "templates.json").read_text() == templates  # the kernel families' configs as they are


PACKAGED_RECORDS = sorted((Path(tune_module.__file__).parent / "records").glob("*"))


@pytest.mark.parametrize("records", PACKAGED_RECORDS, ids=lambda path: path.name)
def test_packaged_records_load_as_a_metaschedule_database(records, tmp_path):
    from tvm.s_tir import meta_schedule as ms

    for name in ("database_workload.json", "database_tuning_record.json"):
        (tmp_path / name).write_bytes(gzip.decompress((records / f"{name}.gz").read_bytes()))
    assert repair_database(tmp_path) == 0  # every line is whole and names a shipped workload
    workloads = (tmp_path / "database_workload.json").read_text().count("\n")
    database = ms.database.JSONDatabase(work_dir=str(tmp_path))
    assert len(database) == workloads > 0  # one best record per kernel


RECORD = '[0, [[[], []], [0.001], {"kind": "llvm"}, []]]'


def test_repair_drops_half_written_and_malformed_lines(tmp_path):
    (tmp_path / "database_workload.json").write_text('["1", "a"]\n{"not": "a workload"}\n["2"]\n')
    (tmp_path / "database_tuning_record.json").write_text(
        f'{RECORD}\n[3, {{"y": 2}}]\n[0, [1, 2]]\n{{"x": 1}}\ngarbage\n[0, {{"tru'
    )
    # the half-written, garbage and wrong-shape lines, and the record of a missing workload
    assert repair_database(tmp_path) == 7
    assert (tmp_path / "database_workload.json").read_text() == '["1", "a"]\n'
    assert (tmp_path / "database_tuning_record.json").read_text() == f"{RECORD}\n"


def _seeded_with(tmp_path, monkeypatch, **bad_lines):
    """The target's cache database holding real records (the package's), then ``bad_lines`` appended (by file)."""
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    path = database_dir(parse_target("cpu"))
    packaged = next((Path(tune_module.__file__).parent / "records").iterdir())
    for name in ("database_workload.json", "database_tuning_record.json"):
        with gzip.open(packaged / f"{name}.gz", "rt") as source:
            (path / name).write_text(source.read())
    for name, line in bad_lines.items():
        with (path / f"database_{name}.json").open("a") as file:
            file.write(line)
    return path


@pytest.mark.parametrize(
    "bad_lines",
    [
        {"tuning_record": '[0, [[[["GetSBlock", [], ["T_'},  # truncated
        {"tuning_record": "\x00\x7fgarbage\n"},
        {"tuning_record": "[0, [1, 2, 3]]\n"},  # valid JSON, wrong shape: TVM raised InternalError on it
        {"workload": '["123"]\n'},
    ],
)
def test_a_damaged_database_never_fails_a_build(tmp_path, monkeypatch, caplog, bad_lines):
    # An untuned build that opened it failed with "TVM failed to build ... Unexpected token", and tuning raised.
    path = _seeded_with(tmp_path, monkeypatch, **bad_lines)
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        untuned = fxopt.optimize(Tiny(), ARGS, target="cpu", dispatch="tvm")
    assert untuned.report().backend == "tvm"
    assert f"tuning database {path}: dropped 1 malformed line" in caplog.text
    _seeded_with(tmp_path, monkeypatch, **bad_lines)
    # No trial to run: only opening the database is tested here (tuning itself is, above).
    assert " 0 new trials" in fxopt.optimize(Tiny(), ARGS, target="cpu", tune=TuneOptions(trials=0)).report().tuning


def test_a_database_tvm_cannot_read_is_moved_aside(tmp_path, monkeypatch, caplog):
    path = _seeded_with(tmp_path, monkeypatch)
    records = path / "database_tuning_record.json"
    entry = json.loads(records.read_text().splitlines()[0])
    entry[1][0] = [["NoSuchInstruction", [], [], []]]  # passes the shape checks; TVM's parser rejects it
    records.write_text(json.dumps(entry) + "\n")
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        assert fxopt.optimize(Tiny(), ARGS, target="cpu", dispatch="tvm").report().backend == "tvm"
    assert "cannot be read" in caplog.text and (path / "database_tuning_record.json.broken").exists()


def test_an_unwritable_cache_still_builds_untuned(tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(blocker))
    with caplog.at_level(logging.WARNING, logger="fxopt"):
        assert fxopt.optimize(Tiny(), ARGS, target="cpu", dispatch="tvm").report().backend == "tvm"
    assert "tuning cache unusable" in caplog.text and "nothing is cached" in caplog.text
    with pytest.raises(CodegenError, match="tuning cache"):
        fxopt.optimize(Tiny(), ARGS, target="cpu", tune=16)


def test_the_default_database_is_per_target_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    path = database_dir(parse_target("cpu"))
    assert path.parent == tmp_path / "tuning" and path.name.startswith("llvm-")
    assert database_dir(parse_target("cuda:sm_80")).name == "cuda-sm_80"


@pytest.mark.slow  # 40 s of tuning to kill; the Ctrl-C test in tests/cli covers stopping a run in CI
def test_a_killed_tuning_run_leaves_a_usable_database(tmp_path):
    script = textwrap.dedent(f"""
        import torch, fxopt
        from tests.codegen.test_tune import Tiny, ARGS
        fxopt.optimize(Tiny(), ARGS, target="cpu", tune=fxopt.TuneOptions(trials=400, trials_per_kernel=400,
                       database={str(tmp_path)!r}))
    """)
    records = tmp_path / "database_tuning_record.json"
    process = subprocess.Popen([sys.executable, "-c", script], cwd=os.getcwd(), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (records.exists() and records.read_text().count("\n") >= 16):
            assert process.poll() is None and time.monotonic() < deadline, "tuning made no records"
            time.sleep(0.5)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with records.open("a") as f:
        f.write('[0, [["half-written')  # what a kill in the middle of a write leaves
    kept = records.read_text().count("\n")

    resumed = fxopt.optimize(Tiny(), ARGS, target="cpu", tune=TuneOptions(trials_per_kernel=kept, database=tmp_path))
    summary = resumed._latest()[0].tuning
    assert summary.kernels[0].trials_before == kept and summary.new_trials == 0
    assert summary.kernels[0].best_us is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def loopback_tracker(tmp_path):
    """A local RPC tracker with one server registered under the key 'loopback', as a device fleet would be."""
    from tvm import rpc

    port, server_port = _free_port(), _free_port()
    log = (tmp_path / "server.log").open("w")
    # Each in a session of its own, stopped as a group: the server's popen workers outlived a kill of the server.
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tvm.exec.rpc_tracker",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--port-end",
                str(port + 1),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        ),
    ]
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                tracker = rpc.connect_tracker("127.0.0.1", port)
                break
            except Exception:  # not listening yet
                assert time.monotonic() < deadline, "the RPC tracker did not start"
                time.sleep(0.5)
        processes.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tvm.exec.rpc_server",
                    "--tracker",
                    f"127.0.0.1:{port}",
                    "--key",
                    "loopback",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(server_port),
                    "--port-end",
                    str(server_port + 1),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )
        while "loopback" not in tracker.text_summary():
            assert time.monotonic() < deadline, "the RPC server did not register with the tracker"
            time.sleep(0.5)
        yield f"127.0.0.1:{port}", tmp_path / "server.log"
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        assert not _processes_in_groups({p.pid for p in processes}), "a tracker or server process outlived the test"


def _processes_in_groups(groups: set[int]) -> list[int]:
    import psutil

    left = []
    deadline = time.monotonic() + 10  # a killed group's members exit asynchronously
    while True:
        left = []
        for process in psutil.process_iter():
            try:
                if os.getpgid(process.pid) in groups and process.status() != psutil.STATUS_ZOMBIE:
                    left.append(process.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def test_remote_tuning_measures_on_the_device_behind_the_tracker(loopback_tracker, tmp_path, monkeypatch):
    address, server_log = loopback_tracker
    options = TuneOptions(trials=16, trials_per_kernel=16, database=tmp_path / "db", rpc=address, device_key="loopback")
    optimized = fxopt.optimize(Tiny(), ARGS, target="cpu", tune=options)
    summary = optimized._latest()[0].tuning
    assert 0 < summary.new_trials <= 16 and summary.kernels[0].best_us is not None
    loaded = server_log.read_text().count("load_module")
    assert loaded > 0  # the candidates really ran on the server
    torch.testing.assert_close(optimized(*ARGS), Tiny.forward(optimized._model, *ARGS))

    if not Isa.of(parse_target("cpu")).avx2:
        return
    # The hand GEMM's candidates too (two of them, twice each).
    space = GEMM_F32.space
    monkeypatch.setattr(GEMM_F32, "space", lambda workload, isa: space(workload, isa)[:2])
    linear = torch.nn.Linear(64, 40).eval()
    options = dataclasses.replace(options, trials=2)
    summary = fxopt.optimize(linear, ARGS[:1], target="cpu", tune=options)._latest()[0].tuning
    assert [(k.trials_after, k.best_us > 0) for k in summary.templates] == [(2, True)]
    assert server_log.read_text().count("load_module") >= loaded + 4


class TwoConvs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Conv2d(16, 16, 1)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


@pytest.mark.usefixtures("unnamed_handler_on_metaschedule_logger")
def test_tuning_times_each_convolution_at_other_blocks_and_the_next_build_searches_with_them(tmp_path, monkeypatch):
    from fxopt.codegen import block_costs

    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path))
    target = parse_target("cpu")
    lanes = Isa.of(target).lanes()
    model, args = TwoConvs().eval(), (torch.randn(1, 16, 10, 10),)
    tuned = fxopt.optimize(model, args, target="cpu", tune=TuneOptions(trials=200, trials_per_kernel=1))
    pairs = {(x, y) for x in (lanes // 2, lanes) for y in (lanes // 2, lanes)}  # 16 channels: both blocks divide
    database = database_dir(target.resolved())
    costs = block_costs.load(database)
    assert len(costs) == 2 and all(set(times) == pairs and min(times.values()) > 0 for times in costs.values())
    assert f"{2 * len(pairs)} convolution block pairs timed" in tuned.report().tuning
    # The next build hands them to convert-layout; the tuning run itself had none to search with.
    assert 'block-costs=""' in tuned.report().pipeline
    searched = fxopt.optimize(model, args, target="cpu")
    assert f"block-costs={database / 'blocks.json'}" in searched.report().pipeline
    with torch.no_grad():
        torch.testing.assert_close(searched(*args), model(*args), rtol=1e-4, atol=1e-4)


def test_the_block_pairs_timed_are_those_of_a_vector_and_half_of_one_that_divide_the_channels():
    from fxopt.codegen.block_costs import block_pairs
    from fxopt.codegen.kernels.conv2d_f32 import ConvShape

    avx512, avx2 = Isa.named("cpu:avx512"), Isa.named("cpu:avx2")
    conv = ConvShape(1, 64, 14, 14, 48, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 16, 16)
    assert set(block_pairs(conv, avx512)) == {(8, 8), (8, 16), (16, 8), (16, 16)}
    assert set(block_pairs(conv._replace(in_block=8, out_block=8), avx2)) == {(4, 4), (4, 8), (8, 4), (8, 8)}
    assert set(block_pairs(conv._replace(out_channels=24, out_block=8), avx512)) == {(8, 8), (16, 8)}
    rgb = conv._replace(channels=3, in_block=1)  # an image's blocks of one stay
    assert set(block_pairs(rgb, avx512)) == {(1, 8), (1, 16)}
    depthwise = conv._replace(out_channels=64, groups=64)
    assert set(block_pairs(depthwise, avx512)) == {(8, 8), (16, 16)}
