"""Data: ``shards`` (folders/archives/built-ins -> webdataset shards, format in ``format``),
``builtin`` datasets materialized by ``cache``, and the per-rank training stream
(``build_stream``). See ``stream.py`` for the epoch layout and resume rules.
"""

from distgan.data.stream import DatasetInfo, ImageStream, build_stream
from distgan.errors import DataError

__all__ = ["build_stream", "DatasetInfo", "DataError", "ImageStream"]
