"""Code versions: a digest of the source a pipeline stage runs, so that editing a method's code reruns that
method's merges (and what reads them) but not training, and editing training code reruns training.

A stage's version is the SHA-256 of the source files of its entry modules and of every hetmerge module they
import, directly or inside functions, found statically (`ast`), so nothing is imported. The command line
(`hetmerge.cli`) is left out on purpose: it only routes arguments, and counting it would rerun every stage on
any edit of it. Standard library only: the Snakefile computes the plan's cache key with it.
"""

from __future__ import annotations

import ast
import hashlib
from collections.abc import Iterable
from functools import cache
from pathlib import Path

PACKAGE = "hetmerge"
ROOT = Path(__file__).resolve().parent
EXCLUDED = frozenset({f"{PACKAGE}.cli", f"{PACKAGE}.__main__", PACKAGE})


def module_file(name: str) -> Path | None:
    """The source file of hetmerge module `name` (a package's `__init__.py`), or None if there is none."""
    parts = name.split(".")[1:]
    base = ROOT.joinpath(*parts)
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@cache
def _imports(name: str) -> frozenset[str]:
    """hetmerge modules that module `name` imports anywhere in its source."""
    path = module_file(name)
    if path is None:
        return frozenset()
    found = set()
    for node in ast.walk(ast.parse(path.read_bytes(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against this module's package
                package = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return frozenset(m for m in found if m.split(".")[0] == PACKAGE and module_file(m) is not None)


def closure(modules: Iterable[str]) -> list[Path]:
    """Source files of `modules` and of every hetmerge module they import, transitively, sorted."""
    seen: set[str] = set()
    todo = [m for m in modules if m not in EXCLUDED]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in _imports(name) if m not in seen and m not in EXCLUDED]
    return sorted(p for p in map(module_file, seen) if p is not None)


def code_version(*modules: str) -> str:
    """Short digest of the source of `modules` and everything they import (12 hex digits)."""
    digest = hashlib.sha256()
    for path in closure(modules):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def source_digest() -> str:
    """Digest of every source file of the package (templates and rc files included): the planner's cache key."""
    digest = hashlib.sha256()
    for path in sorted(p for p in ROOT.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
