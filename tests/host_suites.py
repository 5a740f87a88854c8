"""Loads the generic backend tests that cachelib and Flask-Caching ship in their source
distributions (not in their wheels), so that their own tests run against ShmkvCache.

conftest.fetch_sdist() fetches the sdists of the installed versions with pip, as for Django's
and limits' own tests."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path

from conftest import fetch_sdist


def sdist_tests(distribution: str) -> Path:
    """The tests/ of the installed version's sdist (conftest.fetch_sdist)."""
    return fetch_sdist(distribution, importlib.metadata.version(distribution), "tests/") / "tests"


def shim_conftest(path: Path, names: tuple[str, ...]) -> types.ModuleType:
    """A module holding only the named top-level classes and functions of a suite's
    conftest.py: the data its test classes import, without the fixtures that start servers
    through pytest-xprocess (which the suites need for Redis, memcached and the like)."""
    tree = ast.parse(path.read_text(), str(path))
    keep = [node for node in tree.body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name in names]
    module = types.ModuleType("conftest")
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(path), "exec"), module.__dict__)
    return module


def load(path: Path, alias: str, conftest: types.ModuleType | None = None) -> types.ModuleType:
    """Imports the file at path as module ``alias``; while it runs, ``import conftest`` gets
    the shim (this suite's own conftest keeps its place in sys.modules)."""
    spec = importlib.util.spec_from_file_location(alias, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    saved = sys.modules.get("conftest")
    if conftest is not None:
        sys.modules["conftest"] = conftest
    try:
        sys.modules[alias] = module
        spec.loader.exec_module(module)
    finally:
        if saved is not None:
            sys.modules["conftest"] = saved
    return module
