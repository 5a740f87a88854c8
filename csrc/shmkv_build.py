"""The cffi builder of shmkv's C core, in API (out-of-line) mode.

setup.py names it in ``cffi_modules``; it is never imported at run time. The declarations
cffi binds are read from ``shmkv_api.h``, the same header every C file includes.

Build switches (environment variables, read at build time):

``SHMKV_WERROR=1``
    treat C warnings as errors (CI sets it).
``SHMKV_SANITIZE=1``
    build with AddressSanitizer and UndefinedBehaviorSanitizer (``make sanitize``).
``SHMKV_DEBUG=1``
    define ``SHMKV_DEBUG``: run the full invariant check after every mutation.
"""

from __future__ import annotations

import os

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = ["table.c", "handle.c", "index.c", "alloc.c", "expiry.c", "evict.c", "recover.c",
           "check.c", "lock.c", "siphash.c"]


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


def _compile_args() -> list[str]:
    args = ["-O2", "-Wall", "-Wextra", "-D_GNU_SOURCE"]
    if _flag("SHMKV_WERROR"):
        args.append("-Werror")
    if _flag("SHMKV_DEBUG"):
        args.append("-DSHMKV_DEBUG")
    if _flag("SHMKV_SANITIZE"):
        args += ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-O1",
                 "-fno-sanitize-recover=undefined"]
    return args


def _link_args() -> list[str]:
    return ["-fsanitize=address,undefined"] if _flag("SHMKV_SANITIZE") else []


def _relative(path: str) -> str:
    # setuptools wants source paths relative to the directory of setup.py.
    return os.path.relpath(path, os.getcwd())


ffibuilder = FFI()
with open(os.path.join(HERE, "shmkv_api.h")) as header:
    ffibuilder.cdef(header.read())
ffibuilder.set_source(
    "shmkv._core",
    '#include "shmkv.h"',
    sources=[_relative(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[_relative(HERE)],
    depends=[_relative(os.path.join(HERE, h)) for h in ("shmkv_api.h", "shmkv.h", "layout.h")],
    extra_compile_args=_compile_args(),
    extra_link_args=_link_args(),
    libraries=["pthread", "dl"],  # glibc before 2.34 keeps them apart from libc
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
