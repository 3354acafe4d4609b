"""Data: ``distgan shards`` (folders/archives/built-ins -> webdataset shards) and the per-rank
training stream (``build_stream``). See ``stream.py`` for the epoch layout and resume rules.

The stream names are loaded lazily so that ``distgan shards`` (and ``python -m
distgan.data.shards``) do not import torch and webdataset.
"""

from typing import Any

__all__ = ["build_stream", "DatasetInfo", "DataError", "ImageStream"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from distgan.data import stream

        return getattr(stream, name)
    raise AttributeError(f"module 'distgan.data' has no attribute {name!r}")
