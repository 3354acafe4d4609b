"""The shard format, shared by its writer (``shards.py``), the built-in datasets (``builtin.py``)
and the training stream (``stream.py``): file names, the ``dataset.json`` manifest, shard URLs.

A shard folder holds ``<prefix>-000000.tar ...`` and ``dataset.json``, written last; see
``shards.py`` for what a shard contains and why every ``*.tar`` in a folder is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import braceexpand
import webdataset as wds
from webdataset.tariterators import base_plus_ext

from distgan.errors import DataError

MANIFEST = "dataset.json"
SKIPPED = "skipped.txt"
FORMAT_VERSION = 1
FORMATS = ("png", "jpg", "webp")


class ShardsError(DataError, ValueError):
    """A problem with the images to pack or the output folder that the user has to fix."""


@dataclass
class Source:
    """Images to pack. ``items`` yields (display name, payload, label or -1), where the payload is
    a file path (str, read by the worker), encoded image bytes, a uint8 array, or an exception
    (the item could not even be read; it is skipped and listed)."""

    name: str
    items: Iterable[tuple[str, Any, int]]
    class_names: list[str] = field(default_factory=list)
    count: int | None = None
    license: str = ""
    skipped: list[tuple[str, str]] = field(default_factory=list)


def shard_name(prefix: str, index: int) -> str:
    """File name of shard number ``index`` (the writer adds ``.tmp`` until the shard is complete)."""
    return f"{prefix}-{index:06d}.tar"


def read_manifest(folder: Path) -> dict[str, Any] | None:
    """``folder/dataset.json``, or None when the folder has none; DataError when it is unreadable."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable manifest ({e}); rewrite the shards with `distgan shards`") from None


def expand_urls(spec: str) -> list[str]:
    """Comma list (commas inside {..} belong to brace patterns) -> brace-expanded URLs."""
    parts, depth, cur = [], 0, ""
    for ch in spec:
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return [u for p in parts if p.strip() for u in braceexpand.braceexpand(p.strip())]


def count_samples(url: str) -> int:
    """Samples in one shard, from its tar headers (what group_by_keys would yield)."""
    n, last, stream = 0, None, None
    try:
        stream = wds.gopen(url, "rb")
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for m in tar:
                prefix = base_plus_ext(m.name)[0] if m.isreg() else None
                if prefix is not None and prefix != last and not prefix.startswith("__"):
                    n, last = n + 1, prefix
    except Exception as e:
        logging.getLogger("distgan.data").warning("%s: cannot count its samples (%s); using %d", url, e, n)
    finally:
        with contextlib.suppress(Exception):
            stream.close()
    return n
