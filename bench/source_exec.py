"""A server's own Python source run on CPU without installing the server (it pins its own torch):
chosen top-level definitions executed from a file, whole files executed as modules, and stub
modules standing in for what those files import (logging, config types, packages)."""

from __future__ import annotations

import ast
import importlib.util
import sys
import types
from pathlib import Path


def exec_defs(path: Path, names: set[str], namespace: dict, *, inside: str | None = None) -> dict:
    """Execute the top-level definitions ``names`` of a source file (or of class ``inside``)."""
    tree = ast.parse(path.read_text())
    body = next(n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == inside) if inside else tree.body
    picked = []
    for node in body:
        name = getattr(node, "name", None) or (node.targets[0].id if isinstance(node, ast.Assign) else None)
        if name in names:
            if isinstance(node, ast.FunctionDef):
                node.decorator_list = []
            picked.append(node)
    exec(compile(ast.Module(body=picked, type_ignores=[]), str(path), "exec"), namespace)  # noqa: S102
    return namespace


def exec_file(name: str, path: Path) -> types.ModuleType:
    """Execute the source file ``path`` as module ``name`` (registered, so its own imports of it resolve)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def stub(name: str, **attrs) -> types.ModuleType:
    """Module ``name`` in ``sys.modules`` (made empty if absent), with ``attrs`` set on it."""
    module = sys.modules.get(name) or types.ModuleType(name)
    module.__dict__.update(attrs)
    sys.modules[name] = module
    return module
