"""Tuning databases on disk: one directory per target, seeded from shipped records, repaired before use.

A database is MetaSchedule's two JSON-lines files. A line that is not an entry (half written by a killed process,
truncated, edited) is dropped before TVM reads the files; a database TVM still cannot read is moved aside with a
warning: a build never fails because of the cache. :func:`distill_database` keeps the best record per kernel, the
form fxopt ships in ``fxopt/codegen/records/``.
"""

from __future__ import annotations

import gzip
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fxopt.errors import first_line
from fxopt.log import native_stderr_to_debug
from fxopt.targets import Target, host_cpu

__all__ = [
    "target_key",
    "database_dir",
    "distill_database",
    "existing_database",
    "checked_database",
    "load_database",
    "repair_database",
    "valid_lines",
    "RECORDS_FILE",
    "WORKLOADS_FILE",
    "TEMPLATES_FILE",
    "BLOCKS_FILE",
    "SHIPPED_RECORDS",
]

logger = logging.getLogger("fxopt.codegen.tune")

RECORDS_FILE = "database_tuning_record.json"
WORKLOADS_FILE = "database_workload.json"
TEMPLATES_FILE = "templates.json"  # fxopt's template parameters (fxopt.codegen.templates), beside MetaSchedule's
BLOCKS_FILE = "blocks.json"  # convolution times per block pair (fxopt.codegen.block_costs)
SHIPPED_RECORDS = Path(__file__).parent / "records"


def target_key(target: Target) -> str:
    """The database directory name of a target: what makes tuned schedules transferable."""
    if target.kind == "cuda":
        return f"cuda-{target.resolved().arch}"
    if target.arch:
        return f"llvm-{target.arch}-{target.cores}c"
    return f"llvm-{target.mcpu or host_cpu().mcpu}-{target.cores}c"


def database_dir(target: Target, override: Path | None = None) -> Path:
    """Where ``target``'s tuning database lives: ``override``, or the target's directory in the cache
    (created, and seeded from shipped records, on first use)."""
    if override is not None:
        path = Path(override)
        path.mkdir(parents=True, exist_ok=True)
        return path
    root = Path(os.environ.get("FXOPT_CACHE_DIR", Path.home() / ".cache" / "fxopt"))
    path = root / "tuning" / target_key(target)
    path.mkdir(parents=True, exist_ok=True)
    shipped = SHIPPED_RECORDS / target_key(target)
    if shipped.is_dir() and not (path / RECORDS_FILE).exists():
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            with gzip.open(shipped / f"{name}.gz", "rb") as source, (path / name).open("wb") as destination:
                shutil.copyfileobj(source, destination)
        if (shipped / TEMPLATES_FILE).exists() and not (path / TEMPLATES_FILE).exists():
            shutil.copyfile(shipped / TEMPLATES_FILE, path / TEMPLATES_FILE)
    return path


def distill_database(source: Path, destination: Path) -> int:
    """Write the best record of every tuned kernel in database ``source`` to ``destination``, gzip-compressed,
    and its template parameters (already one per kernel shape) as they are.

    This is the form of shipped records: tune the benchmark models for a target,
    then distill into ``fxopt/codegen/records/<target key>``. Returns the number
    of kernels kept.
    """
    source, destination = Path(source), Path(destination)
    repair_database(source)
    workloads = valid_lines(source / WORKLOADS_FILE, _is_workload)
    best: dict[int, tuple[float, list]] = {}
    for line in valid_lines(source / RECORDS_FILE, lambda entry: _is_record(entry, len(workloads))):
        workload, record = json.loads(line)
        seconds = [float(s) for s in record[1] or ()]
        mean = sum(seconds) / len(seconds) if seconds else math.inf
        if mean < best.get(workload, (math.inf,))[0]:
            best[workload] = mean, record
    destination.mkdir(parents=True, exist_ok=True)
    if (source / TEMPLATES_FILE).exists():
        shutil.copyfile(source / TEMPLATES_FILE, destination / TEMPLATES_FILE)
    kept = sorted(best)
    with gzip.open(destination / f"{WORKLOADS_FILE}.gz", "wt") as out:
        out.writelines(f"{workloads[i]}\n" for i in kept)
    with gzip.open(destination / f"{RECORDS_FILE}.gz", "wt") as out:
        out.writelines(f"{json.dumps([new, best[old][1]], separators=(',', ':'))}\n" for new, old in enumerate(kept))
    return len(kept)


def existing_database(target: Target) -> Path | None:
    """The target's database directory if it holds usable tuning records or template parameters (tuned earlier, or
    shipped), else ``None``.

    A build never fails because of the cache: an unwritable cache directory or a database TVM cannot read
    is reported as a warning and the kernels get default schedules.
    """
    if target.kind == "cuda" and target.arch is None:
        return None
    try:
        path = database_dir(target)
    except OSError as exc:
        logger.warning(
            "fxopt: warning: tuning cache unusable (%s: %s); building with untuned schedules, nothing "
            "is cached (set FXOPT_CACHE_DIR to a writable directory)",
            exc.filename,
            exc.strerror,
        )
        return None
    if not (path / RECORDS_FILE).exists():
        return path if (path / TEMPLATES_FILE).exists() else None
    from filelock import FileLock

    with FileLock(str(path / "lock")):
        return path if checked_database(path) else None


def checked_database(path: Path) -> bool:
    """Repair database ``path`` (see :func:`repair_database`) and check that TVM loads it; one it cannot load
    is moved aside (``*.broken``) so that later builds and tuning start afresh. Warns naming the files."""

    dropped = repair_database(path)
    if dropped:
        logger.warning(
            "fxopt: warning: tuning database %s: dropped %d malformed line%s", path, dropped, "s" * (dropped != 1)
        )
    try:
        load_database(path)
    except Exception as exc:  # TVM's parser rejects a line the shape checks let through
        for name in (WORKLOADS_FILE, RECORDS_FILE):
            if (path / name).exists():
                (path / name).replace(path / f"{name}.broken")
        logger.warning(
            "fxopt: warning: tuning database %s cannot be read (%s); moved aside as *.broken, continuing without it",
            path,
            first_line(exc)[:200],
        )
        return False
    return True


_loaded: dict[Path, tuple[tuple, object]] = {}


def load_database(path: Path):
    """TVM's ``JSONDatabase`` of ``path``, parsed once while its files stay unchanged: checking a database before
    a build and applying it in the build read the same files (BERT-base's: 0.5 s each)."""
    from tvm.s_tir import meta_schedule as ms

    files = (path / WORKLOADS_FILE, path / RECORDS_FILE)
    state = tuple((f.stat().st_mtime_ns, f.stat().st_size) if f.exists() else None for f in files)
    loaded = _loaded.get(path)
    if loaded is None or loaded[0] != state:
        with native_stderr_to_debug("tvm"):
            database = ms.database.JSONDatabase(work_dir=str(path))
        _loaded.clear()  # one database at a time: the target being built
        _loaded[path] = loaded = state, database
    return loaded[1]


def repair_database(path: Path) -> int:
    """Drop lines that are not database entries (half-written by a killed process, edited, truncated) and records
    whose workload is gone. Returns the number of lines dropped."""
    workloads_file, records_file = path / WORKLOADS_FILE, path / RECORDS_FILE
    dropped = 0
    workloads = valid_lines(workloads_file, _is_workload)
    dropped += _rewrite_if_changed(workloads_file, workloads)
    records = valid_lines(records_file, lambda entry: _is_record(entry, len(workloads)))
    dropped += _rewrite_if_changed(records_file, records)
    return dropped


def valid_lines(file: Path, valid: Callable[[object], bool]) -> list[str]:
    if not file.exists():
        return []
    kept = []
    for line in file.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if valid(entry):
            kept.append(line)
    return kept


def _is_workload(entry: object) -> bool:
    """``[structural hash, module]``, as MetaSchedule's JSONDatabase writes them."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(e, str) for e in entry)


def _is_record(entry: object, workloads: int) -> bool:
    """``[workload index, [trace, run seconds, target, argument info]]``."""
    if not (isinstance(entry, list) and len(entry) == 2 and type(entry[0]) is int and 0 <= entry[0] < workloads):
        return False
    record = entry[1]
    return (
        isinstance(record, list)
        and len(record) == 4
        and isinstance(record[0], list)
        and (record[1] is None or isinstance(record[1], list) and all(isinstance(s, (int, float)) for s in record[1]))
        and isinstance(record[2], dict)
        and isinstance(record[3], list)
    )


def _rewrite_if_changed(file: Path, lines: list[str]) -> int:
    if not file.exists():
        return 0
    before = file.read_text(errors="replace").splitlines()
    if before == lines:
        return 0
    tmp = file.with_suffix(".tmp")
    tmp.write_text("".join(f"{line}\n" for line in lines))
    tmp.replace(file)
    return len(before) - len(lines)
