"""Loads the generic backend tests that cachelib and Flask-Caching ship in their source
distributions (not in their wheels), so that their own tests run against ShmkvCache.

They are found under $SHMKV_HOST_SUITES, a directory holding the unpacked sdists of the
installed versions (``cachelib-0.17.0/``, ``flask_caching-2.5.1/``): ``make host-suites``
downloads them there and runs the tests. Without it, those tests are skipped, saying so."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest

ENV = "SHMKV_HOST_SUITES"


def sdist_tests(distribution: str, directory_name: str) -> Path:
    """The tests/ of the installed version's sdist under $SHMKV_HOST_SUITES; skips the
    calling module, saying why, when there is none."""
    version = importlib.metadata.version(distribution)
    root = os.environ.get(ENV)
    how = (f"set {ENV} to a directory holding the unpacked sdist {directory_name}-{version} "
           f"(`make host-suites` does: pip download --no-deps --no-binary :all: "
           f"{distribution}=={version})")
    if not root:
        pytest.skip(f"{distribution}'s own tests are not installed with it: {how}",
                    allow_module_level=True)
    path = Path(root, f"{directory_name}-{version}", "tests")
    if not path.is_dir():
        pytest.skip(f"no {path}: {how}", allow_module_level=True)
    return path


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
