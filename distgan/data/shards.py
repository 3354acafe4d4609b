"""Pack images into webdataset tar shards plus a ``dataset.json`` manifest (``distgan shards SRC OUT``).

Shard format (what ``stream.py`` reads): ``OUT/<prefix>-000000.tar ...``; each sample is
``<key>.<png|jpg|webp>`` (square, ``resolution`` pixels, 1 or 3 channels) and, when the source has
classes, ``<key>.cls`` (the integer label as text). Keys are the zero-padded sample index: no dots,
since webdataset splits the extension at the first dot. ``dataset.json`` records the sample count,
per-shard name/count/sha256, resolution, channels, class names, source, crop, resize filter,
license and the distgan version. Source files that cannot be decoded are skipped and listed in
``OUT/skipped.txt``.

Crash safety: a shard is written as ``<name>.tar.tmp`` and renamed once complete, and
``dataset.json`` is written last (also via rename), so every ``*.tar`` in OUT is a complete shard
and a folder without ``dataset.json`` is an unfinished run. Shards are byte-for-byte reproducible
(fixed tar metadata), so the sha256 values identify the content.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import random
import tarfile
import time
import zipfile
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
from PIL import Image
from tqdm import tqdm

from distgan.data.builtin import open_builtin
from distgan.data.decode import FILTERS, fit, open_image, to_channels
from distgan.data.format import FORMAT_VERSION, FORMATS, MANIFEST, SKIPPED, ShardsError, Source, shard_name


def distgan_version() -> str:
    """The installed distgan's version (recorded in dataset.json), else 'unknown'."""
    try:
        return importlib.metadata.version("distgan")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------- sources


def _ignored(rel: str) -> bool:
    # Hidden files and macOS resource forks (__MACOSX/._x.png) are never images worth reporting.
    return any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def _labelled(rels: list[str], strip_top: bool) -> tuple[list[str], list[tuple[str, int]], list[tuple[str, str]]]:
    """First-level folders become classes (sorted names); files beside them are skipped."""
    parts = [r.split("/") for r in rels]
    if strip_top and parts and all(len(p) > 1 for p in parts) and len({p[0] for p in parts}) == 1:
        parts = [p[1:] for p in parts]  # archives usually wrap everything in one top folder
    if not any(len(p) > 1 for p in parts):
        return [], [(r, -1) for r in rels], []
    classes = sorted({p[0] for p in parts if len(p) > 1})
    index = {c: i for i, c in enumerate(classes)}
    keep, skipped = [], []
    for rel, p in zip(rels, parts):
        if len(p) > 1:
            keep.append((rel, index[p[0]]))
        else:
            skipped.append((rel, "not inside a class folder (the other files are in class folders)"))
    return classes, keep, skipped


def _archive_items(path: Path, names: list[tuple[str, int]], kind: str) -> Iterator[tuple[str, Any, int]]:
    """Read members lazily, one at a time, so memory stays bounded by the conversion window."""
    with (zipfile.ZipFile(path) if kind == "zip" else tarfile.open(path)) as ar:
        members = {} if kind == "zip" else {m.name: m for m in ar.getmembers()}  # getmember() is O(n)
        for name, label in names:
            try:
                data = ar.read(name) if kind == "zip" else ar.extractfile(members[name]).read()
            except Exception as e:  # CRC errors, truncated archive: skip this member only
                data = ValueError(f"cannot read from {path.name}: {type(e).__name__}: {e}")  # picklable
            yield name, data, label


def open_source(spec: str, shuffle: bool = True, seed: int = 0) -> Source:
    """SRC string -> Source: an image folder, a .zip/.tar archive, or ``builtin:<name>``."""
    if spec.startswith("builtin:"):
        src = open_builtin(spec.split(":", 1)[1])
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            rels = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
            kind = "dir"
        elif path.is_file() and zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                rels, kind = sorted(i.filename for i in z.infolist() if not i.is_dir()), "zip"
        elif path.is_file() and tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                rels, kind = sorted(m.name for m in t.getmembers() if m.isfile()), "tar"
        else:
            raise ShardsError(f"{spec}: not an image folder, .zip, .tar or builtin:<name> (builtin:twemoji, "
                              f"builtin:fashion-mnist)")
        classes, items, skipped = _labelled([r for r in rels if not _ignored(r)], strip_top=kind != "dir")
        if shuffle:  # mix classes across shards; the stream's shuffle buffer only mixes locally
            random.Random(seed).shuffle(items)
        if kind == "dir":
            gen: Iterable = ((rel, str(path / rel), label) for rel, label in items)
        else:
            gen = _archive_items(path, items, kind)
        return Source(str(spec), gen, classes, len(items), "", skipped)
    if shuffle:
        items = list(src.items)
        random.Random(seed).shuffle(items)
        src.items = items
    return src


def _convert(item: tuple[str, Any, int], resolution: int, channels: int, crop: str, resize_filter: str,
             fmt: str) -> tuple[str, int, bytes | None, str]:
    """Worker: payload -> encoded square image. Never raises: errors come back as text."""
    name, payload, label = item
    try:
        if isinstance(payload, BaseException):
            raise payload
        if isinstance(payload, np.ndarray):
            img = Image.fromarray(payload)
        else:
            data = Path(payload).read_bytes() if isinstance(payload, str) else payload
            img = open_image(data, exif=True)
        img = fit(to_channels(img, channels), resolution, crop, resize_filter)
        buf = io.BytesIO()
        if fmt == "png":
            img.save(buf, "PNG")
        elif fmt == "jpg":
            img.save(buf, "JPEG", quality=95)
        else:
            img.save(buf, "WEBP", quality=95)
        return name, label, buf.getvalue(), ""
    except Image.UnidentifiedImageError:
        return name, label, None, "not an image in a format PIL reads"
    except Exception as e:
        return name, label, None, f"{type(e).__name__}: {e}"


# ---------------------------------------------------------------------------- writing


class _ShardWriter:
    """Fills ``<prefix>-NNNNNN.tar.tmp`` files and renames each one when it is complete."""

    def __init__(self, out: Path, prefix: str, shard_size: int, ext: str):
        self.out, self.prefix, self.shard_size, self.ext = out, prefix, shard_size, ext
        self.shards: list[dict[str, Any]] = []
        self.tar: tarfile.TarFile | None = None
        self.tmp: Path | None = None
        self.count = self.total = 0
        self.class_counts: dict[int, int] = {}
        """Samples per label written so far (the manifest's `class_counts`)."""

    def _add(self, tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)  # fixed metadata: identical input -> identical bytes
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))

    def add(self, data: bytes, label: int) -> None:
        if self.tar is None:
            self.tmp = self.out / f"{shard_name(self.prefix, len(self.shards))}.tmp"
            self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)
        key = f"{self.total:08d}"
        self._add(self.tar, f"{key}.{self.ext}", data)
        if label >= 0:
            self._add(self.tar, f"{key}.cls", str(label).encode())
            self.class_counts[label] = self.class_counts.get(label, 0) + 1
        self.count += 1
        self.total += 1
        if self.count == self.shard_size:
            self.close_shard()

    def close_shard(self) -> None:
        if self.tar is None:
            return
        self.tar.close()
        with open(self.tmp, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()
            os.fsync(f.fileno())
        final = self.tmp.with_suffix("")  # x.tar.tmp -> x.tar, atomic on one filesystem
        os.replace(self.tmp, final)
        self.shards.append({"name": final.name, "count": self.count, "sha256": digest})
        self.tar, self.tmp, self.count = None, None, 0

    def abort(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tmp.unlink(missing_ok=True)
            self.tar = None


def _prepare_out(out: Path, overwrite: bool, prefix: str) -> None:
    if out.exists() and not out.is_dir():
        raise ShardsError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ShardsError(f"{out} is not empty; pass --overwrite to replace its shards")
        # The manifest goes first: an overwrite interrupted half-way must not look finished.
        (out / MANIFEST).unlink(missing_ok=True)
        for p in [*out.glob(f"{prefix}-*.tar"), *out.glob("*.tar.tmp"), out / SKIPPED, out / f"{MANIFEST}.tmp"]:
            p.unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)


def write_shards(source: str | Source, out: str | os.PathLike, *, resolution: int = 64, channels: int = 3,
                 crop: str = "center", resize_filter: str = "lanczos", fmt: str = "png", shard_size: int = 1000,
                 workers: int = 1, prefix: str = "train", overwrite: bool = False, shuffle: bool = True,
                 seed: int = 0, progress: bool = True, limit: int | None = None) -> dict[str, Any]:
    """Convert ``source`` into shards under ``out``; returns the manifest (also in dataset.json).

    ``limit`` keeps only the first that many usable images of the (seeded, shuffled) order: a
    fixed random subset, for small-data experiments.

    ``workers`` > 1 decodes/resizes in that many processes; the output order (and so every shard
    byte) does not depend on it. Bad files are skipped and listed, never fatal.
    """
    if resolution < 1 or shard_size < 1 or channels not in (1, 3):
        raise ShardsError("resolution and shard_size must be positive and channels 1 or 3")
    if crop not in ("center", "none") or resize_filter not in FILTERS or fmt not in FORMATS:
        raise ShardsError(f"crop must be center|none, resize_filter one of {sorted(FILTERS)}, fmt png|jpg|webp")
    if "." in prefix or "/" in prefix:
        raise ShardsError(f"prefix {prefix!r} may not contain '.' or '/'")
    out = Path(out).expanduser()
    src = source if isinstance(source, Source) else open_source(source, shuffle=shuffle, seed=seed)
    _prepare_out(out, overwrite, prefix)
    convert = partial(_convert, resolution=resolution, channels=channels, crop=crop, resize_filter=resize_filter,
                      fmt=fmt)
    writer = _ShardWriter(out, prefix, shard_size, fmt)
    skipped = list(src.skipped)
    total = src.count if limit is None or src.count is None else min(src.count, limit)
    bar = tqdm(total=total, unit="file", desc=f"shards {out.name}", disable=not progress, smoothing=0.1)
    pool = multiprocessing.get_context().Pool(workers) if workers > 1 else None
    try:
        items = iter(src.items)
        # Windows of items keep memory bounded: Pool.imap would read the whole source ahead.
        window = max(64, 32 * workers)
        while (limit is None or writer.total < limit) and (chunk := list(islice(items, window))):
            results = pool.map(convert, chunk, chunksize=8) if pool else map(convert, chunk)
            for name, label, data, err in results:
                if limit is not None and writer.total >= limit:
                    break
                if data is None:
                    skipped.append((name, err))
                else:
                    writer.add(data, label)
                bar.update(1)
        writer.close_shard()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    (out / SKIPPED).write_text("".join(f"{n}\t{why}\n" for n, why in skipped))
    if writer.total == 0:  # an empty dataset would only fail later, far from the cause
        raise ShardsError(f"no usable image in {src.name} ({len(skipped)} files skipped, see {out / SKIPPED})")
    manifest = {
        "format": "distgan-shards", "format_version": FORMAT_VERSION, "num_samples": writer.total,
        "shards": writer.shards, "resolution": resolution, "channels": channels, "image_format": fmt,
        "class_names": list(src.class_names),
        # Samples per class: what a conditional G's fake labels are drawn from (`loss.fake_labels`).
        "class_counts": [writer.class_counts.get(i, 0) for i in range(len(src.class_names))],
        "source": src.name, "crop": crop, "resize_filter": resize_filter,
        "license": src.license, "skipped": len(skipped), "shuffled": shuffle, "seed": seed, "limit": limit,
        "distgan_version": distgan_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    tmp = out / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / MANIFEST)  # last: its presence means every listed shard is complete
    return manifest
