# Developer commands. `make help` lists them. Every target uses the virtualenv in $(VENV),
# made on first use, so none of them touches the system Python.

PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
CFILES  = $(wildcard csrc/*.c)

.PHONY: help build test demo bench lint cwarn sanitize clean

help:
	@echo "build     install shmkv editable with the test and lint tools (C warnings are errors)"
	@echo "test      run the test suite"
	@echo "demo      run the master/workers demo"
	@echo "bench     run the benchmarks"
	@echo "lint      ruff and mypy on the package, C warnings as errors"
	@echo "sanitize  build with AddressSanitizer + UBSan in a scratch copy and run every test"
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

clean:
	rm -rf build dist *.egg-info shmkv/_core.*.so shmkv/_core.c .pytest_cache .mypy_cache .ruff_cache
