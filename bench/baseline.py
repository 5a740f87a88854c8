"""An older shmkv, built from git and importable beside the current one as ``shmkv_fixed``.

The variable-size core must stay within 10 % of the fixed-slot core it replaces, and this VM's
speed drifts from minute to minute: only ratios measured in one run mean anything. So
bench/suite.py measures the old core in the same process and the same round robin as the
new one. This exports the old revision's ``shmkv/`` and ``csrc/``, renames the package to
``shmkv_fixed`` (its cffi module too, so that both cores can be loaded at once), compiles it
in place and imports it.
"""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import types

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = "shmkv_fixed"

# Absolute imports of the package inside it; relative imports need no change.
_IMPORT = re.compile(r"^(\s*)(from shmkv([.\s])|import shmkv$)", re.MULTILINE)
# Compiles the exported core in place, with the interpreter of the suite. run_path does not
# run the builder's own __main__ block, which may change from one revision to the next.
_COMPILE = ("import runpy; runpy.run_path('csrc/shmkv_build.py')['ffibuilder']"
            ".compile(tmpdir='.', verbose=False)")


def _run(args: list[str], cwd: str, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(args, cwd=cwd, input=stdin, capture_output=True)
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip().splitlines()
        raise RuntimeError(f"{args[0]} failed: {err[-1] if err else done.returncode}")
    return done.stdout


def _rename(match: re.Match[str]) -> str:
    indent, statement = match.group(1), match.group(2)
    if statement.startswith("import"):
        return f"{indent}import {PACKAGE} as shmkv"
    return f"{indent}from {PACKAGE}{match.group(3)}"


def build_baseline(rev: str, workdir: str) -> types.ModuleType:
    """Exports revision rev of this repository into workdir, builds it and imports it as
    shmkv_fixed. Raises RuntimeError (or OSError) if git, the revision or a compiler is
    missing."""
    tree = os.path.join(workdir, "tree")
    os.makedirs(tree)
    archive = _run(["git", "-C", REPO, "archive", rev, "shmkv", "csrc"], REPO)
    _run(["tar", "-x", "-C", tree], tree, archive)
    os.rename(os.path.join(tree, "shmkv"), os.path.join(tree, PACKAGE))
    for folder, _, files in os.walk(os.path.join(tree, PACKAGE)):
        for file in files:
            if file.endswith(".py"):
                path = os.path.join(folder, file)
                with open(path) as f:
                    text = f.read()
                with open(path, "w") as f:
                    f.write(_IMPORT.sub(_rename, text))
    builder = os.path.join(tree, "csrc", "shmkv_build.py")
    with open(builder) as f:
        text = f.read()
    if text.count('"shmkv._core"') != 1:
        raise RuntimeError(f"{rev}'s csrc/shmkv_build.py does not name \"shmkv._core\" once")
    with open(builder, "w") as f:
        f.write(text.replace('"shmkv._core"', f'"{PACKAGE}._core"'))
    _run([sys.executable, "-c", _COMPILE], tree)
    sys.path.insert(0, tree)
    return importlib.import_module(PACKAGE)
