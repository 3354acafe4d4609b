"""`distgan shards` / write_shards: manifest, bad files, crash safety, archives, fashion-mnist idx files."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from distgan.cli import main
from distgan.data.builtin import FASHION_CLASSES
from distgan.data.cache import materialize
from distgan.data.format import MANIFEST, ShardsError, Source
from distgan.data.shards import write_shards
from tests.helpers import REPO, make_image_folder



def make_folder(root: Path, classes=("cat", "dog"), per_class=12, size=16, seed=0) -> dict[bytes, int]:
    """Random PNGs in class subfolders; returns {pixel bytes: label}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for label, c in enumerate(classes):
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(root / c / f"{i}.png")
            pixels[a.tobytes()] = label
    return pixels


def tar_samples(path: Path) -> dict[str, dict[str, bytes]]:
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            key, ext = m.name.split(".", 1)
            out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def test_cli_folder_manifest_and_bad_files(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    pixels = make_folder(src)
    (src / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (src / "dog" / "notes.txt").write_text("hello")
    (src / ".DS_Store").write_bytes(b"\0")  # hidden: ignored silently
    res = CliRunner().invoke(main, ["shards", str(src), str(out), "--resolution", "16", "--crop", "none",
                                              "--shard-size", "5", "--workers", "2", "--quiet"])
    assert res.exit_code == 0, res.output
    assert "24 samples in 5 shards" in res.output and "2 skipped" in res.output
    m = json.loads((out / MANIFEST).read_text())
    assert m["num_samples"] == 24 and [s["count"] for s in m["shards"]] == [5, 5, 5, 5, 4]
    assert m["class_names"] == ["cat", "dog"] and m["resolution"] == 16 and m["channels"] == 3
    assert m["resize_filter"] == "lanczos" and m["crop"] == "none" and m["skipped"] == 2
    assert m["distgan_version"] and m["source"] == str(src)
    skipped = (out / "skipped.txt").read_text()
    assert "cat/broken.png" in skipped and "dog/notes.txt" in skipped
    shard_names = [f"train-00000{i}.tar" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "skipped.txt"] + shard_names
    seen = {}
    for s in m["shards"]:
        data = (out / s["name"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == s["sha256"]
        for key, fields in tar_samples(out / s["name"]).items():
            assert key.isdigit() and len(key) == 8 and set(fields) == {"png", "cls"}
            seen[np.asarray(Image.open(io.BytesIO(fields["png"]))).tobytes()] = int(fields["cls"])
    assert seen == pixels  # lossless, labels kept, every image once


def test_help_example_refuse_nonempty_and_overwrite(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["shards", "--help"])
    assert res.exit_code == 0 and "Example" in res.output and "distgan shards" in res.output
    src, out = tmp_path / "src", tmp_path / "out"
    make_folder(src, per_class=3)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = runner.invoke(main, ["shards", str(src), str(out), "--resolution", "8", "--quiet", "--workers", "1"])
    assert res.exit_code == ShardsError.exit_code and "--overwrite" in res.stderr
    res = runner.invoke(main, ["shards", str(src), str(out), "--resolution", "8", "--quiet", "--overwrite",
                                         "--workers", "1", "--prefix", "val", "--format", "jpg"])
    assert res.exit_code == 0, res.output
    m = json.loads((out / MANIFEST).read_text())
    assert m["shards"][0]["name"] == "val-000000.tar" and (out / "keep.txt").exists()
    fields = tar_samples(out / "val-000000.tar")["00000000"]
    assert Image.open(io.BytesIO(fields["jpg"])).size == (8, 8)


def test_sigkill_leaves_only_complete_shards(tmp_path):
    """Kill `python -m distgan shards` after its first shard: no partial *.tar, no manifest."""
    src, out = tmp_path / "src", tmp_path / "out"
    (src / "a").mkdir(parents=True)
    big = np.random.default_rng(0).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    Image.fromarray(big).save(src / "a" / "0.png")
    for i in range(1, 3000):  # same bytes, many files: ~150 shards of work after the first one is seen
        os.link(src / "a" / "0.png", src / "a" / f"{i}.png")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "distgan", "shards", str(src), str(out), "--resolution", "32",
           "--shard-size", "20", "--workers", "1", "--quiet", "--no-shuffle"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 300  # start-up (importing torch) can take long on a loaded machine
    while not list(out.glob("*.tar")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / MANIFEST).exists(), "the run finished before it could be killed"
    tars = sorted(out.glob("*.tar"))
    assert tars and all(len(tar_samples(t)) == 20 for t in tars)  # every *.tar is a whole shard
    assert all(p.suffix in (".tar", ".tmp") for p in out.iterdir())
    # A rerun must be told to overwrite; then it completes.
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == ShardsError.exit_code
    done = subprocess.run(cmd + ["--overwrite"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    m = json.loads((out / MANIFEST).read_text())
    assert m["num_samples"] == 3000 and len(m["shards"]) == 150 and not list(out.glob("*.tmp"))


def test_source_that_raises_midway(tmp_path):
    def items():
        for i in range(150):
            yield f"img{i}", np.full((4, 4), i, np.uint8), -1
        raise RuntimeError("disk went away")

    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk went away"):
        write_shards(Source("gen", items()), out, resolution=4, channels=1, shard_size=10, progress=False)
    names = sorted(p.name for p in out.iterdir())  # the shard in progress was removed, no manifest
    assert names and all(n.endswith(".tar") for n in names)
    assert all(len(tar_samples(out / n)) == 10 for n in names)
    with pytest.raises(ShardsError, match="not empty"):
        write_shards(Source("gen", items()), out, resolution=4, channels=1, progress=False)
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "a.txt").write_text("no images here")
    with pytest.raises(ShardsError, match="no usable image"):
        write_shards(str(tmp_path / "empty"), tmp_path / "out2", progress=False)


def test_zip_and_tar_sources_deterministic(tmp_path):
    src = tmp_path / "src"
    pixels = make_folder(src / "top", classes=("x", "y", "z"), per_class=4, size=8)
    zpath, tpath = tmp_path / "imgs.zip", tmp_path / "imgs.tar"
    with zipfile.ZipFile(zpath, "w") as z, tarfile.open(tpath, "w") as t:
        for p in sorted(src.rglob("*.png")):
            z.write(p, p.relative_to(src).as_posix())
            t.add(p, p.relative_to(src).as_posix())
        z.writestr("top/x/corrupt.png", b"garbage")
    manifests = []
    for source, workers in ((zpath, 1), (tpath, 2), (zpath, 2)):
        out = tmp_path / f"out-{source.suffix[1:]}-{workers}"
        manifests.append(write_shards(str(source), out, resolution=8, crop="none", shard_size=5, workers=workers,
                                      progress=False))
        assert manifests[-1]["class_names"] == ["x", "y", "z"]  # common top folder stripped
        got = {}
        for s in manifests[-1]["shards"]:
            for f in tar_samples(out / s["name"]).values():
                got[np.asarray(Image.open(io.BytesIO(f["png"]))).tobytes()] = int(f["cls"])
        assert got == pixels
    assert manifests[0]["skipped"] == 1 and manifests[1]["skipped"] == 0
    # Same source, different worker counts: byte-identical shards.
    assert [s["sha256"] for s in manifests[0]["shards"]] == [s["sha256"] for s in manifests[2]["shards"]]


def _write_idx(path: Path, arr: np.ndarray) -> None:
    header = bytes([0, 0, 8, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def _materialize_fm(cache: str) -> tuple[str, int]:
    folder = materialize("fashion-mnist", 28, 1, cache, workers=1, progress=False)
    return str(folder), (folder / MANIFEST).stat().st_ino


def test_fashion_mnist_idx_and_cache(tmp_path, monkeypatch):
    root = tmp_path / "fm"
    root.mkdir()
    monkeypatch.setenv("DISTGAN_FASHION_MNIST_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(ShardsError, match="dataset-fashion-mnist"):
        write_shards("builtin:fashion-mnist", tmp_path / "x", progress=False)
    images = np.random.default_rng(1).integers(0, 256, (30, 28, 28), dtype=np.uint8)
    _write_idx(root / "train-images-idx3-ubyte.gz", images)
    _write_idx(root / "train-labels-idx1-ubyte.gz", np.arange(30) % 10)
    monkeypatch.setenv("DISTGAN_FASHION_MNIST_DIR", str(root))
    cache = tmp_path / "cache"
    (cache / "fashion-mnist-r28-c1-v2.tmp-12345").mkdir(parents=True)  # a killed build's leftovers
    folder = materialize("fashion-mnist", 28, 1, cache, workers=1, progress=False)
    m = json.loads((folder / MANIFEST).read_text())
    assert m["num_samples"] == 30 and m["class_names"] == FASHION_CLASSES and "Zalando" in m["license"]
    assert sorted(p.name for p in cache.iterdir()) == ["fashion-mnist-r28-c1-v2", "fashion-mnist-r28-c1-v2.lock"]
    got = {np.asarray(Image.open(io.BytesIO(f["png"]))).tobytes(): int(f["cls"])
           for s in m["shards"] for f in tar_samples(folder / s["name"]).values()}
    assert got == {images[i].tobytes(): i % 10 for i in range(30)}
    before = (folder / MANIFEST).stat().st_mtime_ns
    assert materialize("fashion-mnist", 28, 1, cache) == folder  # cached, not rebuilt
    assert (folder / MANIFEST).stat().st_mtime_ns == before
    # Concurrent "ranks": one builds under the lock, the other waits and reuses the result.
    with multiprocessing.get_context("fork").Pool(3) as pool:
        results = pool.map(_materialize_fm, [str(tmp_path / "cache2")] * 3)
    final = Path(results[0][0])
    assert len(set(results)) == 1 and results[0][1] == (final / MANIFEST).stat().st_ino
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name, final.name + ".lock"]


def test_limit_keeps_the_first_images_of_the_seeded_order(tmp_path):
    """`distgan shards --limit N`: a fixed random subset of N images, the same for the same seed."""
    src = make_image_folder(tmp_path / "img", n_per_class=10)
    subset = write_shards(str(src), tmp_path / "a", resolution=8, limit=7, progress=False)
    again = write_shards(str(src), tmp_path / "b", resolution=8, limit=7, progress=False)
    whole = write_shards(str(src), tmp_path / "c", resolution=8, progress=False)
    assert subset["num_samples"] == 7 and subset["limit"] == 7 and whole["num_samples"] == 20
    shard = lambda out: (out / "train-000000.tar").read_bytes()  # noqa: E731
    assert shard(tmp_path / "a") == shard(tmp_path / "b")
