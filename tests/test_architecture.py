"""The package's shape, checked: layers import downwards only, no import cycles, no module reaches
into another's underscore names, files and functions stay small (exceptions say why)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "moetune"  # read as text: the check needs no import
# Each layer may import itself and the layers listed after it (moetune.errors/outputs/safetensors_check
# are shared helpers every layer may use).
LAYERS = ["cli", "workflows", "train", "peft", "model", "data", "config"]
SHARED = {"moetune", "moetune.errors", "moetune.outputs", "moetune.safetensors_check"}
MAX_FILE_LINES, MAX_FUNCTION_LINES = 300, 50
LONG_FILE_REASON = "longer than 300 lines because"


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _resolve(module: str, path: Path, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, Path]) -> dict[str, list[tuple[str, str]]]:
    """module -> [(imported moetune module, imported name or '')], lazy imports included."""
    found: dict[str, list[tuple[str, str]]] = {}
    for module, path in modules.items():
        edges = found.setdefault(module, [])
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges += [(a.name, "") for a in node.names if a.name.startswith("moetune")]
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(module, path, node)
                if target.startswith("moetune"):
                    for alias in node.names:
                        sub = f"{target}.{alias.name}"
                        edges.append((sub, "") if sub in modules else (target, alias.name))
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_layers_import_downwards_only():
    bad = []
    for module, edges in _imports(_modules()).items():
        mine = _layer(module)
        if mine is None:
            continue
        allowed = set(LAYERS[LAYERS.index(mine) :])
        for target, _ in edges:
            theirs = _layer(target)
            if target not in SHARED and theirs is not None and theirs not in allowed:
                bad.append(f"{module} imports {target}")
    assert not bad, "\n".join(sorted(set(bad)))


def test_no_import_cycles():
    modules = _modules()
    graph = {m: {t for t, _ in edges if t in modules and t != m} for m, edges in _imports(modules).items()}
    # A package's __init__ re-exporting its own modules is not a cycle of logic.
    graph = {
        m: {t for t in ts if not (m == t.rsplit(".", 1)[0] or t == m.rsplit(".", 1)[0])} for m, ts in graph.items()
    }
    cycles, state = [], {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(
                    " -> ".join(stack[stack.index(nxt) :] + [node, nxt]) if nxt in stack else f"{node} -> {nxt}"
                )
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_no_module_imports_another_modules_underscore_names():
    bad = []
    modules = _modules()
    for module, edges in _imports(modules).items():
        bad += [
            f"{module} imports {target}.{name}"
            for target, name in edges
            if name.startswith("_") and not name.startswith("__") and target != module
        ]
        tree = ast.parse(modules[module].read_text())
        aliases = {
            a.asname or a.name
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom)
            for a in n.names
            if f"{_resolve(module, modules[module], n)}.{a.name}" in modules
        }
        bad += [
            f"{module} uses {n.value.id}.{n.attr}"
            for n in ast.walk(tree)
            if isinstance(n, ast.Attribute)
            and isinstance(n.value, ast.Name)
            and n.value.id in aliases
            and n.attr.startswith("_")
            and not n.attr.startswith("__")
        ]
    assert not bad, "\n".join(sorted(set(bad)))


def test_files_and_functions_stay_small():
    long_files, long_functions = [], []
    for module, path in _modules().items():
        text = path.read_text()
        tree = ast.parse(text)
        doc = (ast.get_docstring(tree) or "").lower()
        if len(text.splitlines()) > MAX_FILE_LINES and LONG_FILE_REASON not in doc:
            long_files.append(f"{module}: {len(text.splitlines())} lines")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long_functions.append(f"{module}.{node.name}: {length} lines")
    assert not long_files and not long_functions, "\n".join(long_files + long_functions)
