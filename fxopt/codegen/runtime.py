"""Calling compiled Relax functions from PyTorch without copies.

Tensors cross with DLPack in both directions. TVM kernels assume their
buffers are contiguous and aligned; a view that is neither is copied first
(that copy is the only one).
"""

from __future__ import annotations

import os

import torch

from fxopt.errors import CodegenError, first_line
from fxopt.targets import request_amx, usable_cores

__all__ = ["TVMFunction", "load_vm", "tvm_device"]

# TVM's generated code may use aligned vector loads (kAllocAlignment).
_ALIGNMENT = 64


def tvm_device(device: torch.device | str):
    import tvm

    device = torch.device(device)
    if device.type == "cuda":
        _load_cuda_runtime()
        return tvm.cuda(device.index or 0)
    return tvm.cpu(0)


def _load_cuda_runtime() -> None:
    """TVM loads its CUDA runtime library when its CUDA backend registers, which needs the compiler library; with
    the runtime alone (``TVM_USE_RUNTIME_LIB=1``, how an export travels to a GPU machine) it is loaded here."""
    from tvm import base, libinfo
    from tvm_ffi.libinfo import load_lib_ctypes

    if "tvm_runtime_cuda" in base._LOADED_LIBS:
        return
    torch.cuda.init()  # its CUDA runtime (libcudart) is the one TVM's library links against
    try:
        base._LOADED_LIBS["tvm_runtime_cuda"] = load_lib_ctypes(
            "tvm", "tvm_runtime_cuda", "RTLD_LOCAL", extra_lib_paths=libinfo.package_lib_paths()
        )
    except (OSError, RuntimeError) as exc:
        raise CodegenError(f"TVM's CUDA runtime (libtvm_runtime_cuda.so) does not load: {first_line(exc)}") from None


def load_vm(executable, device: torch.device | str):
    """A Relax virtual machine for ``executable`` on the TVM device matching ``device``."""
    from tvm.runtime.vm import VirtualMachine  # the runtime's (relax re-exports it), so no compiler is needed

    use_host_cores()
    request_amx()  # an AMX build's tiles fault in a process Linux has not let use them
    return VirtualMachine(executable, tvm_device(device))


#: How many times a TVM worker yields the core, after its share of a kernel, before it sleeps (~0.6 us each here).
#: Awake, it starts the next kernel of the same call at once: woken from sleep it took 15-30 us, which MobileNetV2's
#: 55 kernels paid on every call (8-10 ms; 6.2-6.4 ms spinning). Bounded, it sleeps ~0.6 ms after the call: TVM's
#: default (300000, ~0.2 s) took the cores from the PyTorch kernels between TVM segments (eager MiniLM 2x slower).
WORKER_SPIN_COUNT = 1000


def use_host_cores() -> None:
    """Run CPU kernels on every core this process may use (the ``num-cores`` they were built and tuned for), their
    workers spinning briefly between kernels (:data:`WORKER_SPIN_COUNT`).

    TVM sizes its thread pool once, when a kernel first runs, from ``TVM_NUM_THREADS`` or else half
    the hardware threads (it assumes SMT siblings): one thread on a 2-core machine. Values the user set are kept.
    """
    os.environ.setdefault("TVM_NUM_THREADS", str(usable_cores()))
    os.environ.setdefault("TVM_THREAD_POOL_SPIN_COUNT", str(WORKER_SPIN_COUNT))


def to_tvm(tensor: torch.Tensor):
    import tvm

    if not tensor.is_contiguous() or tensor.data_ptr() % _ALIGNMENT:
        tensor = tensor.clone(memory_format=torch.contiguous_format)
    return tvm.runtime.from_dlpack(tensor)


class TVMFunction(torch.nn.Module):
    """One compiled Relax function as a module: torch tensors in, a tuple of torch tensors out.

    ``strides``: per output, the strides PyTorch gives that value in the
    graph, or None. TVM returns contiguous tensors; where PyTorch's differ
    (attention's output is a transpose of a contiguous buffer), the output is
    laid out like PyTorch's, because ops after it (``view``) may depend on it.
    Outputs only TVM reads need no layout (``strides[i] = None``): the next kernel takes them contiguous.
    ``after_inputs``: TVM tensors passed after every call's arguments (an export's weights).
    """

    def __init__(
        self, vm, function: str, strides: list[tuple[int, ...] | None] | None = None, after_inputs: list | None = None
    ):
        super().__init__()
        self.function = function
        self._vm = vm
        self._call = vm[function]
        self.strides = strides
        self._after_inputs = after_inputs or []

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = tuple(torch.from_dlpack(o) for o in self._call(*[to_tvm(a) for a in args], *self._after_inputs))
        if self.strides is None:
            return outputs
        return tuple(_laid_out(o, s) for o, s in zip(outputs, self.strides))

    def extra_repr(self) -> str:
        return f"function={self.function!r}"


def _laid_out(tensor: torch.Tensor, strides: tuple[int, ...] | None) -> torch.Tensor:
    if strides is None or tensor.stride() == strides or tensor.dim() != len(strides):
        return tensor
    # A stride-0 dimension is a broadcast (``expand``): every slice along it is equal, so one slice is
    # laid out and expanded back, as PyTorch's own value is. Storing all of them would overlap.
    source = tensor
    for dim, stride in enumerate(strides):
        if stride == 0:
            source = source.narrow(dim, 0, 1)
    if not _without_overlap(source.shape, strides):
        return tensor  # a layout no fresh tensor can have; the contiguous result holds the same values
    laid_out = torch.empty_strided(source.shape, strides, dtype=tensor.dtype, device=tensor.device).copy_(source)
    return laid_out.expand(tensor.shape)


def _without_overlap(shape: torch.Size, strides: tuple[int, ...]) -> bool:
    """``strides`` put every element of ``shape`` at its own offset (gaps allowed: a slice of a wider buffer)."""
    extent = 1
    for size, stride in sorted((p for p in zip(shape, strides) if p[0] != 1), key=lambda p: p[1]):
        if stride < extent:
            return False
        extent = stride * size
    return True
