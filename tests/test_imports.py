"""The package map's import rule (docs/DESIGN.md, "Package map"): imports flow one way.

    core -> text -> io -> {inference, train} -> {eval, serve} -> {cli, aot} -> entry points

A module may import its own package and the packages of lower layers, never a higher
layer nor its sibling (inference and train do not know each other). Every import
counts, the ones inside functions too: a function-level import of an anjax module is
allowed only in entry points (anjax/cli, the shims at anjax/<command>.py, train.py,
infer.py, which import lazily so that bad arguments fail before jax loads) and for the
few lazy imports listed in LAZY. The inference and core packages import none of the
training stack (optax, orbax, datasets, pandas) nor torch. Inside inference the host/device
line holds: the host engine (`anjax.inference.engine`) is imported by no inference or serve
module; the scorer and the scheduler build on the device steps (`steps`, `sampling`).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "anjax"

LAYERS = {
    "core": 0,
    "text": 1,
    "io": 2,
    "inference": 3,
    "train": 3,
    "eval": 4,
    "serve": 4,
    "cli": 5,
    "aot": 5,
    "entry": 6,
}
# (importing module, imported module): lazy on purpose, with the reason.
LAZY = {
    ("anjax.io.loading", "anjax.io.checkpoint"): "orbax loads only for a run directory",
    ("anjax.io.loading", "anjax.io.gguf_import"): "transformers/gguf load only for a GGUF file",
}
HOST_ENGINE = "anjax.inference.engine"  # settings, batching, text: on top of the device steps
HEAVY = ("optax", "orbax", "datasets", "pandas", "torch")
LIGHT_PACKAGES = ("core", "text", "inference")  # import none of HEAVY


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _files() -> list[Path]:
    return sorted(PKG.rglob("*.py")) + [ROOT / "train.py", ROOT / "infer.py"]


def _layer(module: str) -> str | None:
    """The layer of an anjax module, "entry" for the shims and scripts, None for the bare package."""
    parts = module.split(".")
    if parts[0] != "anjax":
        return "entry"  # train.py, infer.py
    if len(parts) == 1:
        return None
    if parts[-1] == "__main__":
        return "entry"  # python -m anjax.serve
    return parts[1] if parts[1] in LAYERS else "entry"


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def _known(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT / rel).with_suffix(".py").is_file() or (ROOT / rel / "__init__.py").is_file()


def anjax_imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported anjax module, line, inside a function or class) for every import in `path`."""
    module, tree = _module_name(path), ast.parse(path.read_text(), str(path))
    nested = {
        id(n)
        for top in tree.body
        if isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        for n in ast.walk(top)
    }
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, path.name == "__init__.py", node)
            # `from anjax.core import mask` imports the module anjax.core.mask
            names = [f"{base}.{a.name}" if _known(f"{base}.{a.name}") else base for a in node.names]
        else:
            continue
        out |= {(n, node.lineno, id(node) in nested) for n in names if n == "anjax" or n.startswith("anjax.")}
    return sorted(out)


def test_imports_flow_one_way():
    bad = []
    for path in _files():
        module = _module_name(path)
        layer = _layer(module)
        if layer is None:
            continue
        for target, line, _ in anjax_imports(path):
            t_layer = _layer(target)
            if t_layer is None or target == module:
                continue
            where = f"{path.relative_to(ROOT)}:{line} ({layer}) imports {target} ({t_layer})"
            if t_layer == "entry":
                bad.append(f"{where}: entry points are imported by nobody")
            elif layer != "entry" and t_layer != layer and LAYERS[t_layer] >= LAYERS[layer]:
                bad.append(f"{where}: upward or sideways")
    assert not bad, "imports against the package map:\n" + "\n".join(bad)


def test_function_level_imports_only_in_entry_points():
    bad = []
    for path in _files():
        module = _module_name(path)
        if _layer(module) in ("entry", "cli"):
            continue
        for target, line, nested in anjax_imports(path):
            if nested and (module, target) not in LAZY:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {target} inside a function")
    assert not bad, "hidden imports (move them to the top, or the code to the right layer):\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = {_module_name(p): {t for t, _, _ in anjax_imports(p) if t != _module_name(p)} for p in _files()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack + [node, nxt]
            if nxt in graph and not state.get(nxt) and (cycle := visit(nxt, stack + [node])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if not state.get(start) and (cycle := visit(start, [])):
            pytest.fail("import cycle: " + " -> ".join(cycle[cycle.index(cycle[-1]) :]))


def test_no_inference_or_serve_module_imports_the_host_engine():
    bad = [
        f"{path.relative_to(ROOT)}:{line} imports {target}"
        for path in _files()
        if _layer(_module_name(path)) in ("inference", "serve") and _module_name(path) != HOST_ENGINE
        for target, line, _ in anjax_imports(path)
        if target == HOST_ENGINE
    ]
    assert not bad, "the scorer, the scheduler and the device steps import inference.steps / sampling:\n" + "\n".join(
        bad
    )


@pytest.mark.parametrize("package", LIGHT_PACKAGES)
def test_light_packages_load_no_training_stack(package):
    modules = sorted(_module_name(p) for p in (PKG / package).rglob("*.py"))
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}:\n    importlib.import_module(m)\n"
        f"print(sorted(h for h in {HEAVY!r} if h in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", f"importing anjax.{package} loads {out.stdout.strip()}"
