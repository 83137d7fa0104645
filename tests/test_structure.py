"""The package's layering: imports go one way, every import counted, at module level or inside a
function alike, so that no lazy import can hide a cycle."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "moeprep"

# Lower layers never import higher ones: a module may import its own layer and those below it.
LAYERS = [
    {"errors", "lazy", "canonical", "arch", "io", "hooks", "_C", "_C_cuda"},
    {"formats"},
    {"ops"},
    {"targets"},
    {"moe", "converted", "partition"},
    {"model", "kernels"},
    {"convert", "verify", "dequant", "inspect", "progress", "serve"},
    {"hf", "vllm_plugin"},
    {"cli", "__main__", "__init__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every moeprep module ``path`` imports, wherever the import statement stands."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("moeprep")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if not module.startswith("moeprep"):
                continue
            submodules = {f"{module}.{a.name}" for a in node.names} & modules  # `from . import x`
            found |= submodules or {module}
    return found & modules


EXTENSIONS = {"moeprep._C", "moeprep._C_cuda"}  # the compiled ops (csrc/), which import nothing of ours


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    known = set(modules) | EXTENSIONS
    graph = {name: _imports(path, known) - {name} for name, path in modules.items()}
    return graph | {name: set() for name in EXTENSIONS}


def _top(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(module: str) -> int:
    top = _top(module)
    for i, layer in enumerate(LAYERS):
        if top in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer of tests/test_structure.py: place it")


def test_every_module_has_a_layer():
    for module in _graph():
        _layer(module)


def test_imports_point_down_the_layers():
    upward = [
        f"{a} -> {b}"
        for a, deps in _graph().items()
        for b in deps
        if _layer(b) > _layer(a) and not (_top(a) == "__init__" and b.startswith("moeprep."))
    ]
    assert upward == []


def test_kernels_never_import_serve():
    assert [(a, b) for a, deps in _graph().items() for b in deps if _top(a) == "kernels" and _top(b) == "serve"] == []


def test_no_import_cycle():
    edges = _graph()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [node, nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, path + [node]):
                return True
        state[node] = 2
        return False

    for node in sorted(edges):
        if node not in state and visit(node, []):
            break
    assert cycle == []
