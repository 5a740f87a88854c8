"""Builds shmkv's C core through cffi; the metadata lives in pyproject.toml.

cffi compiles the core against Python's limited API (the file is ``_core.abi3.so``), so one
wheel serves CPython 3.9 and every later version: the wheel is tagged ``cp39-abi3``."""

from setuptools import setup

setup(cffi_modules=["csrc/shmkv_build.py:ffibuilder"],
      options={"bdist_wheel": {"py_limited_api": "cp39"}})
