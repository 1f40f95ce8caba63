"""Models and example inputs from what a user names: a built-in model, ``path/to/file.py:factory`` or
``module:factory``, and input specs like ``1x3x224x224`` or ``1x128:int64:0-30522``. Shared by the ``fxopt``
command and the benchmarks; errors are one line naming the user's file and line."""

from __future__ import annotations

import importlib
import importlib.util
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import torch

from fxopt.errors import FxoptError, first_line

__all__ = ["load_model", "parse_input_spec"]


def load_model(spec: str, input_specs: Sequence[str] = ()) -> tuple[torch.nn.Module, tuple]:
    """A model and example inputs from a built-in name or ``path/to/file.py:factory`` / ``module:factory``.

    The factory returns a model or ``(model, inputs)``; ``input_specs`` (``1x3x224x224``) override the inputs.
    """
    from fxopt.zoo import ZOO, load_zoo_model

    if ":" not in spec:
        if spec in ZOO or not input_specs:
            model, inputs = load_zoo_model(spec)
            return model, tuple(parse_input_spec(s) for s in input_specs) if input_specs else inputs
    path, _, factory_name = spec.rpartition(":")
    if not path or not factory_name:
        raise FxoptError(f"model '{spec}' must be path/to/file.py:factory, module:factory or a built-in name")
    module = _import(path)
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise FxoptError(f"'{path}' has no callable '{factory_name}'")
    try:
        made = factory()
    except Exception as exc:
        raise FxoptError(f"model factory {spec} raised {_where(exc, path)}{first_line(exc)}") from exc
    model, inputs = made if isinstance(made, tuple) else (made, None)
    if input_specs:
        inputs = tuple(parse_input_spec(s) for s in input_specs)
    if inputs is None:
        raise FxoptError(
            f"give the inputs of {spec} with --example-input SHAPE (or return (model, inputs) from the factory)"
        )
    if not isinstance(model, torch.nn.Module):
        raise FxoptError(f"'{spec}' returned {type(model).__name__}, not a torch.nn.Module")
    return model, inputs if isinstance(inputs, tuple) else (inputs,)


def _import(path: str):
    if path.endswith(".py"):
        file = Path(path)
        if not file.is_file():
            raise FxoptError(f"model file '{path}' does not exist")
        module_spec = importlib.util.spec_from_file_location(file.stem, file)
        if module_spec is None or module_spec.loader is None:
            raise FxoptError(f"model file '{path}' is not a Python file")
        module = importlib.util.module_from_spec(module_spec)
        sys.path.insert(0, str(file.parent.resolve()))
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # the user's file: a syntax error, a failing import, anything it raises
            raise FxoptError(f"cannot load model file '{path}': {_where(exc, path)}{first_line(exc)}") from exc
        finally:
            sys.path.pop(0)
        return module
    try:
        return importlib.import_module(path)
    except Exception as exc:
        raise FxoptError(f"cannot import model module '{path}': {_where(exc, path)}{first_line(exc)}") from exc


def _where(exc: BaseException, path: str) -> str:
    """``file.py:12: `` of the user's line that raised (or has the syntax error), when it is in ``path``."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{Path(exc.filename).name}:{exc.lineno}: "
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).stem == Path(path).stem]
    return f"{Path(frames[-1].filename).name}:{frames[-1].lineno}: " if frames else ""


_INPUT = re.compile(r"^(?P<shape>\d+(?:x\d+)*)(?::(?P<dtype>[a-z0-9]+))?(?::(?P<low>-?\d+)-(?P<high>-?\d+))?$")


def parse_input_spec(text: str) -> torch.Tensor:
    """``1x3x224x224`` -> a random float32 tensor; ``1x128:int64:0-30522`` -> random integers in [0, 30522)."""
    m = _INPUT.match(text.strip())
    if not m:
        raise FxoptError(
            f"bad --example-input '{text}': expected SHAPE[:DTYPE[:LOW-HIGH]] like 1x3x224x224 or 1x128:int64:0-1000"
        )
    shape = tuple(int(d) for d in m["shape"].split("x"))
    dtype = getattr(torch, m["dtype"] or "float32", None)
    if not isinstance(dtype, torch.dtype):
        raise FxoptError(f"bad --example-input '{text}': unknown dtype '{m['dtype']}'")
    generator = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=generator).to(dtype)
    low, high = (int(m["low"]), int(m["high"])) if m["low"] is not None else (0, 2 if dtype == torch.bool else 100)
    return torch.randint(low, high, shape, generator=generator).to(dtype)
