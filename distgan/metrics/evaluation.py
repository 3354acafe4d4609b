"""Evaluation glue between the trainer / CLI and `distgan.metrics`: FID/KID of a generator.

* During training (`eval.every_kimg`): `TrainingEvaluator` scores the EMA generator on every
  rank (each rank generates and featurizes its share; `metrics.evaluate` is collective) against
  real images from a separate stream over the training data with hflip off, and says whether
  the result is the best so far (the trainer then keeps the best checkpoint).
* `distgan eval --ckpt PATH` (distgan/cli/eval.py): `evaluate_checkpoint` scores a saved generator in one process and
  returns the scores with the settings that produced them (printed as one JSON line).

Every input problem (missing Inception weights, real data of another resolution than the
generator, fewer than 2 real images) is raised as `EvalError` before any image is generated;
during training, before the first step. An N larger than the real images the data holds is not an
error: the built-in emoji give 3,968 usable images, fewer than the default eval.n_samples=5000, and
the README's commands must run as printed. N becomes min(N, available), a notice says so once, and
the result records both (`n`, `n_requested`), because FID from fewer images is biased upward and is
comparable only with scores of the same N.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from pathlib import Path
from typing import Any, Callable

import torch

from distgan.config import Config, DataConfig, EvalConfig
from distgan.data.stream import build_stream, resolve_shards
from distgan.errors import EvalError
from distgan.metrics.extractors import resolve_inception_weights
from distgan.metrics.fid import evaluate
from distgan.preemption import first_pull_blocked
from distgan.sampling import generate, load_generator

log = logging.getLogger("distgan")

EVAL_PREFIX = "eval/"


# ---------------------------------------------------------------------------- checks and inputs


def resolve_weights(extractor: str, weights: str = "") -> str:
    """The Inception weights file that will be used ("" for `tiny`); EvalError with every
    source listed when none is available (e.g. offline without the file)."""
    if extractor == "tiny":
        return ""
    return str(resolve_inception_weights(weights))


def real_data_config(data: DataConfig, batch_size: int, source: str | None = None, **changes: Any) -> DataConfig:
    """The training data config for real images: same images, no random flips (FID compares
    the data as it is), each image at most once (no resampling), the eval batch size, and
    optionally another source."""
    return dataclasses.replace(data, hflip=False, resampled=False, batch_size=batch_size, source=source or data.source,
                               **changes)


def usable_real(num_samples: int, batch_size: int, world_size: int) -> tuple[int, int]:
    """(stream batch size, distinct real images one epoch yields over all ranks).

    The stream drops the leftover below world_size x batch_size, so a batch larger than a rank's
    share would yield nothing: it is capped at the share."""
    bs = max(1, min(batch_size, num_samples // max(world_size, 1)))
    return bs, (num_samples // (world_size * bs)) * bs * world_size


def images_to_use(n: int, available: int, source: str, key: str = "eval.n_samples") -> tuple[int, str]:
    """(N to evaluate with, notice): min(n, available), with a one-line notice when that is fewer
    than asked ("" otherwise). EvalError when fewer than 2 images would be left."""
    if n < 2:
        raise EvalError(f"{key}={n}: FID needs at least 2 images")
    if available < 2:
        raise EvalError(f"{source} yields only {available} distinct real image(s): FID needs at least 2")
    if available >= n:
        return n, ""
    return available, (f"{source} yields only {available} distinct real images, fewer than {key}={n}: evaluating "
                       f"with n={available} (FID from fewer images reads higher; compare only scores with the same n)")


def real_id(data: DataConfig, seed: int, world_size: int, batch_size: int) -> str:
    """A stable name of the real-image subset for the real-feature cache: the source (with its
    manifest's checksum when it has one, so rewritten shards are not mistaken for the old ones)
    and what picks the subset from it (seed, ranks, batch)."""
    digest = ""
    folder = Path(data.source).expanduser()
    if (folder / "dataset.json").is_file():
        digest = hashlib.sha256((folder / "dataset.json").read_bytes()).hexdigest()[:16]
    return f"{data.source}|{digest}|c{data.channels}|seed{seed}|world{world_size}|bs{batch_size}"


def _ema_generate(G, batch_size: int):
    """(z, labels) -> images in [-1, 1], float32, G in eval mode (independent samples)."""
    return lambda z, c: generate(G, z, c, batch_size=batch_size).float()


# ---------------------------------------------------------------------------- during training


class TrainingEvaluator:
    """FID/KID of the EMA generator every `eval.every_kimg`, on all ranks (a collective)."""

    def __init__(self, cfg: Config, backend, num_samples: int, z_dim: int, num_classes: int):
        self.cfg, self.backend = cfg, backend
        self.z_dim, self.num_classes = z_dim, num_classes
        ev: EvalConfig = cfg.eval
        self.every_nimg = ev.every_kimg * 1000
        self.batch_size, available = usable_real(num_samples, ev.batch_size, backend.world_size)
        # Checked now so that a run does not train for hours and then fail at its first evaluation.
        self.n, self.notice = images_to_use(ev.n_samples, available, cfg.data.source)
        if self.notice and backend.is_main:
            log.warning("eval: %s", self.notice)
        self.weights = resolve_weights(ev.extractor, ev.inception_weights)
        self.data = real_data_config(cfg.data, self.batch_size, workers=min(cfg.data.workers, 1))
        self.cache_dir = str(Path(cfg.data.cache_dir).expanduser() / "fid-real")

    def due(self, nimg: int, images_since_last_check: int, final: bool) -> bool:
        """True when the image counter crossed a multiple of every_kimg since the last check (or
        this is the last step). A pure function of the counter: every rank agrees without a
        collective, and a resumed run keeps the cadence."""
        if self.every_nimg <= 0:
            return False
        return final or nimg // self.every_nimg > (nimg - images_since_last_check) // self.every_nimg

    def run(self, G_ema, nimg: int, interrupt: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Scores as a log row (eval/fid, eval/kid, ..., with the settings). Every rank calls it.

        `interrupt` (this rank's preemption flag) is polled collectively every
        `train.signal_check_every` batches; `distgan.preemption.Preempted` is raised on every rank
        when any rank's flag is up, the evaluation given up."""
        b, ev = self.backend, self.cfg.eval
        start = time.perf_counter()
        if b.is_main:
            log.info("Evaluating the EMA generator at %.1f kimg: %d generated vs %d real images (%s)...", nimg / 1000,
                     self.n, self.n, ev.extractor)
        # A fresh stream each time: the same real images at every evaluation (and no extra
        # workers between evaluations). On a cache hit only SWD's images are read from it.
        stream = build_stream(self.data, self.cfg.train.seed, b.rank, b.world_size)
        try:
            # The stream's loader workers are forked with the preemption signals blocked (they must not
            # die of a SIGTERM meant for their rank); the rank keeps receiving them while it evaluates.
            result = evaluate(
                _ema_generate(G_ema, self.batch_size), self.z_dim, self.num_classes, first_pull_blocked(stream), self.n,
                extractor=ev.extractor, weights=self.weights, batch_size=ev.batch_size, seed=self.cfg.train.seed,
                device=b.device, cache_dir=self.cache_dir,
                real_id=real_id(self.data, self.cfg.train.seed, b.world_size, self.batch_size),
                rank=b.rank, world_size=b.world_size, n_real_available=None, resolution=self.data.resolution,
                interrupt=interrupt, poll_every=self.cfg.train.signal_check_every)
        finally:
            stream.close()
        row = {f"{EVAL_PREFIX}{k}": v for k, v in result.items()}
        row[f"{EVAL_PREFIX}n_requested"] = ev.n_samples  # eval/n_real and eval/n_fake hold the N used
        row.update({"kimg": nimg / 1000, f"{EVAL_PREFIX}seconds": time.perf_counter() - start})
        log.info("FID %.3f, KID %.5f ± %.5f, precision %.3f, recall %.3f (%s, %d real / %d fake), SWDx1e3 %.2f "
                 "(pixels, %d images) at %.1f kimg", result["fid"], result["kid"], result["kid_std"],
                 result["precision"], result["recall"], result["extractor"], result["n_real"], result["n_fake"],
                 result["swd"], result["swd_n"], nimg / 1000)
        return row


# ---------------------------------------------------------------------------- a saved checkpoint


def evaluate_checkpoint(ckpt: str | Path, data: str | None = None, n: int | None = None, extractor: str | None = None,
                        weights: str | None = None, batch_size: int | None = None, seed: int = 0, raw: bool = False,
                        device: str | None = None, progress=None) -> dict[str, Any]:
    """FID/KID of a checkpoint's generator against `data` (default: its training data).

    Returns the scores and the settings (ckpt, step, kimg, data, resolution, n, n_requested,
    extractor, weights, resize, seed, generator; `notice` when n had to be lowered to the real
    images available). `progress(msg)` is told that notice, and when generation starts.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    G, cfg, info = load_generator(ckpt, raw=raw, device=device)
    path = info.path
    ev = cfg.eval
    n_requested = ev.n_samples if n is None else n
    extractor = extractor or ev.extractor
    batch_size = batch_size or ev.batch_size
    source = data or cfg.data.source
    res, ch = cfg.data.resolution, cfg.data.channels

    # 1. Weights: the cheapest thing to be missing (offline clusters).
    weights_path = resolve_weights(extractor, weights if weights is not None else ev.inception_weights)
    # 2. Real data: same resolution as the generator (the stream would silently resize it).
    shards = resolve_shards(source, cfg.data.cache_dir, res, ch)
    if shards.resolution and shards.resolution != res:
        raise EvalError(f"{path} generates {res}x{res} images but {source} holds {shards.resolution}x"
                        f"{shards.resolution} images: evaluate against data of the checkpoint's resolution "
                        f"(e.g. `distgan shards SRC OUT --resolution {res}`).")
    # 3. N real images, or as many as the data holds.
    stream_bs, available = usable_real(sum(shards.counts), batch_size, 1)
    n, notice = images_to_use(n_requested, available, source, key="--n" if n is not None else "eval.n_samples")
    if notice and progress:
        progress(f"notice: {notice}")

    data_cfg = real_data_config(cfg.data, stream_bs, source=source, workers=min(cfg.data.workers, 1))
    stream = build_stream(data_cfg, seed, 0, 1)
    if progress:
        progress(f"evaluating {n} generated vs {n} real images ({extractor}) on {device}")
    start = time.perf_counter()
    try:
        result = evaluate(_ema_generate(G, batch_size), G.z_dim, G.num_classes, stream, n, extractor=extractor,
                          weights=weights_path, batch_size=batch_size, seed=seed, device=device,
                          cache_dir=str(Path(cfg.data.cache_dir).expanduser() / "fid-real"),
                          real_id=real_id(data_cfg, seed, 1, stream_bs), rank=0, world_size=1,
                          n_real_available=available, resolution=res)
    finally:
        stream.close()
    return {**result, "weights": weights_path, "ckpt": str(path), "step": info.step,
            "kimg": info.nimg / 1000, "data": source, "resolution": res, "n": n, "n_requested": n_requested,
            "seed": seed, "generator": "raw" if raw else "ema", "seconds": round(time.perf_counter() - start, 3),
            **({"notice": notice} if notice else {})}
