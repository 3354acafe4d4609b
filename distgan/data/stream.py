"""Training stream: webdataset shards -> batches of uint8 NCHW images (0..255) for one rank.

The images stay uint8 until the device (``data/normalize.py`` turns them into float32 in [-1, 1]
there): a quarter of float32's bytes through the workers' shared memory, pinning and the copy.

Epoch layout, and why it cannot hang DDP:

- Per-shard sample counts come from ``dataset.json`` (without one: from the tar headers, read
  once). Every rank gets ``T = floor(N / (world_size * batch_size))`` batches per epoch
  (``batches_per_epoch``); the < world*batch leftover samples are dropped.
- Non-resampled: the shard order is shuffled from (seed, epoch), identically on all ranks, and
  the concatenated samples are cut into contiguous ranges of exactly ``t_w * batch_size`` samples,
  one per (rank, worker). A range may start or end inside a shard (that worker reads the shard
  but decodes only its own samples), so each sample is used once per epoch across all ranks, and
  fewer shards than ranks x workers is fine. This is split_by_node/split_by_worker with our own
  rank/world (never env vars), at sample granularity so that counts come out equal.
- Resampled: each worker draws shards with replacement from a (seed, epoch, rank, worker) RNG and
  stops after exactly ``t_w`` batches.
- A worker whose range loses samples (corrupt image, truncated/missing shard) re-reads its range
  (reshuffled) to fill its quota, so batch counts stay equal; a few samples then repeat. Skips are
  counted once; above ``max_skip_fraction`` of the epoch, or when a worker finds no readable
  sample at all, ``DataError`` is raised naming the shards, instead of waiting forever.
- Workers tag each batch with (epoch, worker, batch index, skip events); the main process strips
  the tags, logs/counts the skips and yields batches in one fixed order, whatever the timing.
- One DataLoader pass runs epoch after epoch: each worker starts its next epoch as soon as it has
  handed over its last batch, so the prefetch queue stays full across epoch boundaries (no
  restart of the worker iterators, no drain). A worker with fewer batches than the others in an
  epoch sends empty padding items in its turns, which keeps the DataLoader's round robin aligned
  with the epoch's batch order in every epoch. Only ``load_state_dict`` starts a new pass.

Resume: ``state_dict`` holds (epoch, batches consumed). Shard order, shuffle buffers and flips are
pure functions of (seed, epoch, rank, worker, pass), so each worker replays its shuffle and drops
the consumed samples before decoding them: the resumed stream yields bit-for-bit the batches of
the uninterrupted one, for any shuffle buffer size. Exact while seed, world size, workers, batch
size, shuffle buffer and shards are unchanged (else a warning: same epoch, about the same spot)
and no sample in the consumed part was bad (each one shifts the resumed stream by one sample).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
import os
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from distgan.data.cache import materialize
from distgan.data.decode import SampleError, decode_sample, describe_error, flip_bit
from distgan.data.format import MANIFEST, count_samples, expand_urls, read_manifest
from distgan.data.position import (Interval, Segment, available_after, batch_order, slice_intervals, total, worker_quotas,
                                   worker_tag)
from distgan.device import pins_host_memory
from distgan.errors import DataError

log = logging.getLogger("distgan.data")
_PLAN_KEYS = ("seed", "world_size", "workers", "batch_size", "shuffle_buffer", "resampled", "num_samples")
_LAYOUT_KEYS = ("world_size", "workers", "batch_size", "shuffle_buffer")  # a new segment maps these exactly


@dataclass
class DatasetInfo:
    num_samples: int
    resolution: int
    channels: int
    class_names: list[str]
    source: str
    class_counts: list[int] | None = None
    """Samples per class from the shards' manifest (None: shards made before it was recorded)."""

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class ShardSet:
    urls: list[str]
    counts: list[int]
    class_names: list[str]
    resolution: int | None = None
    class_counts: list[int] | None = None


# ---------------------------------------------------------------------------- finding shards


def resolve_shards(source: str, cache_dir: str, resolution: int, channels: int) -> ShardSet:
    """data.source -> URLs with per-shard counts (builtins are materialized into the cache first)."""
    if source.startswith("builtin:"):
        source = str(materialize(source.split(":", 1)[1], resolution, channels, cache_dir))
    folder = Path(source).expanduser()
    if folder.is_dir():
        m = read_manifest(folder)
        if m is not None:
            return ShardSet([str(folder / s["name"]) for s in m["shards"]], [int(s["count"]) for s in m["shards"]],
                            list(m.get("class_names", [])), m.get("resolution"), m.get("class_counts"))
        urls = sorted(str(p) for p in folder.glob("*.tar"))
        if not urls:
            raise DataError(f"{folder}: no {MANIFEST} and no *.tar shards")
        return ShardSet(urls, [count_samples(u) for u in urls], [])
    urls = expand_urls(source)
    if not urls:
        raise DataError(f"data.source {source!r} names no shards")
    local = [Path(u).expanduser() for u in urls if "://" not in u and not u.startswith("pipe:")]
    m = read_manifest(local[0].parent) if local else None  # shards listed one by one may still have one
    known = {local[0].parent / s["name"]: int(s["count"]) for s in m["shards"]} if m else {}
    counts = [known[p] if (p := Path(u).expanduser()) in known else count_samples(u) for u in urls]
    return ShardSet(urls, counts, list(m.get("class_names", [])) if m else [], m.get("resolution") if m else None)


# ---------------------------------------------------------------------------- epoch plan


def shard_pieces(counts: list[int], seed: int, epoch: int, start: int, length: int) -> list[tuple[int, int, int]]:
    """(shard, first, end) sample slices covering [start, start+length) of this epoch's shard order."""
    order = list(range(len(counts)))
    random.Random(f"{seed}:shards:{epoch}").shuffle(order)  # same on every rank and worker
    pieces, pos = [], 0
    for i in order:
        lo, hi = max(pos, start), min(pos + counts[i], start + length)
        if lo < hi:
            pieces.append((i, lo - pos, hi - pos))
        pos += counts[i]
    return pieces


class _Ctx:
    """Per worker and epoch: skip events not yet shipped with a batch, and the stall guards."""

    def __init__(self, limit: int):
        self.pending: list[tuple[str, str, str, int]] = []
        self.read = self.bad_run = 0
        self.limit, self.tar_error, self.quiet = limit, "", False
        self.dead: set[int] = set()  # shards that gave nothing: not retried when refilling

    def record(self, shard: str, key: str, reason: str, count: int = 1) -> None:
        if not self.quiet:  # refill passes re-read known-bad data: count each bad sample once
            self.pending.append((shard, key, reason, count))

    def tar_handler(self, exn: BaseException) -> bool:
        self.tar_error = describe_error(exn)  # the shortfall record below names the shard and count
        return True

    def decode_handler(self, exn: BaseException) -> bool:
        if isinstance(exn, SampleError):
            self.record(exn.shard, exn.key, exn.reason)
        else:
            self.record("?", "?", describe_error(exn))
        self.bad_run += 1
        if self.bad_run > self.limit:
            raise DataError(f"{self.bad_run} samples in a row could not be decoded; last: {exn}")
        return True


class _ShardDataset(IterableDataset):
    """Runs in each DataLoader worker: yields (images, labels, meta) batches of one rank's epoch."""

    def __init__(self, shards: ShardSet, cfg: Any, seed: int, rank: int, workers: int, batches: int,
                 shared: Any):
        self.urls, self.counts = shards.urls, shards.counts
        self.res, self.ch, self.bs = cfg.resolution, cfg.channels, cfg.batch_size
        self.hflip, self.buf, self.resampled = cfg.hflip, cfg.shuffle_buffer, cfg.resampled
        self.seed, self.rank, self.workers, self.batches = seed, rank, workers, batches
        self.shared = shared  # [epoch, batches already consumed]: read when each epoch starts
        self.layout: tuple[int, list[Interval], int, int] | None = None
        """(epoch, available base positions, batches per rank, segment index) of an epoch that a
        resumed run continues under another plan (see data/position.py); other epochs read all."""
        self.warned = False

    def plan(self, epoch: int) -> tuple[list[Interval], int, int]:
        """This epoch's available positions, batches per rank and segment index."""
        if self.layout is not None and self.layout[0] == epoch:
            return self.layout[1:]
        return [(0, sum(self.counts))], self.batches, 0

    def _read(self, pieces: Iterator[tuple[int, int, int]], ctx: _Ctx) -> Iterator[dict[str, Any]]:
        for shard, lo, hi in pieces:
            url, got, ctx.tar_error = self.urls[shard], 0, ""
            samples = wds.tarfile_samples([{"url": url}], handler=ctx.tar_handler)
            for i, sample in enumerate(samples):
                if i >= hi:
                    break
                if i >= lo:
                    got += 1
                    yield sample
            samples.close()
            ctx.read += got
            if got == 0:
                ctx.dead.add(shard)
            if got < hi - lo:
                why = ctx.tar_error or "shard ends early"
                ctx.record(url, f"#{lo + got}-{hi - 1}", f"{hi - lo - got} samples unreadable ({why})", hi - lo - got)

    def _shuffle(self, samples: Iterator[dict[str, Any]], tag: str) -> Iterator[dict[str, Any]]:
        if self.buf <= 1:
            return samples
        rng = random.Random(f"{self.seed}:{tag}")
        return wds.shuffle(self.buf, initial=self.buf, rng=rng)(samples)

    def _samples(self, epoch: int, w: int, quotas: list[int], ctx: _Ctx) -> Iterator[dict[str, Any]]:
        available, batches, segment = self.plan(epoch)
        tag = worker_tag(epoch, self.rank, w, segment)
        if self.resampled:
            rng = random.Random(f"{self.seed}:resample:{tag}")

            def draws() -> Iterator[tuple[int, int, int]]:
                empty = 0
                while True:
                    before, i = ctx.read, rng.randrange(len(self.urls))
                    yield i, 0, self.counts[i]
                    empty = 0 if ctx.read > before else empty + 1
                    if empty > 2 * len(self.urls) + 8:
                        raise DataError(f"rank {self.rank}: {empty} shard draws in a row gave no sample "
                                        f"(last {self.urls[i]}: {ctx.tar_error or 'empty'})")

            yield from self._shuffle(self._read(draws(), ctx), tag)
            return
        start = (self.rank * batches + sum(quotas[:w])) * self.bs
        pieces = [piece for a, b in slice_intervals(available, start, quotas[w] * self.bs)
                  for piece in shard_pieces(self.counts, self.seed, epoch, a, b - a)]
        for p in itertools.count():  # pass 0 is the epoch; later passes only refill skipped samples
            before, ctx.quiet = ctx.read, p > 0
            live = [piece for piece in pieces if piece[0] not in ctx.dead]
            yield from self._shuffle(self._read(iter(live), ctx), f"{tag}:{p}")
            if ctx.read == before:
                names = sorted({Path(self.urls[s]).name for s, _, _ in pieces})
                raise DataError(f"rank {self.rank} worker {w}: no readable sample in its shards {names}"
                                f" ({ctx.tar_error or 'all unreadable'})")

    def _decode(self, epoch: int, ctx: _Ctx):
        def decode(sample: dict[str, Any]) -> tuple[np.ndarray, int]:
            x, y, resized = decode_sample(sample, self.res, self.ch)
            if resized and not self.warned:
                self.warned = True
                warnings.warn(f"{sample['__url__']}: images are not {self.res}x{self.res}; resizing while "
                              f"decoding (slower; write shards at the training resolution)")
            if self.hflip and flip_bit(self.seed, epoch, sample["__url__"], sample["__key__"]):
                x = x[:, :, ::-1]
            ctx.bad_run = 0
            return x, y

        return decode

    def __iter__(self) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None, dict[str, Any]]]:
        """Epoch after epoch from the shared position, without end: a new epoch starts in the
        same worker while the trainer still consumes the last one, so the pipeline never drains
        at an epoch boundary (the loader pass ends only when the stream restarts it)."""
        info = get_worker_info()
        w = info.id if info is not None else 0
        epoch, consumed = int(self.shared[0]), int(self.shared[1])
        while True:
            yield from self._epoch_batches(epoch, w, consumed)
            epoch, consumed = epoch + 1, 0

    def _epoch_batches(self, epoch: int, w: int, consumed: int) -> Iterator[tuple[Any, Any, dict[str, Any]]]:
        """One epoch of worker w: uint8 image batches, with padding items that keep every worker
        at the same number of items per epoch.

        The DataLoader asks its workers in turn; a worker with one batch fewer than the others
        (quotas differ by at most one), or one that a resume already took a batch from, yields a
        padding item (no images, nothing decoded) in that turn, so the turns stay aligned with
        `batch_order` in every epoch and the stream never holds more than a turn of batches."""
        quotas = worker_quotas(self.plan(epoch)[1], self.workers)
        done = sum(1 for v, _ in batch_order(quotas)[:consumed] if v == w)
        first_turn = consumed // len(quotas)  # turns every worker finished before the resume point
        span = sum(self.counts) if self.resampled else quotas[w] * self.bs
        ctx = _Ctx(limit=span + self.buf + 16)
        samples = itertools.islice(self._samples(epoch, w, quotas, ctx), done * self.bs, None)  # resume
        decoded = wds.map(self._decode(epoch, ctx), handler=ctx.decode_handler)(samples)
        for r in range(first_turn, max(quotas)):
            meta = {"e": epoch, "w": w, "r": r, "events": ctx.pending}
            if r < done or r >= quotas[w]:
                ctx.pending = []
                yield None, None, {**meta, "pad": True}
                continue
            batch = list(itertools.islice(decoded, self.bs))
            if len(batch) < self.bs:  # the sources above are endless: this means a logic error
                raise DataError(f"rank {self.rank} worker {w}: data ended after {r} of {quotas[w]} batches")
            # uint8 all the way to the device (data/normalize.py): a quarter of float32's bytes
            # through shared memory, pinning and the host-to-device copy.
            x = torch.from_numpy(np.stack([b[0] for b in batch]))
            y = torch.tensor([max(b[1], 0) for b in batch], dtype=torch.int64)
            meta["events"], ctx.pending = ctx.pending, []
            yield x, y, meta


# ---------------------------------------------------------------------------- the stream


class ImageStream:
    """Endless iterator of (images uint8 (B,C,R,R) in 0..255, labels int64 (B,)) for one rank;
    ``data.normalize.normalize_images`` makes them float32 in [-1, 1] on the device.

    Batches stay on the CPU (pinned when this process trains on CUDA: `device.pins_host_memory`);
    do not pass this to ``accelerator.prepare``. One iterator at a time; call ``load_state_dict`` before iterating
    (or between batches: the running iterator then jumps to the loaded position).
    """

    def __init__(self, cfg: Any, seed: int, rank: int, world_size: int, shards: ShardSet, info: DatasetInfo):
        self.info = info
        self.batches_per_epoch = info.num_samples // (world_size * cfg.batch_size)
        if self.batches_per_epoch == 0:
            raise DataError(f"{info.num_samples} samples in {len(shards.urls)} shards ({info.source}) are fewer "
                            f"than world_size x batch_size = {world_size} x {cfg.batch_size}: rank {rank} would "
                            f"get no batch")
        self.workers = min(cfg.workers, self.batches_per_epoch)  # a worker without a batch would only idle
        self._rank = rank
        self._plan = {"seed": seed, "world_size": world_size, "workers": self.workers,
                      "batch_size": cfg.batch_size, "shuffle_buffer": cfg.shuffle_buffer,
                      "resampled": cfg.resampled, "num_samples": info.num_samples}
        self._max_skip_fraction = cfg.max_skip_fraction
        self._max_skip = cfg.max_skip_fraction * self.batches_per_epoch * cfg.batch_size
        self._shared = multiprocessing.Array("q", 2, lock=False)  # inherited by the (persistent) workers
        self._dataset = dataset = _ShardDataset(shards, cfg, seed, rank, self.workers, self.batches_per_epoch,
                                                self._shared)
        self._segments: list[Segment] = []  # earlier segments of the current epoch (other plans)
        pin = pins_host_memory(torch.cuda.is_available(), os.environ)  # not for a CPU run on a GPU machine
        self._loader = DataLoader(dataset, batch_size=None, num_workers=self.workers,
                                  persistent_workers=self.workers > 0, pin_memory=pin,
                                  prefetch_factor=4 if self.workers else None,
                                  generator=torch.Generator().manual_seed(seed))  # leave the global RNG alone
        self._epoch = self._consumed = self._skipped = self._generation = self._logged = 0
        self._epoch_skipped: Counter[int] = Counter()  # per epoch: workers run ahead into the next one
        self.loader_passes = 0
        """DataLoader passes started: 1 for a whole run, plus one per load_state_dict while iterating."""
        self._bad_shards: Counter[str] = Counter()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, start = self._position()
            self._shared[0], self._shared[1] = epoch, start  # where the workers of this pass begin
            generation = self._generation
            self.loader_passes += 1
            batches = iter(self._loader)  # one pass runs epoch after epoch (_ShardDataset.__iter__)
            held: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
            while self._generation == generation:
                if epoch != self._epoch:
                    self._segments = []
                    for old in [e for e in self._epoch_skipped if e < epoch]:
                        del self._epoch_skipped[old]
                self._epoch, self._consumed = epoch, start
                for w, r in batch_order(worker_quotas(self._batches(), self.workers))[start:]:
                    while (epoch, w, r) not in held:  # fixed order, whatever the timing
                        x, y, meta = next(batches, (None, None, None))
                        if meta is None:
                            raise DataError(f"rank {self._rank}: the loader ended in epoch {epoch} after "
                                            f"{self._consumed} of {self._batches()} batches")
                        self._absorb(meta["events"], meta["e"])
                        if not meta.get("pad"):
                            held[(meta["e"], meta["w"], meta["r"])] = (x, y)
                    self._consumed += 1
                    yield held.pop((epoch, w, r))
                    if self._generation != generation:
                        break  # load_state_dict was called: restart the pass at the loaded position
                epoch, start = epoch + 1, 0

    def _absorb(self, events: list[tuple[str, str, str, int]], epoch: int) -> None:
        for shard, key, reason, count in events:
            self._skipped += count
            self._epoch_skipped[epoch] += count
            self._bad_shards[shard] += count
            self._logged += 1
            if self._logged <= 50:  # a shard full of bad files must not flood the log
                log.warning("skipped %d sample(s) of %s at %s: %s%s", count, shard, key, reason,
                            "; further skips are only counted (stats())" if self._logged == 50 else "")
        if self._epoch_skipped[epoch] > self._max_skip:
            per_epoch = self.batches_per_epoch * self._plan["batch_size"]
            shards = ", ".join(f"{s} ({n})" for s, n in self._bad_shards.most_common(10))
            raise DataError(f"rank {self._rank}, epoch {epoch}: {self._epoch_skipped[epoch]} samples skipped, more "
                            f"than data.max_skip_fraction={self._max_skip_fraction:g} of the {per_epoch} samples "
                            f"per epoch. Shards with skipped samples: {shards}")

    def _batches(self) -> int:
        """Batches per rank in the current segment of the epoch (all of it unless resumed under another plan)."""
        return self._dataset.plan(self._epoch)[1]

    def _position(self) -> tuple[int, int]:
        """(epoch, batches consumed in its current segment), a finished epoch counting as the start of the next."""
        if self._consumed >= self._batches():
            return self._epoch + 1, 0
        return self._epoch, self._consumed

    def stats(self) -> dict[str, int]:
        epoch, batches = self._position()
        return {"skipped": self._skipped, "epoch": epoch, "batches": batches}

    def state_dict(self) -> dict[str, Any]:
        """(epoch, batches of the current segment, earlier segments of the epoch) and the plan;
        `samples` is the same position for people: samples of the epoch consumed over all ranks."""
        epoch, batches = self._position()
        segments = self._segments if epoch == self._epoch else []
        per_batch = self._plan["world_size"] * self._plan["batch_size"]
        samples = sum(g.batches * g.world_size * g.batch_size for g in segments) + batches * per_batch
        return {"epoch": epoch, "batches": batches, "samples": samples, "segments": [g.as_dict() for g in segments],
                "skipped": self._skipped, **self._plan}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        segments = [Segment.of(g) for g in state.get("segments", [])]
        changed = [k for k in _PLAN_KEYS if k in state and state[k] != self._plan[k]]
        if changed and set(changed) <= set(_LAYOUT_KEYS) and not self._plan["resampled"]:
            # Another world size, batch size or worker count: the saved segment ends here and a new
            # one reads what the epoch has left (no sample twice; see data/position.py).
            segments.append(Segment.of({**state, "batches": batches}))
            batches = 0
        elif changed:
            old = state.get("batch_size", 1) * state.get("world_size", 1)
            batches = min(batches * old // (self._plan["batch_size"] * self._plan["world_size"]),
                          self.batches_per_epoch - 1)
            segments = []
            warnings.warn(f"data stream resumed with different {', '.join(changed)}: same epoch {epoch}, "
                          f"about the same position (batch {batches}), not the exact same batches")
        self._set_segments(epoch, segments)
        if segments and self._batches() == 0:  # less than one global batch left: the epoch is done
            epoch, batches = epoch + 1, 0
            self._set_segments(epoch, [])
        self._epoch, self._consumed = epoch, batches
        self._epoch_skipped.clear()
        self._skipped = int(state.get("skipped", 0))
        self._generation += 1

    def _set_segments(self, epoch: int, segments: list[Segment]) -> None:
        layout = None
        if segments:
            p = self._plan
            available = available_after(segments, p["num_samples"], p["seed"], epoch)
            layout = (epoch, available, total(available) // (p["world_size"] * p["batch_size"]), len(segments))
        if layout != self._dataset.layout:
            self._dataset.layout = layout
            self.close()  # running workers hold the old layout: the next pass starts new ones
        self._segments = segments

    def close(self) -> None:
        it = getattr(self._loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()  # persistent workers otherwise live until garbage collection
        self._loader._iterator = None

    def __enter__(self) -> "ImageStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def build_stream(data_cfg: Any, seed: int, rank: int = 0, world_size: int = 1) -> ImageStream:
    """The training stream of one rank (see the module docstring for the epoch layout)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    shards = resolve_shards(data_cfg.source, data_cfg.cache_dir, data_cfg.resolution, data_cfg.channels)
    if shards.resolution and shards.resolution != data_cfg.resolution:
        warnings.warn(f"{data_cfg.source}: shards are {shards.resolution}px, training at {data_cfg.resolution}px; "
                      f"images are resized while decoding")
    info = DatasetInfo(sum(shards.counts), data_cfg.resolution, data_cfg.channels, shards.class_names,
                       data_cfg.source, shards.class_counts)
    return ImageStream(data_cfg, seed, rank, world_size, shards, info)
