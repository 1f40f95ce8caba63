import pytest

from fxopt import FxoptError, parse_target
from fxopt.targets import TARGETS, _cache_bytes


def test_targets_parse_from_short_strings():
    assert parse_target("cpu").kind == "llvm"
    cuda = parse_target("cuda:sm_90")
    assert cuda.kind == "cuda" and cuda.arch == "sm_90" and str(cuda) == "cuda:sm_90"
    assert parse_target("aarch64").arch == "aarch64-linux-gnu"
    for target in TARGETS.values():
        assert target.default_pipeline  # every target names its default pipeline


@pytest.mark.parametrize(
    "spec, message", [("cdua", "did you mean 'cuda'"), ("cpu:sm_90", "only cuda"), ("cuda:90", "only cuda")]
)
def test_bad_targets(spec, message):
    with pytest.raises(FxoptError, match=message):
        parse_target(spec)


def _sysfs_cache(root, index: int, level: int, kind: str, size: str) -> None:
    folder = root / f"index{index}"
    folder.mkdir()
    for name, text in (("level", f"{level}\n"), ("type", f"{kind}\n"), ("size", f"{size}\n")):
        (folder / name).write_text(text)


@pytest.mark.parametrize("size, expected", [("512K", 512 << 10), ("1024K", 1 << 20), ("2M", 2 << 20)])
def test_the_l2_size_is_read_from_sysfs(tmp_path, size, expected):
    _sysfs_cache(tmp_path, 0, 1, "Data", "32K")
    _sysfs_cache(tmp_path, 1, 1, "Instruction", "32K")
    _sysfs_cache(tmp_path, 2, 2, "Unified", size)
    _sysfs_cache(tmp_path, 3, 3, "Unified", "32768K")
    assert _cache_bytes(2, tmp_path) == expected
    assert _cache_bytes(1, tmp_path) == 32 << 10  # the data cache, not the instruction cache
    assert _cache_bytes(4, tmp_path) is None and _cache_bytes(2, tmp_path / "missing") is None
