"""Deployable artifacts: the whole optimized graph as one TVM library, and loading it back.

``export_program`` writes a directory:

- ``model.so`` (``model.tar`` of object files for cross targets, to link on
  the device): every kernel plus the Relax VM bytecode, weights embedded;
- ``manifest.json``: fxopt version, target, input and output names, shapes
  and dtypes, and the model's pytree calling convention.

``load`` needs only the TVM runtime (and PyTorch for the tensors it returns).
A deployable library cannot fall back to PyTorch, so export refuses a graph
with ops that have no lowering and names them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from fxopt.codegen.compile import compile_module
from fxopt.codegen.lower import lower_graph, tvm_dtype
from fxopt.codegen.partition import summarize_fallbacks, unlowerable
from fxopt.codegen.runtime import TVMFunction, load_vm
from fxopt.errors import CodegenError, InputMismatchError
from fxopt.ir.program import Program, describe_arguments, describe_structure
from fxopt.targets import Target, parse_target

__all__ = ["export_program", "load", "LoadedModel", "MANIFEST"]

MANIFEST = "manifest.json"


def export_program(program: Program, target: Target, path: str | Path, database_dir: Path | None = None) -> Path:
    """Compile all of ``program`` for ``target`` into the directory ``path``; see the module docstring."""
    from fxopt import __version__

    fallbacks = unlowerable(program.graph)
    if fallbacks:
        raise CodegenError("cannot export a TVM library: these ops have no lowering and would need PyTorch: "
                           + "; ".join(summarize_fallbacks(fallbacks)))
    if target.kind == "torch":
        raise CodegenError("target 'torch' has no TVM library to export; use OptimizedModel.save() for a .pt2")
    target = target.resolved()
    executable = compile_module(lower_graph(program.graph_module, "main", target), target, database_dir)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    library = "model.tar" if target.is_cross and target.kind == "llvm" else "model.so"
    executable.export_library(str(path / library))
    manifest = {
        "fxopt_version": __version__,
        "name": program.name,
        "target": str(target),
        "tvm_target": str(target.tvm()),
        "library": library,
        "inputs": [_spec(p.name, p.meta["val"]) for p in program.placeholders()],
        "outputs": [_spec(getattr(n, "name", str(i)), n.meta["val"]) for i, n in enumerate(program.output_nodes())],
        "in_spec": pytree.treespec_dumps(program.in_spec),
        "out_spec": pytree.treespec_dumps(program.out_spec),
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _spec(name: str, value: torch.Tensor) -> dict:
    return {"name": name, "shape": list(value.shape), "dtype": tvm_dtype(value.dtype)}


class LoadedModel:
    """An exported model: call it like the original model with torch tensors."""

    def __init__(self, path: Path, manifest: dict, function: TVMFunction, device: str):
        self.path = path
        self.manifest = manifest
        self.device = device
        self._function = function
        self._in_spec = pytree.treespec_loads(manifest["in_spec"])
        self._out_spec = pytree.treespec_loads(manifest["out_spec"])

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            expected = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in self.manifest["inputs"])
            raise InputMismatchError(f"{self.manifest['name']}: {describe_arguments(args, kwargs)}, but it was "
                                     f"exported for {describe_structure(self._in_spec)} ({expected})")
        for value, expected in zip(flat, self.manifest["inputs"]):
            if list(value.shape) != expected["shape"] or tvm_dtype(value.dtype) != expected["dtype"]:
                raise InputMismatchError(
                    f"{self.manifest['name']}: input '{expected['name']}' must be {expected['dtype']} "
                    f"{expected['shape']}, got {value.dtype} {list(value.shape)}"
                )
        outputs = self._function(*[v.to(self.device) for v in flat])
        return pytree.tree_unflatten(list(outputs), self._out_spec)

    def __repr__(self) -> str:
        return f"LoadedModel({self.manifest['name']!r}, target={self.manifest['target']!r}, path={str(self.path)!r})"


def load(path: str | Path, device: str | None = None) -> LoadedModel:
    """Load a directory written by ``OptimizedModel.export``; ``device`` defaults to the target's."""
    import tvm

    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.exists():
        raise CodegenError(f"{path} is not an fxopt export: {MANIFEST} is missing")
    manifest = json.loads(manifest_file.read_text())
    target = parse_target(manifest["target"])
    if manifest["library"].endswith(".tar"):
        raise CodegenError(f"{path} holds object files for {manifest['target']}: link and run them on that device")
    device = device or target.device
    if device == "cuda" and not torch.cuda.is_available():
        raise CodegenError(f"{path} was built for {manifest['target']} but no CUDA device is visible")
    library = tvm.runtime.load_module(str(path / manifest["library"]))
    vm = load_vm(library, device)
    return LoadedModel(path, manifest, TVMFunction(vm, "main"), device)
