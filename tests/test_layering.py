"""Data flows one way, capture → passes → codegen: the IR imports neither passes nor codegen nor the algorithm
packages, passes never import codegen, codegen never imports passes (they share the IR, numerics included:
``fxopt.ir.numerics``). The algorithm packages (``fxopt.quant``, ``fxopt.prune``) sit between the IR and the passes:
of the passes they use only the pass interface (``fxopt.passes.base``, for its context)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "fxopt"
MODULES = {
    ".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"): p
    for p in PACKAGE.rglob("*.py")
}


def module_imports(path: pathlib.Path, typing_too: bool = False) -> set[str]:
    """The fxopt modules ``path`` imports, inside functions too (a deferred import is still a dependency), and
    under ``if TYPE_CHECKING`` only with ``typing_too``; ``from package import submodule`` counts as the
    submodule."""
    tree = ast.parse(path.read_text())
    typing_only = (
        set()
        if typing_too
        else {
            id(n)
            for block in ast.walk(tree)
            if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
            for n in ast.walk(block)
        }
    )
    found = set()
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            submodules = {f"{node.module}.{alias.name}" for alias in node.names} & MODULES.keys()
            found |= submodules or {node.module}
    return found & MODULES.keys()


_ABOVE_ALGORITHMS = ("fxopt.codegen", "fxopt.api", "fxopt.cli", "fxopt.dynamo", "fxopt.loading")


@pytest.mark.parametrize(
    "layer, forbidden, allowed",
    [
        ("ir", ("fxopt.passes", "fxopt.quant", "fxopt.prune", "fxopt.calibration") + _ABOVE_ALGORITHMS, ()),
        ("quant", ("fxopt.passes", "fxopt.prune") + _ABOVE_ALGORITHMS, ("fxopt.passes.base",)),
        ("prune", ("fxopt.passes", "fxopt.quant") + _ABOVE_ALGORITHMS, ("fxopt.passes.base",)),
        ("passes", _ABOVE_ALGORITHMS, ()),
        ("codegen", ("fxopt.passes", "fxopt.prune", "fxopt.api", "fxopt.cli", "fxopt.dynamo", "fxopt.loading"), ()),
    ],
)
def test_each_layer_imports_only_the_layers_below_it(layer, forbidden, allowed):
    # Imports for type annotations only may point up (the algorithms name their pass's options class).
    crossing = {
        f"{path.relative_to(PACKAGE.parent)} imports {name}"
        for path in (PACKAGE / layer).rglob("*.py")
        for name in module_imports(path)
        if name.startswith(forbidden) and name not in allowed
    }
    assert not crossing, sorted(crossing)


def test_import_fxopt_codegen_loads_no_pass():
    script = "import sys, fxopt.codegen; print(sorted(m for m in sys.modules if m.startswith('fxopt.passes')))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_import_fxopt_loads_neither_tvm_nor_networkx():
    # TVM (seconds, hundreds of MB) only when something is built or loaded; networkx only for to_networkx().
    script = "import sys, fxopt; print(sorted({m.split('.')[0] for m in sys.modules} & {'tvm', 'networkx'}))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_no_import_cycle_among_fxopt_modules():
    graph = {name: module_imports(path) - {name} for name, path in MODULES.items()}
    cycles, state = [], {}

    def visit(name, stack):  # depth-first: an edge back into the stack closes a cycle
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                cycles.append(stack[stack.index(target) :] + [target])
            elif target not in state:
                visit(target, stack + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles, cycles
