"""The instruction set a CPU target's kernels are built for: what every hand-scheduled kernel asks instead of the
host.

:meth:`Isa.of` derives it from a :class:`~fxopt.targets.Target`: the host's CPU for ``"cpu"`` (its features as
the OS reports them, its L2 from sysfs), the named CPU for ``"cpu:avx512"`` or ``"x86_64:znver4"`` (LLVM's features
of that CPU, its L2 from :data:`L2_BYTES`), NEON for ``"aarch64"``. So an AVX-512 build is the same on any host,
and a test builds any ISA's schedule by naming it (:meth:`Isa.named`). A schedule for a wider ISA compiled for
this host's CPU runs here too (LLVM splits 512-bit vectors into two 256-bit operations), so its logic is checked
on every host.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fxopt.errors import CodegenError
from fxopt.targets import Target, cpu_features, host_cpu, parse_target, vector_bits

__all__ = ["Isa", "L2_BYTES", "DEFAULT_L2_BYTES"]

#: A core's L2 on CPUs a target can name, which this machine cannot read: Zen 3 512 KiB, Zen 4/5 1 MiB,
#: Sapphire/Emerald/Granite Rapids 2 MiB, Skylake-SP to Ice Lake-SP 1-1.25 MiB.
L2_BYTES = {
    "znver3": 512 << 10,
    "znver4": 1 << 20,
    "znver5": 1 << 20,
    "skylake-avx512": 1 << 20,
    "cascadelake": 1 << 20,
    "icelake-server": 1280 << 10,
    "sapphirerapids": 2 << 20,
    "emeraldrapids": 2 << 20,
    "graniterapids": 2 << 20,
}
#: Any other CPU's L2: the smallest of current cores (Cortex-A76/A78, Neoverse N1: 256-512 KiB; x86 256 KiB and
#: up), so the default groups of GEMM panels fit.
DEFAULT_L2_BYTES = 256 << 10


@dataclass(frozen=True)
class Isa:
    """A CPU's vector unit and caches, as kernels are scheduled for them.

    ``name``: the LLVM CPU (``"znver3"``, ``"x86-64-v4"``; ``"aarch64"`` for the generic Arm target).
    ``arch``: ``"x86_64"`` or ``"aarch64"``. ``vector_bits``: the widest vector registers; ``vector_registers``:
    how many the register file has (register tiles are sized from it). ``features``: LLVM's names
    (``avx512vnni``, ``amx-int8``, ``dotprod``). ``cores``: the cores a kernel's parallel loop runs on.
    ``l2_bytes``: one core's L2.
    """

    name: str
    arch: str
    vector_bits: int
    vector_registers: int
    features: frozenset[str]
    cores: int
    l2_bytes: int

    def __str__(self) -> str:
        return f"{self.name} ({self.vector_bits}-bit vectors x {self.vector_registers})"

    def lanes(self, bits: int = 32) -> int:
        """Elements of ``bits`` bits in one vector register (float32 by default)."""
        return self.vector_bits // bits

    @property
    def fma(self) -> bool:
        return "fma" in self.features or self.neon

    @property
    def avx2(self) -> bool:
        return "avx2" in self.features

    @property
    def avx512(self) -> bool:
        """AVX-512 as servers have it: foundation, byte/word, double/quad-word and 128/256-bit forms."""
        return {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= self.features

    @property
    def vnni(self) -> bool:
        """int8 dot products into int32 (``vpdpbusd``), 512-bit or as AVX-VNNI."""
        return "avx512vnni" in self.features or "avxvnni" in self.features

    @property
    def avx512_bf16(self) -> bool:
        return "avx512bf16" in self.features

    @property
    def amx_int8(self) -> bool:
        return {"amx-tile", "amx-int8"} <= self.features

    @property
    def amx_bf16(self) -> bool:
        return {"amx-tile", "amx-bf16"} <= self.features

    @property
    def neon(self) -> bool:
        return "neon" in self.features

    @property
    def neon_dot(self) -> bool:
        return self.neon and "dotprod" in self.features

    @classmethod
    def named(cls, spec: str) -> Isa:
        """The ISA of a target spelled ``spec`` (``"cpu:avx512"``, ``"x86_64:znver4"``, ``"aarch64"``)."""
        return cls.of(parse_target(spec))

    @staticmethod
    @functools.cache
    def of(target: Target) -> Isa:
        """What ``target``'s kernels are built for (cached per target)."""
        if target.kind != "llvm":
            raise CodegenError(f"target '{target}' is not a CPU target: it has no CPU instruction set")
        features = cpu_features(target)
        if target.arch is not None:
            return Isa(target.arch.split("-")[0], "aarch64", 128, 32, features, target.cores, DEFAULT_L2_BYTES)
        if target.mcpu is None:
            cpu = host_cpu()
            name, l2_bytes = cpu.mcpu, cpu.l2_bytes
        else:
            name, l2_bytes = target.mcpu, L2_BYTES.get(target.mcpu, DEFAULT_L2_BYTES)
        arch = "aarch64" if "neon" in features else "x86_64"
        bits = vector_bits(features)
        registers = 32 if bits == 512 or arch == "aarch64" else 16
        return Isa(name, arch, bits, registers, features, target.cores, l2_bytes)
