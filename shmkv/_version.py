"""The one place shmkv's version is written."""

__version__ = "0.1.0"
