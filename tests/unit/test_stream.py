"""build_stream on real shards: exact round trip, channel decoding, resume, bad input, pipe: URLs, twemoji."""

from __future__ import annotations

import io
import json
import logging
import tarfile
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distgan.config import DataConfig
from distgan.data import DataError, build_stream
from distgan.data.cache import materialize
from distgan.data.decode import decode_sample, to_channels
from distgan.data.normalize import normalize_images
from distgan.data.shards import MANIFEST, write_shards


def make_folder(root: Path, classes=("cat", "dog"), per_class=12, size=16, seed=0) -> dict[bytes, int]:
    rng = np.random.default_rng(seed)
    pixels = {}
    for label, c in enumerate(classes):
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(a).save(folder / f"{i}.png")
            pixels[a.tobytes()] = label
    return pixels


def as_uint8(x: torch.Tensor) -> np.ndarray:
    assert x.dtype == torch.uint8  # pixels travel as uint8; the device normalises them
    return x.numpy()


def cfg(source, **kw) -> DataConfig:
    base = dict(source=str(source), resolution=16, channels=3, batch_size=4, workers=2, hflip=False,
                shuffle_buffer=100, max_skip_fraction=0.05)
    base.update(kw)
    return DataConfig(**base)


@pytest.fixture
def shards(tmp_path) -> tuple[Path, dict[bytes, int]]:
    pixels = make_folder(tmp_path / "src")
    write_shards(str(tmp_path / "src"), tmp_path / "sh", resolution=16, crop="none", shard_size=5, workers=1,
                 progress=False)
    return tmp_path / "sh", pixels


def epoch_samples(stream, n_batches) -> list[tuple[bytes, int]]:
    out = []
    for x, y in islice(stream, n_batches):
        assert x.dtype == torch.uint8 and y.dtype == torch.int64
        out += [(img.transpose(1, 2, 0).tobytes(), int(label)) for img, label in zip(as_uint8(x), y)]
    return out


def test_roundtrip_exact_pixels_labels_once_per_epoch(shards):
    folder, pixels = shards
    with build_stream(cfg(folder), seed=0, rank=0, world_size=1) as s:
        assert s.batches_per_epoch == 6 and s.info.num_samples == 24
        assert s.info.class_names == ["cat", "dog"] and s.info.num_classes == 2
        first, second = epoch_samples(s, 6), epoch_samples(s, 6)
        assert s.stats() == {"skipped": 0, "epoch": 2, "batches": 0}
    assert sorted(first) == sorted(pixels.items()) == sorted(second)
    assert first != second  # reshuffled per epoch
    with build_stream(cfg(folder, batch_size=5, workers=0), seed=0) as s:  # 24 = 4*5 + 4 dropped
        got = epoch_samples(s, 4)
    assert len(set(got)) == 20 and set(got) <= set(pixels.items())
    with build_stream(cfg(folder, hflip=True), seed=0) as s:
        flipped = [np.frombuffer(b, np.uint8).reshape(16, 16, 3)[:, ::-1].tobytes() for b, _ in epoch_samples(s, 6)]
    n_flipped = sum(b in pixels for b in flipped)  # mirrored back, these match an original
    assert 4 <= n_flipped <= 20


def test_channel_conversions():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (0, 0, 0, 0))
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 255, 0, 255, 0] + [0] * 762)
    pal.putpixel((0, 0), 0)
    pal.info["transparency"] = 0
    la = Image.new("LA", (4, 4), (10, 255))
    la.putpixel((0, 0), (10, 0))
    i16 = Image.fromarray(np.array([[0, 257 * 50], [65535, 65535]], dtype=np.uint16))
    cmyk = Image.new("CMYK", (4, 4), (255, 0, 0, 0))
    cmyk.putpixel((0, 0), (0, 0, 0, 0))
    cases = {  # image -> expected RGB at (0,0) and at (1,1)
        "rgba": (rgba, (255, 255, 255), (255, 0, 0)),
        "palette": (pal, (255, 255, 255), (0, 255, 0)),
        "la": (la, (255, 255, 255), (10, 10, 10)),
        "i16": (i16, (0, 0, 0), (255, 255, 255)),
        "cmyk": (cmyk, (255, 255, 255), (0, 255, 255)),
        "gray": (Image.new("L", (4, 4), 100), (100, 100, 100), (100, 100, 100)),
        "bits": (Image.new("1", (4, 4), 1), (255, 255, 255), (255, 255, 255)),
    }
    for name, (img, at0, at1) in cases.items():
        rgb = np.asarray(to_channels(img, 3))
        assert rgb.dtype == np.uint8 and rgb.shape[2] == 3, name
        assert tuple(rgb[0, 0]) == at0 and tuple(rgb[1, 1]) == at1, name
        gray = np.asarray(to_channels(img, 1))
        assert gray.ndim == 2 and gray[1, 1] == round(0.299 * at1[0] + 0.587 * at1[1] + 0.114 * at1[2]), name
    assert np.asarray(to_channels(i16, 1))[0, 1] == 50  # 16-bit scaled, not clipped
    # The stream side decodes such files from shards written elsewhere (here: raw 16-bit PNG bytes).
    buf = io.BytesIO()
    i16.save(buf, "PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    x, label, resized = decode_sample({"__url__": "s.tar", "__key__": "k", "png": buf.getvalue(), "cls": b"3"}, 2, 3)
    assert x.shape == (3, 2, 2) and x[:, 1, 0].tolist() == [255] * 3 and label == 3 and not resized


def test_channels_end_to_end_and_resize(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(src / "clear.png")
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(src / "white16.png")
    Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(src / "black.tiff")
    Image.new("P", (8, 8), 0).save(src / "pal.png")
    write_shards(str(src), tmp_path / "sh", resolution=8, crop="none", shard_size=2, progress=False)
    with pytest.warns(UserWarning, match="resized while decoding"):
        s = build_stream(cfg(tmp_path / "sh", resolution=16, channels=1, batch_size=4, workers=1), seed=0)
    with s:
        x, y = next(iter(s))
    assert x.shape == (4, 1, 16, 16) and y.tolist() == [0] * 4 and s.info.class_names == []
    assert sorted(np.unique(as_uint8(x)).tolist()) == [0, 255]  # white, white, black, black(palette 0)


def test_resume_replays_exactly(shards):
    folder, _ = shards
    # 4 workers: quotas 2,2,1,1 per epoch (padding turns; a resume inside a turn)
    for buf, workers in ((1, 2), (100, 2), (100, 0), (100, 4)):
        c = cfg(folder, shuffle_buffer=buf, workers=workers, hflip=True)
        with build_stream(c, seed=3) as ref_stream:
            ref = list(islice(ref_stream, 14))  # crosses two epoch boundaries
            assert ref_stream.loader_passes == 1  # ... within one loader pass: no drain, no restart
        for k in (4, 8):
            with build_stream(c, seed=3) as s1:
                for _, (x, _) in zip(range(k), s1):
                    pass
                state = json.loads(json.dumps(s1.state_dict()))
            assert state["epoch"] == k // 6 and state["batches"] == k % 6
            with build_stream(c, seed=3) as s2:
                s2.load_state_dict(state)
                resumed = list(islice(s2, 6))
            for (x, y), (rx, ry) in zip(resumed, ref[k:k + 6]):
                assert torch.equal(x, rx) and torch.equal(y, ry), (buf, workers, k)
            assert not torch.equal(resumed[0][0], ref[0][0])
    with build_stream(cfg(folder), seed=4) as other:
        assert not torch.equal(next(iter(other))[0], ref[0][0])  # another seed, another order
        with pytest.warns(UserWarning, match="different seed"):
            other.load_state_dict(state)


def _rewrite(path: Path, edit) -> None:
    with tarfile.open(path) as t:
        members = [(m.name, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(path, "w") as t:
        for name, data in edit(members):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_bad_input_skipped_then_threshold(tmp_path, caplog):
    make_folder(tmp_path / "src", classes=("",), per_class=40)
    sh = tmp_path / "sh"
    write_shards(str(tmp_path / "src"), sh, resolution=16, crop="none", shard_size=5, progress=False)
    # shard 1: a corrupt PNG and a sample without any image; 2: cut in half; 3: garbage; 4: gone.
    _rewrite(sh / "train-000001.tar", lambda ms: [(n, b"junk" if i == 0 else d) for i, (n, d) in enumerate(ms)
                                                  if i != 1] + [(ms[1][0].replace(".png", ".txt"), b"x")])
    data = (sh / "train-000002.tar").read_bytes()
    (sh / "train-000002.tar").write_bytes(data[: len(data) // 2])
    (sh / "train-000003.tar").write_bytes(np.random.default_rng(0).bytes(6000))
    (sh / "train-000004.tar").unlink()
    caplog.set_level(logging.WARNING, logger="distgan.data")
    with build_stream(cfg(sh, max_skip_fraction=0.9), seed=0) as s:
        assert s.batches_per_epoch == 10
        got = epoch_samples(s, 20)  # two full epochs: same batch count despite the losses
        skipped = s.stats()["skipped"]
    assert len(got) == 80 and s.stats()["epoch"] == 2
    assert 2 * (2 + 2 + 5 + 5) <= skipped <= 2 * (2 + 4 + 5 + 5)
    for i in range(1, 5):
        assert f"train-00000{i}.tar" in caplog.text
    assert "no image field" in caplog.text and "cannot decode" in caplog.text
    with build_stream(cfg(sh, max_skip_fraction=0.05), seed=0) as s:
        with pytest.raises(DataError, match=r"max_skip_fraction.*train-00000[1-4]\.tar"):
            list(islice(s, 10))
    # Workers whose shards are all unreadable: an error naming them, not an endless wait.
    with build_stream(cfg(f"{sh}/train-00000{{3,4}}.tar", max_skip_fraction=1.0, batch_size=5), seed=0) as s:
        with pytest.raises(DataError, match=r"no readable sample in its shards \['train-00000[34].tar'\]"):
            list(islice(s, 2))
    with pytest.raises(DataError, match="fewer than world_size x batch_size"):
        build_stream(cfg(sh, batch_size=50), seed=0)


def test_pipe_urls_and_brace_lists(shards):
    folder, pixels = shards
    sources = [f"pipe:cat {folder}/train-{{000000..000004}}.tar",
               f"{folder}/train-{{000000..000002}}.tar,{folder}/train-000003.tar,{folder}/train-000004.tar"]
    for source in sources:
        with build_stream(cfg(source, workers=2), seed=0) as s:
            assert s.info.num_samples == 24 and s.batches_per_epoch == 6
            assert sorted(epoch_samples(s, 6)) == sorted(pixels.items())
            assert s.info.class_names == ([] if source.startswith("pipe:") else ["cat", "dog"])


@pytest.fixture(scope="session")
def twemoji(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    t0 = time.perf_counter()
    folder = materialize("twemoji", 32, 3, cache, workers=2)
    print(f"\nbuiltin:twemoji materialized at 32x32 in {time.perf_counter() - t0:.1f} s")
    return cache, folder


def test_builtin_twemoji(twemoji):
    cache, folder = twemoji
    m = json.loads((folder / MANIFEST).read_text())
    assert m["num_samples"] == 4009 and m["skipped"] == 0 and "CC-BY 4.0" in m["license"]
    assert len(m["class_names"]) == 11 and m["class_names"][-1] == "Other" and "Flags" in m["class_names"]
    c = cfg("builtin:twemoji", cache_dir=str(cache), resolution=32, batch_size=64, workers=1)
    with build_stream(c, seed=0) as s:
        assert s.info.num_samples == 4009 and s.info.num_classes == 11 and s.batches_per_epoch == 62
        x, y = next(iter(s))
    assert x.shape == (64, 3, 32, 32) and int(y.max()) < 11
    assert (x[:, :, 0, 0] == 255).float().mean() > 0.8  # transparent corners flattened onto white


def test_normalize_images_exact_on_every_pixel_value():
    pixels = torch.arange(256, dtype=torch.uint8).view(4, 1, 8, 8)
    x = normalize_images(pixels)
    assert x.dtype == torch.float32 and x.shape == pixels.shape
    assert torch.equal(x, pixels.float() / 127.5 - 1)  # bit-identical to the float formula
    assert x.min() == -1.0 and x.max() == 1.0  # both ends exact
    already = torch.rand(2, 3, 4, 4) * 2 - 1
    assert normalize_images(already) is already  # float streams (tests, benchmarks) pass through
