"""Shared test configuration: hypothesis profiles and seed, device markers, the private tuning cache."""

import os
import subprocess
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, Phase, settings

warnings.filterwarnings("ignore", category=FutureWarning)

# "ci": fast, runs on every submission, new examples each commit (see pytest_configure). "thorough": long runs,
# HYPOTHESIS_PROFILE=thorough pytest tests/property
settings.register_profile(
    "ci",
    max_examples=12,
    deadline=None,
    print_blob=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],  # no "explain": minutes
)
settings.register_profile(
    "thorough",
    max_examples=400,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_configure(config):
    """Seed hypothesis from the commit (a rerun of one commit draws the same examples; each commit new ones),
    unless --hypothesis-seed or HYPOTHESIS_SEED names one."""
    import hypothesis.core

    seed = getattr(config, "workerinput", {}).get("fxopt_hypothesis_seed")  # an xdist worker: the controller's
    seed = seed or config.getoption("hypothesis_seed", None) or os.environ.get("HYPOTHESIS_SEED")
    if seed is None:
        try:
            head = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, check=True
            ).stdout
            seed = int(head[:8], 16)
        except (OSError, subprocess.CalledProcessError, ValueError):
            import time

            seed = int(time.time())
    config.fxopt_hypothesis_seed = int(seed)
    hypothesis.core.global_force_seed = int(seed)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist: every worker draws with the seed the controller prints (the clock is no seed to share)."""
    node.workerinput["fxopt_hypothesis_seed"] = node.config.fxopt_hypothesis_seed


def _seed_line(config) -> str:
    seed = config.fxopt_hypothesis_seed
    return (
        f"hypothesis profile {os.environ.get('HYPOTHESIS_PROFILE', 'ci')}, seed {seed} "
        f"(reproduce: HYPOTHESIS_SEED={seed} python -m pytest ...)"
    )


def pytest_report_header(config):
    return _seed_line(config)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    terminalreporter.write_line(_seed_line(config))  # also under -q, which prints no header


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def private_tuning_cache(tmp_path_factory, monkeypatch):
    """Every test gets an empty tuning cache: no records from the user's machine, another test, or the package."""
    import fxopt.codegen.tuning_database

    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.mktemp("fxopt-cache")))
    monkeypatch.setattr(fxopt.codegen.tuning_database, "SHIPPED_RECORDS", tmp_path_factory.mktemp("no-shipped-records"))
