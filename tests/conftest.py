"""Shared test configuration: hypothesis profiles and device markers."""

import os
import warnings

import pytest
import torch
from hypothesis import HealthCheck, settings

warnings.filterwarnings("ignore", category=FutureWarning)

# "ci": fast, runs on every submission. "thorough": long runs, HYPOTHESIS_PROFILE=thorough pytest tests/property
settings.register_profile(
    "ci", max_examples=12, deadline=None, derandomize=True, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "thorough", max_examples=400, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


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
    import fxopt.codegen.tune

    monkeypatch.setenv("FXOPT_CACHE_DIR", str(tmp_path_factory.mktemp("fxopt-cache")))
    monkeypatch.setattr(fxopt.codegen.tune, "SHIPPED_RECORDS", tmp_path_factory.mktemp("no-shipped-records"))
