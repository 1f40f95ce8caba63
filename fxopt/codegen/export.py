"""Deployable artifacts: the whole optimized graph as one TVM library, and loading it back.

``export_program`` writes a directory:

- ``model.so`` (``model.tar`` of object files for cross targets, to link on
  the device): every kernel plus the Relax VM bytecode, weights embedded;
- ``manifest.json``: fxopt version, target, input and output names, shapes
  and dtypes, and the model's pytree calling convention.

With ``weights=False`` the library holds the kernels and bytecode only (a few
MB whatever the model's size) and takes the weights as arguments: the
manifest lists their names, shapes and dtypes, and ``load(path, weights=...)``
supplies them, e.g. :func:`program_weights` of the same model optimized again
in PyTorch alone (capture and passes need no TVM). That is how a build for a
GPU travels to a machine without TVM's compiler (``benchmarks/gpu_check``).

``load`` needs only the TVM runtime (``TVM_USE_RUNTIME_LIB=1`` runs without the
compiler library) and PyTorch for the tensors it returns. A deployable library
cannot fall back to PyTorch, so export refuses a graph with ops that have no
lowering and names them.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from fxopt.codegen.compile import compile_module
from fxopt.codegen.lower import graph_weights, lower_graph, tvm_dtype
from fxopt.codegen.partition import summarize_fallbacks, unlowerable
from fxopt.codegen.runtime import TVMFunction, load_vm, to_tvm
from fxopt.codegen.templates import TemplateChoices
from fxopt.errors import CodegenError, InputMismatchError
from fxopt.ir.program import Program, describe_arguments, describe_structure
from fxopt.targets import Target, parse_target
from fxopt.version import __version__

__all__ = ["export_program", "program_weights", "load", "LoadedModel", "MANIFEST"]

MANIFEST = "manifest.json"


def export_program(
    program: Program, target: Target, path: str | Path, database_dir: Path | None = None, weights: bool = True
) -> Path:
    """Compile all of ``program`` for ``target`` into the directory ``path``, its weights inside the library or
    (``weights=False``) taken as arguments; see the module docstring."""
    fallbacks = unlowerable(program.graph)
    if fallbacks:
        raise CodegenError(
            "cannot export a TVM library: these ops have no lowering and would need PyTorch: "
            + "; ".join(summarize_fallbacks(fallbacks))
        )
    if target.kind == "torch":
        raise CodegenError("target 'torch' has no TVM library to export; use OptimizedModel.save() for a .pt2")
    target = target.resolved()
    templates = TemplateChoices.load(database_dir)
    module = lower_graph(program.graph_module, "main", target, weights_as_params=not weights, templates=templates)
    if not weights:
        module = _lift_weight_transforms(module, len(program.placeholders()))
    executable = compile_module(module, target, database_dir)
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
        "weights": None if weights else [_spec(n, v) for n, v in program_weights(program).items()],
    }
    (path / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return path


def _lift_weight_transforms(module, inputs: int):
    """Move what ``main`` computes from weights alone (transposes, packing: constant-folded when weights are
    embedded) into ``main_transform_params``, which :func:`load` runs once."""
    from tvm import relax

    module["main"] = module["main"].with_attr("num_input", inputs)
    return relax.transform.LiftTransformParams()(module)


def program_weights(program: Program) -> dict[str, torch.Tensor]:
    """The weights an export with ``weights=False`` takes, by name: pass them to :func:`load`."""
    return graph_weights(program.graph_module)


def _spec(name: str, value: torch.Tensor) -> dict:
    return {"name": name, "shape": list(value.shape), "dtype": tvm_dtype(value.dtype)}


def _weight_arguments(manifest: dict, weights: dict[str, torch.Tensor] | None, device: str) -> list:
    """The weights a ``weights=False`` export takes, on ``device``, checked against its manifest; ``[]`` for a
    library that holds its weights."""
    expected = manifest.get("weights")
    if expected is None:
        if weights is not None:
            raise CodegenError(f"{manifest['name']}: this export holds its weights; load it without weights=")
        return []
    if weights is None:
        raise CodegenError(
            f"{manifest['name']}: this export was written without its weights (weights=False): pass "
            f"load(path, weights=program_weights(program)) with the {len(expected)} it takes"
        )
    missing = [w["name"] for w in expected if w["name"] not in weights]
    if missing:
        raise CodegenError(
            f"{manifest['name']}: weights missing: {', '.join(missing[:5])}"
            + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        )
    arguments = []
    for spec in expected:
        value = weights[spec["name"]]
        if list(value.shape) != spec["shape"] or tvm_dtype(value.dtype) != spec["dtype"]:
            raise CodegenError(
                f"{manifest['name']}: weight '{spec['name']}' must be {spec['dtype']} {spec['shape']}, "
                f"got {value.dtype} {list(value.shape)}"
            )
        arguments.append(value.detach().to(device).contiguous())
    return arguments


class LoadedModel:
    """An exported model: call it like the original model with torch tensors."""

    def __init__(self, path: Path, manifest: dict, function: TVMFunction, device: str):
        self.path = path
        self.manifest = manifest
        self.device = device
        self._function = function
        self._in_spec = _treespec(manifest["in_spec"])
        self._out_spec = _treespec(manifest["out_spec"])

    def __call__(self, *args, **kwargs):
        flat, spec = pytree.tree_flatten((args, kwargs))
        if spec != self._in_spec:
            expected = ", ".join(f"{i['name']} {i['dtype']}{i['shape']}" for i in self.manifest["inputs"])
            raise InputMismatchError(
                f"{self.manifest['name']}: {describe_arguments(args, kwargs)}, but it was "
                f"exported for {describe_structure(self._in_spec)} ({expected})"
            )
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


def _treespec(text: str) -> pytree.TreeSpec:
    """A calling convention from the manifest. Its container types register with pytree when their module is
    imported (``transformers``' model outputs): a process that only loads has not imported them yet."""
    try:
        return pytree.treespec_loads(text)
    except NotImplementedError:
        pass
    types, pending = set(), [json.loads(text)[1]]
    while pending:
        node = pending.pop()
        types.add(node["type"])
        pending += node["children_spec"]
    for name in filter(None, types):
        module = name.rpartition(".")[0]
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise CodegenError(f"the export returns {name}: cannot import {module} ({exc})") from None
    return pytree.treespec_loads(text)


def load(path: str | Path, device: str | None = None, weights: dict[str, torch.Tensor] | None = None) -> LoadedModel:
    """Load a directory written by ``OptimizedModel.export``; ``device`` defaults to the target's. An export
    written with ``weights=False`` takes them here, by name (:func:`program_weights`)."""
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
    arguments = _weight_arguments(manifest, weights, device)
    if arguments:
        arguments = list(vm["main_transform_params"]([to_tvm(w) for w in arguments]))
    return LoadedModel(path, manifest, TVMFunction(vm, "main", after_inputs=arguments), device)
