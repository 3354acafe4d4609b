"""FID and KID of a generator against real images, single- or multi-process.

Features are extracted here (not inside torchmetrics) because we need them in hand: each rank
featurizes its share of the n samples, the shares are all-gathered into sample order (so the
result does not depend on the world size), real features are cached on disk, and one extractor
pass serves both FID and KID. torchmetrics' ``FrechetInceptionDistance`` and
``KernelInceptionDistance`` then receive the gathered features through an identity "feature
network" (``_Features``) and do the statistics; neither needs torch-fidelity with a custom
module.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from distgan.data.normalize import normalize_images
from distgan.metrics.extractors import EvalError, build_extractor
from distgan.metrics.precision_recall import precision_recall
from distgan.metrics.swd import MAX_IMAGES as SWD_MAX_IMAGES
from distgan.metrics.swd import swd, to_pixels
from distgan.preemption import Preempted

KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # the usual KID protocol (Binkowski et al.)


class _Features(nn.Module):
    """Identity feature network: torchmetrics gets features we already extracted and gathered.
    ``num_features`` stops FrechetInceptionDistance from probing it with a dummy image."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def sample_seed(seed: int, index: int) -> int:
    """Per-sample RNG seed: sample i's latent depends only on (seed, i), never on which rank or
    batch draws it, so every world size evaluates the same set of samples."""
    return (seed * 0x9E3779B97F4A7C15 + index) % (2**63)


def latents(seed: int, indices: range, z_dim: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Latents (and class labels when num_classes > 0) of the given global sample indices."""
    zs, labels = [], []
    for i in indices:
        g = torch.Generator().manual_seed(sample_seed(seed, i))
        zs.append(torch.randn(z_dim, generator=g))
        if num_classes > 0:
            labels.append(int(torch.randint(num_classes, (), generator=g)))
    z = torch.stack(zs) if zs else torch.zeros(0, z_dim)
    return z, (torch.tensor(labels, dtype=torch.long) if num_classes > 0 else None)


def shard(n: int, rank: int, world_size: int) -> tuple[range, int]:
    """This rank's contiguous slice of sample indices and the padded share size. Shares are
    ceil(n/world): full ranks first, then one partial one (and possibly empty ones), so
    concatenating the gathered shares and cutting at n restores sample order exactly."""
    per = math.ceil(n / world_size)
    start = min(n, rank * per)
    return range(start, min(n, start + per)), per


# ---------------------------------------------------------------------------- collectives


def _distributed(world_size: int) -> bool:
    if world_size == 1:
        return False
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() != world_size:
        raise EvalError(f"world_size={world_size} needs torch.distributed initialized with that many processes")
    return True


def _comm_device(device: torch.device) -> torch.device:
    return device if dist.get_backend() == "nccl" else torch.device("cpu")  # gloo: CPU tensors


def _all_reduce(value: int, world_size: int, device: torch.device, op=dist.ReduceOp.SUM) -> int:
    """Combine an int over ranks, so that all ranks take the same branch and none is left
    waiting in a collective that the others skipped."""
    if not _distributed(world_size):
        return value
    t = torch.tensor([value], dtype=torch.long, device=_comm_device(device))
    dist.all_reduce(t, op=op)
    return int(t.item())


def _all_reduce_many(values: list[int], world_size: int, device: torch.device) -> list[int]:
    """The element-wise maximum of a few ints over ranks (one collective)."""
    if not _distributed(world_size):
        return values
    t = torch.tensor(values, dtype=torch.long, device=_comm_device(device))
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def gather_features(local: torch.Tensor, per: int, n: int, world_size: int) -> torch.Tensor:
    """All shares in sample order: pad each to ``per`` rows (all_gather needs equal sizes), gather,
    drop the padding (it is all at the tail, see ``shard``)."""
    if not _distributed(world_size):
        return local
    dev = _comm_device(local.device)
    padded = torch.zeros(per, local.shape[1], dtype=local.dtype, device=dev)
    padded[: len(local)] = local.to(dev)
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)[:n].to(local.device)


# ---------------------------------------------------------------------------- feature passes


@torch.no_grad()
def _featurize(extractor: nn.Module, images: torch.Tensor, batch_size: int, device: torch.device) -> torch.Tensor:
    # Real batches come from the stream as uint8: normalised on the device, like the trainer's.
    return torch.cat([extractor(normalize_images(images[i : i + batch_size].to(device)))
                      for i in range(0, len(images), batch_size)])


def _take(batches: Iterable, count: int) -> Iterator[torch.Tensor]:
    """The first ``count`` real images as batches; stops pulling batches once it has enough."""
    got = 0
    if count == 0:
        return
    for batch in batches:
        if isinstance(batch, (tuple, list)):  # (images, labels) from a DataLoader
            batch = batch[0]
        batch = batch[: count - got]
        yield batch
        got += len(batch)
        if got >= count:
            return


def _polled(items: Iterable, interrupt: Callable[[], bool] | None, every: int, world_size: int,
            device: torch.device) -> Iterator:
    """Yield `items`; every `every` items all ranks ask each other whether any wants to stop
    (`interrupt()`: a preemption signal or request) and raise `Preempted` together if one does.

    The poll is a collective, so every rank must make the same number of them: a rank whose items
    run out (shares differ by up to one batch) keeps joining the polls, without work, until
    every rank's items have run out. One all-reduce of two ints per poll: cheap next to `every`
    extractor passes."""
    if interrupt is None:
        yield from items
        return
    it, exhausted, i = iter(items), False, 0
    while True:
        if i % every == 0:
            stop_any, busy_any = _all_reduce_many([int(interrupt()), int(not exhausted)], world_size, device)
            if stop_any:
                raise Preempted("evaluation given up for a preemption")
            if not busy_any:
                return
        i += 1
        if exhausted:
            continue
        item = next(it, _END)
        if item is _END:
            exhausted = True
        else:
            yield item


_END = object()


def _real_features(batches: Iterable, extractor: nn.Module | None, batch_size: int, device: torch.device,
                   pixels: list[torch.Tensor], keep: int) -> list[torch.Tensor]:
    """Features of every batch (none when `extractor` is None: a cache hit); the first `keep`
    images are also appended to `pixels` as uint8, for SWD."""
    feats = []
    for batch in batches:
        _keep_pixels(pixels, batch, keep)
        if extractor is not None:
            feats.append(_featurize(extractor, batch, batch_size, device))
    return feats


def _keep_pixels(pixels: list[torch.Tensor], images: torch.Tensor, keep: int) -> None:
    """Append images (as uint8, on the CPU: SWD's images travel as bytes) until `keep` are held."""
    held = sum(len(p) for p in pixels)
    if held < keep:
        pixels.append(to_pixels(images[: keep - held]).cpu())


def _gathered_pixels(pixels: list[torch.Tensor], like: tuple[int, ...], per: int, n: int, world_size: int,
                     device: torch.device) -> torch.Tensor:
    """The first n images of all ranks in sample order (each rank holds a contiguous share: see `shard`)."""
    local = torch.cat(pixels) if pixels else torch.zeros(0, *like, dtype=torch.uint8)
    flat = local.reshape(len(local), -1)
    if _distributed(world_size):
        flat = gather_features(flat.to(_comm_device(device)), per, n, world_size).cpu()
    return flat.reshape(-1, *like)


def _fake_batches(indices: range, batch_size: int) -> Iterator[range]:
    return (range(lo, min(lo + batch_size, indices.stop)) for lo in range(indices.start, indices.stop, batch_size))


@torch.no_grad()
def _fake_features(generate: Callable, batches: Iterable[range], z_dim: int, num_classes: int, seed: int,
                   extractor: nn.Module, device: torch.device, pixels: list[torch.Tensor], keep: int) -> torch.Tensor:
    feats = [torch.zeros(0, extractor.num_features, device=device)]
    for batch in batches:
        z, labels = latents(seed, batch, z_dim, num_classes)
        images = generate(z.to(device), None if labels is None else labels.to(device))
        _keep_pixels(pixels, images, keep)  # quantized as a saved PNG, as ProGAN's SWD saw fakes
        feats.append(extractor(images.to(device)))
    return torch.cat(feats)


def _cache_path(cache_dir: str, real_id: str, resolution: int, extractor: nn.Module, n: int) -> Path:
    key = json.dumps({"real_id": real_id, "resolution": resolution, "extractor": extractor.name,
                      "weights": extractor.tag, "n": n}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    return Path(cache_dir).expanduser() / f"real-{extractor.name}-{digest}.safetensors"


def _save_atomic(path: Path, feats: torch.Tensor, meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"features": feats.float().cpu().contiguous()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # readers never see a half-written file


# ---------------------------------------------------------------------------- scores


def scores(real: torch.Tensor, fake: torch.Tensor, seed: int = 0) -> tuple[float, float, float]:
    """(FID, KID mean, KID std) of two feature matrices, via torchmetrics."""
    d, dev = real.shape[1], real.device
    # sync_on_compute=False: the features are already gathered; a torchmetrics sync would
    # count every rank's copy again.
    fid = FrechetInceptionDistance(feature=_Features(d), sync_on_compute=False).to(dev)
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    size = min(KID_SUBSET_SIZE, len(real), len(fake))
    with warnings.catch_warnings():  # "KID keeps all features in memory": that is the plan
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Features(d), subsets=KID_SUBSETS, subset_size=size,
                                      sync_on_compute=False).to(dev)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    # KID draws its subsets from the global CPU RNG: seed it locally, so that all ranks and all
    # world sizes pick the same subsets, and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return float(fid.compute()), float(kid_mean), float(kid_std)


def evaluate(
    generate: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
    z_dim: int,
    num_classes: int,
    real_batches: Iterable[torch.Tensor],
    n: int,
    extractor: str = "inception",
    weights: str = "",
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    cache_dir: str | None = None,
    real_id: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    *,
    n_real_available: int | None = None,
    resolution: int | None = None,
    allow_download: bool | None = None,
    interrupt: Callable[[], bool] | None = None,
    poll_every: int = 5,
) -> dict:
    """FID/KID of ``generate`` (z, labels) -> images in [-1, 1] against n real images.

    Every rank must call this (collectives inside). Rank r generates and featurizes samples
    ceil(n/world)*r onward and reads its real share from its own ``real_batches`` stream;
    all ranks return the same dict. For results independent of the world size ``generate``
    must treat samples independently (eval mode: no batch statistics).

    ``cache_dir`` and ``real_id`` (a stable name of the real data, e.g. the data source) enable
    the real-feature cache, keyed by (real_id, resolution, extractor and weights, n).
    ``resolution`` is only used for that key; when None the first real batch is peeked (it is
    pulled from the stream even on a cache hit). Raises EvalError before any generation when
    fewer than n real images exist (``n_real_available`` or the streams running dry).

    Next to FID/KID/precision/recall it returns SWD (`distgan.metrics.swd`: ProGAN's sliced
    Wasserstein distance on image patches, no learned features) of the first min(n, 16384)
    images of both sets, as pixels. The cache holds features only, so on a cache hit the real
    stream is still read for those images (decoding, no extractor pass).

    ``interrupt`` (this rank's "stop now?", e.g. a preemption flag) is asked every ``poll_every``
    batches of the real and the generated pass, agreed over the ranks; when any rank says yes,
    every rank raises `distgan.preemption.Preempted` at the same poll.
    """
    if n < 2:
        raise EvalError(f"n={n}: FID needs at least 2 samples")
    if not 0 <= rank < world_size:
        raise EvalError(f"rank={rank} outside world_size={world_size}")
    if n_real_available is not None and n_real_available < n:
        raise EvalError(f"only {n_real_available} real images for n={n}; lower eval.n_samples")
    _distributed(world_size)  # fail early on a missing/mismatched process group
    device = torch.device(device)
    ext = build_extractor(extractor, weights, device, allow_download)
    indices, per = shard(n, rank, world_size)
    # SWD's images: the first swd_n samples of each set, this rank's part of them (its shares are contiguous).
    swd_n = min(n, SWD_MAX_IMAGES)
    swd_keep, swd_per = max(0, min(indices.stop, swd_n) - indices.start), min(per, swd_n)
    real_pixels: list[torch.Tensor] = []
    fake_pixels: list[torch.Tensor] = []

    # Real features: from the cache when every rank sees it, else from the streams.
    path, real = None, None
    if cache_dir and real_id:
        if resolution is None:  # peek, then put the batch back in front of the same iterator
            it = iter(real_batches)
            first = next(it, None)
            real_batches = it if first is None else itertools.chain([first], it)
            if first is not None:
                resolution = int((first[0] if isinstance(first, (tuple, list)) else first).shape[-1])
        path = _cache_path(cache_dir, real_id, resolution or 0, ext, n)
    if path is not None and _all_reduce(int(path.is_file()), world_size, device, dist.ReduceOp.MIN):
        try:
            real = load_file(str(path), device=str(device))["features"]
            good = tuple(real.shape) == (n, ext.num_features)
        except Exception:  # damaged (e.g. a crash mid-copy on another node): recompute, overwrite
            good = False
        if not _all_reduce(int(good), world_size, device, dist.ReduceOp.MIN):
            real = None
        else:  # SWD still needs the real pixels (not cached: they would be N x C x H x W bytes on disk)
            _real_features(_polled(_take(real_batches, swd_keep), interrupt, poll_every, world_size, device), None,
                           batch_size, device, real_pixels, swd_keep)
    if real is None:
        local = _real_features(_polled(_take(real_batches, len(indices)), interrupt, poll_every, world_size, device),
                               ext, batch_size, device, real_pixels, swd_keep)
        local = torch.cat(local) if local else torch.zeros(0, ext.num_features, device=device)
        missing = _all_reduce(len(indices) - len(local), world_size, device)
        if missing:  # every rank needs its full share: a short stream anywhere fails all ranks
            raise EvalError(f"too few real images for n={n}: {missing} missing (rank {rank} got "
                            f"{len(local)} of its {len(indices)}); lower eval.n_samples")
        real = gather_features(local, per, n, world_size)
        if path is not None and rank == 0:
            _save_atomic(path, real, {"real_id": real_id, "resolution": str(resolution),
                                      "extractor": ext.name, "weights": ext.tag, "n": str(n)})

    fake_batches = _polled(_fake_batches(indices, batch_size), interrupt, poll_every, world_size, device)
    fake_local = _fake_features(generate, fake_batches, z_dim, num_classes, seed, ext, device, fake_pixels, swd_keep)
    fake = gather_features(fake_local, per, n, world_size)
    fid, kid, kid_std = scores(real, fake, seed)
    precision, recall = precision_recall(real, fake, rank=rank, world_size=world_size)  # rows split over ranks
    # SWD: every rank computes it from the same gathered pixels (seeded): the same number everywhere.
    shape = tuple((real_pixels or fake_pixels or [torch.zeros(0, 1, 1, 1)])[0].shape[1:])
    shape = _all_reduce_many(list(shape), world_size, device)  # a rank with no share holds no shape
    real_px = _gathered_pixels(real_pixels, tuple(shape), swd_per, swd_n, world_size, device)
    fake_px = _gathered_pixels(fake_pixels, tuple(shape), swd_per, swd_n, world_size, device)
    swd_scores = swd(real_px, fake_px, seed=seed, device=device)
    return {"fid": fid, "kid": kid, "kid_std": kid_std, "precision": precision, "recall": recall, **swd_scores,
            "swd_n": swd_n,
            "n_real": len(real), "n_fake": len(fake),
            "resize": ext.resize, "extractor": ext.name}
