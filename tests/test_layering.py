"""Data flows one way, capture → passes → codegen: the IR imports neither passes nor codegen, passes never import
codegen, codegen never imports passes (they share the IR, numerics included: ``fxopt.ir.numerics``)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fxopt"


def fxopt_imports(path: pathlib.Path) -> set[str]:
    """The fxopt modules a file imports, at any depth of its code (imports inside functions count)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("fxopt")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fxopt"):
            found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("layer, forbidden", [
    ("ir", ("fxopt.passes", "fxopt.codegen", "fxopt.api", "fxopt.cli")),
    ("passes", ("fxopt.codegen", "fxopt.api", "fxopt.cli")),
    ("codegen", ("fxopt.passes", "fxopt.api", "fxopt.cli")),
])
def test_each_layer_imports_only_the_layers_below_it(layer, forbidden):
    crossing = {f"{path.relative_to(PACKAGE.parent)} imports {name}"
                for path in (PACKAGE / layer).rglob("*.py")
                for name in fxopt_imports(path) if name.startswith(forbidden)}
    assert not crossing, sorted(crossing)


def test_import_fxopt_loads_neither_tvm_nor_networkx():
    # TVM (seconds, hundreds of MB) only when something is built or loaded; networkx only for to_networkx().
    script = "import sys, fxopt; print(sorted({m.split('.')[0] for m in sys.modules} & {'tvm', 'networkx'}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout
