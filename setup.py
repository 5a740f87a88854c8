"""Builds shmkv's C core through cffi; the metadata lives in pyproject.toml."""

from setuptools import setup

setup(cffi_modules=["csrc/shmkv_build.py:ffibuilder"])
