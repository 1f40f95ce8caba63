import pytest

import fxopt.targets
from fxopt import FxoptError, parse_target
from fxopt.codegen.isa import DEFAULT_L2_BYTES, Isa
from fxopt.codegen.tuning_database import target_key
from fxopt.targets import TARGETS, _cache_bytes, _llvm_feature_name, host_cpu, request_amx


def test_targets_parse_from_short_strings():
    assert parse_target("cpu").kind == "llvm"
    cuda = parse_target("cuda:sm_90")
    assert cuda.kind == "cuda" and cuda.arch == "sm_90" and str(cuda) == "cuda:sm_90"
    assert parse_target("aarch64").arch == "aarch64-linux-gnu"
    for target in TARGETS.values():
        assert target.default_pipeline  # every target names its default pipeline


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cdua", "did you mean 'cuda'"),
        ("aarch64:sm_90", "only cuda and cpu take"),
        ("cuda:90", "written like cuda:sm_90"),
    ],
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


@pytest.mark.parametrize(
    "spec, mcpu, text",
    [
        ("cpu:avx2", "x86-64-v3", "cpu:avx2"),
        ("cpu:avx512", "x86-64-v4", "cpu:avx512"),
        ("cpu:znver4", "znver4", "cpu:znver4"),
        ("x86_64:sapphirerapids", "sapphirerapids", "cpu:sapphirerapids"),
    ],
)
def test_a_cpu_target_names_an_isa_or_an_llvm_cpu(spec, mcpu, text):
    target = parse_target(spec)
    assert target.kind == "llvm" and target.mcpu == mcpu and target.arch is None
    assert str(target) == text and parse_target(str(target)) == target  # as an export's manifest stores it
    assert target.tvm().attrs["mcpu"] == mcpu


@pytest.mark.parametrize(
    "spec, message",
    [
        ("cpu:znver9", "neither an ISA level .* nor an x86 CPU LLVM knows; did you mean 'znver.'"),
        ("cpu:avx1024", "neither an ISA level"),
        ("x86_64", "names a CPU, written like x86_64:znver4"),
    ],
)
def test_a_cpu_target_naming_no_cpu_llvm_knows_is_refused(spec, message):
    with pytest.raises(FxoptError, match=message):
        parse_target(spec)


def test_a_named_cpu_runs_here_only_if_this_cpu_has_its_vector_extensions():
    host = set(host_cpu().features)
    avx512 = parse_target("cpu:avx512")
    assert avx512.missing_features() == sorted({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"} - host)
    assert avx512.is_cross == bool(avx512.missing_features())
    assert "cross-compiled: this CPU lacks" in avx512.describe() or not avx512.is_cross
    assert not parse_target("cpu").is_cross and parse_target("aarch64").is_cross


@pytest.mark.parametrize(
    "flag, llvm",
    [("avx512_vnni", "avx512vnni"), ("avx_vnni", "avxvnni"), ("amx_int8", "amx-int8"), ("asimddp", "dotprod")],
)
def test_the_oss_cpu_flags_are_read_in_llvms_names(flag, llvm):
    assert _llvm_feature_name(flag) == llvm


@pytest.mark.parametrize(
    "spec, lanes, registers, l2, features",
    [
        ("x86_64:znver3", 8, 16, 512 << 10, {"fma", "avx2"}),
        ("x86_64:znver4", 16, 32, 1 << 20, {"fma", "avx2", "avx512", "vnni", "avx512_bf16"}),
        (
            "x86_64:sapphirerapids",
            16,
            32,
            2 << 20,
            {"fma", "avx2", "avx512", "vnni", "avx512_bf16", "amx_int8", "amx_bf16"},
        ),
        ("cpu:avx512", 16, 32, DEFAULT_L2_BYTES, {"fma", "avx2", "avx512"}),
        ("aarch64", 4, 32, DEFAULT_L2_BYTES, {"fma", "neon"}),
    ],
)
def test_the_isa_of_a_named_target_is_the_same_on_every_host(spec, lanes, registers, l2, features):
    isa = Isa.named(spec)
    assert (isa.lanes(), isa.lanes(8), isa.vector_registers, isa.l2_bytes) == (lanes, lanes * 4, registers, l2)
    flags = ("fma", "avx2", "avx512", "vnni", "avx512_bf16", "amx_int8", "amx_bf16", "neon", "neon_dot")
    assert {flag for flag in flags if getattr(isa, flag)} == features


def test_the_hosts_isa_is_what_the_os_reports():
    isa, cpu = Isa.of(parse_target("cpu")), host_cpu()
    assert (isa.name, isa.vector_bits, isa.cores, isa.l2_bytes) == (cpu.mcpu, cpu.vector_bits, cpu.cores, cpu.l2_bytes)
    assert isa.features == frozenset(cpu.features)
    with pytest.raises(FxoptError, match="'cuda:sm_90' is not a CPU target"):
        Isa.of(parse_target("cuda:sm_90"))


@pytest.mark.parametrize("permitted", [True, False])
def test_the_host_has_amx_only_where_linux_lets_this_process_use_it(permitted, monkeypatch):
    flags = {"avx2", "avx512f", "avx512_vnni", "amx_tile", "amx_int8", "amx_bf16"}
    monkeypatch.setattr(fxopt.targets, "_cpu_flags", lambda: flags)
    monkeypatch.setattr(fxopt.targets, "request_amx", lambda: permitted)
    host_cpu.cache_clear()
    try:
        features = set(host_cpu().features)
    finally:
        host_cpu.cache_clear()
    amx = {"amx-tile", "amx-int8", "amx-bf16"}
    assert features & amx == (amx if permitted else set()) and {"avx2", "avx512vnni"} <= features


def test_linux_lets_a_process_use_amx_only_on_a_cpu_with_it():
    assert request_amx() == ("amx-tile" in host_cpu().features)


def test_a_named_isa_has_a_tuning_database_of_its_own():
    assert target_key(parse_target("cpu:avx512")) == f"llvm-x86-64-v4-{host_cpu().cores}c"
    assert target_key(parse_target("cpu")) == f"llvm-{host_cpu().mcpu}-{host_cpu().cores}c"
