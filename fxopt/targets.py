"""Compilation targets, created from short strings: ``"torch"``, ``"cpu"``, ``"cpu:avx512"``,
``"x86_64:sapphirerapids"``, ``"cuda"``, ``"cuda:sm_90"``, ``"aarch64"``.

A :class:`Target` says which backend runs the model, on which PyTorch device,
with which default pipeline and tuning settings. ``"cpu"`` is the host CPU as
LLVM detects it (``mcpu``, cores, vector width); ``"cpu:NAME"`` (or
``"x86_64:NAME"``) builds for the CPU ``NAME`` names instead: an ISA level
(:data:`ISA_LEVELS`: ``avx2``, ``avx512``) or an LLVM CPU name (``znver4``,
``sapphirerapids``), from any host; such a build runs here only when this CPU
has every vector extension that CPU has, and is otherwise built and exported
only. ``"cuda"`` takes the architecture of the visible GPU, or an explicit one
(``"cuda:sm_90"``) to build kernels for a GPU this machine does not have;
``"aarch64"`` cross-builds for 64-bit Arm Linux (build and export only).

This module is the one reader of the host CPU (:func:`host_cpu`);
:func:`cpu_features` gives any CPU target's features in LLVM's names, which
:class:`fxopt.codegen.isa.Isa` turns into what kernels are built for.
"""

from __future__ import annotations

import ctypes
import difflib
import functools
import os
import platform
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fxopt.errors import FxoptError

__all__ = [
    "Target",
    "TARGETS",
    "ISA_LEVELS",
    "HostCPU",
    "host_cpu",
    "cpu_features",
    "vector_bits",
    "host_vector_bits",
    "usable_cores",
    "request_amx",
    "parse_target",
]


@dataclass(frozen=True)
class HostCPU:
    """What LLVM and the OS say about the CPU this process runs on; ``features`` in LLVM's names (``avx512vnni``,
    ``amx-int8``, ``neon``, ``dotprod``), as the OS reports them (a VM may hide some its CPU model has)."""

    mcpu: str
    cores: int
    vector_bits: int
    features: tuple[str, ...]
    #: One core's L2 cache (the OS's word; 256 KiB, the smallest of current x86 cores, where it says nothing).
    l2_bytes: int = 256 * 1024

    def __str__(self) -> str:
        return f"{self.mcpu}, {self.cores} cores, {self.vector_bits}-bit vectors"


_VECTOR_FEATURES = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("neon", 128), ("sse2", 128))


def vector_bits(features) -> int:
    """The widest vector registers a CPU with ``features`` (LLVM's names) has."""
    return next((bits for name, bits in _VECTOR_FEATURES if name in features), 128)


@functools.cache
def host_cpu() -> HostCPU:
    """Detect the host CPU (cached): LLVM's CPU name, the cores this process may use, the widest vector unit,
    the L2 cache."""
    from tvm.target import codegen  # TVM's compiler library: LLVM's name for this CPU

    flags = {_llvm_feature_name(flag) for flag in _cpu_flags()}
    if "amx-tile" in flags and not request_amx():
        flags = {flag for flag in flags if not flag.startswith("amx-")}  # the CPU has tiles; this process may not
    return HostCPU(
        str(codegen.llvm_get_system_cpu()),
        usable_cores(),
        host_vector_bits(),
        tuple(sorted(flags)),
        _cache_bytes(level=2) or HostCPU.l2_bytes,
    )


#: Linux's ``arch_prctl`` system call (x86-64), its request for an extended state component, and AMX's tile data
#: component (arch/x86/include/uapi/asm/prctl.h, fpu/types.h).
_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA = 158, 0x1023, 18


@functools.cache
def request_amx() -> bool:
    """Ask Linux (5.16 and later) to let this process use AMX tiles, which it must once before its first tile
    instruction (the CPU faults it otherwise); whether it may. Kernels with AMX tiles run only where it may: host
    detection leaves AMX out of the host's features otherwise, and every virtual machine asks before it runs."""
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0


def host_vector_bits() -> int:
    """The widest vector registers of the host CPU, from the OS's flags alone (without loading LLVM)."""
    return vector_bits({_llvm_feature_name(flag) for flag in _cpu_flags()})


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, else the machine's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _cache_bytes(level: int, caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int | None:
    """The size of CPU 0's data (or unified) cache of ``level`` as Linux's sysfs gives it, or None."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    for index in sorted(caches.glob("index*")):
        try:
            if int((index / "level").read_text()) != level or (index / "type").read_text().strip() == "Instruction":
                continue
            size = (index / "size").read_text().strip()
        except (OSError, ValueError):
            continue
        match = re.fullmatch(r"(\d+)([KMG]?)", size)
        if match:
            return int(match.group(1)) * units.get(match.group(2), 1)
    return None


#: /proc/cpuinfo's names that differ from LLVM's beyond underscores (Arm's "asimd" is NEON, "asimddp" its dot
#: product).
_CPUINFO_NAMES = {"asimd": "neon", "asimddp": "dotprod", "pni": "sse3", "sse4_1": "sse4.1", "sse4_2": "sse4.2"}


def _llvm_feature_name(flag: str) -> str:
    """A /proc/cpuinfo flag in LLVM's spelling: ``avx512_vnni`` → ``avx512vnni``, ``amx_int8`` → ``amx-int8``."""
    if flag in _CPUINFO_NAMES:
        return _CPUINFO_NAMES[flag]
    return flag.replace("amx_", "amx-").replace("_", "")


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


#: ISA levels a CPU target can name (``"cpu:avx512"``), as LLVM's generic x86-64 levels: the vector extensions
#: every CPU of the level has, tuned for none in particular.
ISA_LEVELS = {"avx2": "x86-64-v3", "avx512": "x86-64-v4"}

#: The vector extensions a build for a named CPU may use: it runs on this host only if the host has each that
#: the CPU has (other features, such as AMD's ``sse4a``, LLVM does not use for fxopt's kernels).
_VECTOR_EXTENSIONS = frozenset(
    ["avx", "avx2", "fma", "f16c", "avxvnni", "amx-tile", "amx-int8", "amx-bf16", "amx-fp16", "neon", "dotprod"]
    + ["avx512" + name for name in ("f", "bw", "dq", "vl", "cd", "vnni", "bf16", "fp16", "vbmi", "vbmi2", "ifma")]
    + ["avx512" + name for name in ("bitalg", "vpopcntdq")]
)


@dataclass(frozen=True)
class Target:
    """Where the optimized model runs.

    ``kind`` picks the backend: ``"torch"`` runs the optimized graph in PyTorch;
    ``"llvm"`` and ``"cuda"`` are TVM targets. ``device`` is the PyTorch device
    the model's tensors live on. ``default_pipeline`` names the built-in
    pipeline used when the caller gives none. ``arch`` is the CUDA
    architecture (``"sm_90"``) or, for cross CPU targets, the LLVM triple.
    ``mcpu``: for ``llvm`` targets, the CPU kernels are built for (an LLVM CPU
    name; ``None``: this host's). ``tuning`` holds the target's default tuning
    settings (trials per kernel, runs per measurement).
    """

    name: str
    kind: Literal["torch", "llvm", "cuda"]
    device: str
    default_pipeline: str
    arch: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    mcpu: str | None = None

    def __str__(self) -> str:
        if self.arch and self.kind == "cuda":
            return f"{self.name}:{self.arch}"
        if self.mcpu is not None:
            return f"{self.name}:{next((k for k, v in ISA_LEVELS.items() if v == self.mcpu), self.mcpu)}"
        return self.name

    @property
    def is_cross(self) -> bool:
        """Kernels built for this target cannot run on this machine."""
        if self.kind == "llvm":
            if self.arch is not None:
                return True
            return bool(self.missing_features())
        if self.kind == "cuda":
            import torch

            return not torch.cuda.is_available() or self.arch != _visible_cuda_arch()
        return False

    def missing_features(self) -> list[str]:
        """The vector extensions this CPU target's kernels may use that the host lacks (none for the host)."""
        if self.kind != "llvm" or self.mcpu is None:
            return []
        host = set(host_cpu().features)
        return sorted((cpu_features(self) & _VECTOR_EXTENSIONS) - host)

    def resolved(self) -> Target:
        """This target with what the host tells filled in (the CUDA arch of the visible GPU)."""
        if self.kind == "cuda" and self.arch is None:
            arch = _visible_cuda_arch()
            if arch is None:
                raise FxoptError(
                    "target 'cuda': no CUDA device is visible to detect the architecture from; "
                    "name it to cross-build (e.g. 'cuda:sm_90')"
                )
            return replace(self, arch=arch)
        return self

    @property
    def cores(self) -> int:
        """The cores kernels are built to run on: a cross target's own count, else this host's."""
        return int(self.tuning["cores"]) if self.arch is not None else host_cpu().cores

    def tvm(self):
        """The ``tvm.target.Target`` for this target (JSON-dict form, as TVM 0.27 requires)."""
        import tvm

        if self.kind == "llvm":
            if self.arch is None:
                llvm = {"kind": "llvm", "mcpu": self.mcpu or host_cpu().mcpu, "num-cores": self.cores}
                if self.mcpu is not None and not _host_is_x86():  # a named x86 CPU, from an Arm host
                    llvm["mtriple"] = "x86_64-linux-gnu"
                return tvm.target.Target(llvm)
            return tvm.target.Target(
                {"kind": "llvm", "mtriple": self.arch, "mattr": ["+neon"], "num-cores": self.cores}
            )
        if self.kind == "cuda":
            arch = self.resolved().arch
            host = {"kind": "llvm", "mcpu": host_cpu().mcpu, "num-cores": host_cpu().cores}
            return tvm.target.Target(
                {
                    "kind": "cuda",
                    "arch": arch,
                    "max_threads_per_block": 1024,
                    "max_shared_memory_per_block": 49152,
                    "thread_warp_size": 32,
                },
                host=host,
            )
        raise FxoptError(f"target '{self}' runs in PyTorch and has no TVM target")

    def describe(self) -> str:
        """One line for reports: the target and what was detected."""
        if self.kind == "llvm" and self.arch is None and self.mcpu is None:
            return f"{self.name} ({host_cpu()})"
        if self.kind == "llvm" and self.arch is None:
            missing = self.missing_features()
            where = f"cross-compiled: this CPU lacks {', '.join(missing)}" if missing else "runs on this CPU"
            return f"{self} ({self.mcpu}, {where})"
        if self.kind == "llvm":
            return f"{self.name} ({self.arch}, cross-compiled)"
        return str(self)


def cpu_features(target: Target) -> frozenset[str]:
    """The features of ``target``'s CPU in LLVM's names: the host's as the OS reports them, or those LLVM gives
    the named CPU (``mcpu``), or the cross triple's (``neon`` for aarch64)."""
    if target.kind != "llvm":
        raise FxoptError(f"target '{target}' is not a CPU target")
    if target.arch is None and target.mcpu is None:
        return frozenset(host_cpu().features)
    if target.arch is not None:
        return frozenset({"neon"} if target.arch.startswith("aarch64") else ())
    return _llvm_cpu_features(target.mcpu)


@functools.cache
def _llvm_cpu_features(mcpu: str) -> frozenset[str]:
    import tvm
    from tvm.target import codegen

    llvm = {"kind": "llvm", "mcpu": mcpu, "mtriple": "x86_64-linux-gnu"}
    return frozenset(str(f) for f in codegen.llvm_get_cpu_features(tvm.target.Target(llvm)))


@functools.cache
def _x86_cpu_names() -> frozenset[str]:
    """The x86 CPUs LLVM knows (``znver4``, ``sapphirerapids``, ``x86-64-v4``…)."""
    import tvm
    from tvm.target import codegen

    target = tvm.target.Target({"kind": "llvm", "mtriple": "x86_64-linux-gnu"})
    return frozenset(str(name) for name in codegen.llvm_get_cpu_archlist(target))


def _host_is_x86() -> bool:
    import platform

    return platform.machine().lower() in ("x86_64", "amd64")


def _visible_cuda_arch() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


# Trials per kernel: enough for MetaSchedule's evolutionary search to pass its
# random-sampling warm-up; GPUs have larger search spaces.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("torch", "torch", "cpu", "torch"),
        Target("cpu", "llvm", "cpu", "cpu", tuning={"trials_per_kernel": 64, "repeat": 3}),
        Target("cuda", "cuda", "cuda", "cuda", tuning={"trials_per_kernel": 128, "repeat": 10}),
        Target(
            "aarch64",
            "llvm",
            "cpu",
            "cpu",
            arch="aarch64-linux-gnu",
            tuning={"trials_per_kernel": 64, "repeat": 3, "cores": 4},
        ),
    ]
}


def parse_target(spec: str | Target) -> Target:
    """Turn ``"cuda:sm_90"``-style text into a :class:`Target`; unknown names get close suggestions."""
    if isinstance(spec, Target):
        return spec
    name, _, arch = str(spec).partition(":")
    if name == "x86_64":  # an x86 CPU by its LLVM name: the same target as cpu:NAME
        if not arch:
            raise FxoptError("target 'x86_64' names a CPU, written like x86_64:znver4 or x86_64:sapphirerapids")
        name = "cpu"
    if name not in TARGETS:
        close = difflib.get_close_matches(name, [*TARGETS, "x86_64"], n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FxoptError(f"unknown target '{spec}'{hint} (known: {', '.join(TARGETS)}, x86_64:CPU)")
    target = TARGETS[name]
    if not arch:
        return target
    if name == "cpu":
        return replace(target, mcpu=_cpu_name(spec, arch))
    if target.kind != "cuda":
        raise FxoptError(f"target '{spec}': only cuda and cpu take an architecture (cuda:sm_90, cpu:avx512)")
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise FxoptError(f"target '{spec}': a CUDA architecture is written like cuda:sm_90")
    return replace(target, arch=arch)


def _cpu_name(spec: str, name: str) -> str:
    """The LLVM CPU that ``name`` in target ``spec`` means: an ISA level's generic CPU, or an x86 CPU LLVM knows."""
    if name in ISA_LEVELS:
        return ISA_LEVELS[name]
    known = _x86_cpu_names()
    if name in known:
        return name
    close = difflib.get_close_matches(name, [*ISA_LEVELS, *known], n=3)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    raise FxoptError(
        f"target '{spec}': '{name}' is neither an ISA level ({', '.join(ISA_LEVELS)}) nor an x86 CPU LLVM knows{hint}"
    )
