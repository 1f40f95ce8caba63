"""Compilation targets, created from short strings: ``"torch"``, ``"cpu"``, ``"cuda"``, ``"cuda:sm_90"``, ``"aarch64"``.

A :class:`Target` says which backend runs the model, on which PyTorch device,
with which default pipeline and tuning settings. ``"cpu"`` is the host CPU as
LLVM detects it (``mcpu``, cores, vector width); ``"cuda"`` takes the
architecture of the visible GPU, or an explicit one (``"cuda:sm_90"``) to
build kernels for a GPU this machine does not have; ``"aarch64"`` cross-builds
for 64-bit Arm Linux (build and export only).
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from fxopt.errors import FxoptError

__all__ = ["Target", "TARGETS", "HostCPU", "host_cpu", "usable_cores", "parse_target"]


@dataclass(frozen=True)
class HostCPU:
    """What LLVM and the OS say about the CPU this process runs on."""

    mcpu: str
    cores: int
    vector_bits: int
    features: tuple[str, ...]
    #: One core's L2 cache (the OS's word; 256 KiB, the smallest of current x86 cores, where it says nothing).
    l2_bytes: int = 256 * 1024

    def __str__(self) -> str:
        return f"{self.mcpu}, {self.cores} cores, {self.vector_bits}-bit vectors"


_VECTOR_FEATURES = (("avx512f", 512), ("avx2", 256), ("avx", 256), ("neon", 128), ("sse2", 128))


@functools.cache
def host_cpu() -> HostCPU:
    """Detect the host CPU (cached): LLVM's CPU name, the cores this process may use, the widest vector unit,
    the L2 cache."""
    from tvm.target import codegen  # TVM's compiler library: LLVM's name for this CPU

    flags = _cpu_flags()
    vector_bits = next((bits for name, bits in _VECTOR_FEATURES if name in flags), 128)
    return HostCPU(
        str(codegen.llvm_get_system_cpu()),
        usable_cores(),
        vector_bits,
        tuple(sorted(flags)),
        _cache_bytes(level=2) or HostCPU.l2_bytes,
    )


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


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


@dataclass(frozen=True)
class Target:
    """Where the optimized model runs.

    ``kind`` picks the backend: ``"torch"`` runs the optimized graph in PyTorch;
    ``"llvm"`` and ``"cuda"`` are TVM targets. ``device`` is the PyTorch device
    the model's tensors live on. ``default_pipeline`` names the built-in
    pipeline used when the caller gives none. ``arch`` is the CUDA
    architecture (``"sm_90"``) or, for cross CPU targets, the LLVM triple.
    ``tuning`` holds the target's default tuning settings (trials per kernel,
    runs per measurement).
    """

    name: str
    kind: Literal["torch", "llvm", "cuda"]
    device: str
    default_pipeline: str
    arch: str | None = None
    tuning: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __str__(self) -> str:
        return f"{self.name}:{self.arch}" if self.arch and self.kind == "cuda" else self.name

    @property
    def is_cross(self) -> bool:
        """Kernels built for this target cannot run on this machine."""
        if self.kind == "llvm":
            return self.arch is not None
        if self.kind == "cuda":
            import torch

            return not torch.cuda.is_available() or self.arch != _visible_cuda_arch()
        return False

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

    def tvm(self):
        """The ``tvm.target.Target`` for this target (JSON-dict form, as TVM 0.27 requires)."""
        import tvm

        if self.kind == "llvm":
            if self.arch is None:
                cpu = host_cpu()
                return tvm.target.Target({"kind": "llvm", "mcpu": cpu.mcpu, "num-cores": cpu.cores})
            return tvm.target.Target(
                {"kind": "llvm", "mtriple": self.arch, "mattr": ["+neon"], "num-cores": self.tuning["cores"]}
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
        if self.kind == "llvm" and self.arch is None:
            return f"{self.name} ({host_cpu()})"
        if self.kind == "llvm":
            return f"{self.name} ({self.arch}, cross-compiled)"
        return str(self)


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
    if name not in TARGETS:
        close = difflib.get_close_matches(name, list(TARGETS), n=2)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise FxoptError(f"unknown target '{spec}'{hint} (known: {', '.join(TARGETS)})")
    target = TARGETS[name]
    if arch:
        if target.kind != "cuda" or not re.fullmatch(r"sm_\d+a?", arch):
            raise FxoptError(f"target '{spec}': only cuda takes an architecture, written like cuda:sm_90")
        target = replace(target, arch=arch)
    return target
