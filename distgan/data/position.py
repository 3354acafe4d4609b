"""Where a stream stands in an epoch, in terms that survive a change of world size.

An epoch is one fixed order of the data set's samples (the shard order shuffled from (seed,
epoch), shards concatenated): its *base positions* 0..N-1 depend on nothing but the seed, the
epoch and the shard counts. A *segment* is a stretch of an epoch read under one plan (world
size, batch size, workers, shuffle buffer): the samples still available are split into
contiguous ranges, one per (rank, worker), each read through its own shuffle buffer.

Which samples a segment consumed after `b` batches per rank is a pure function of the plan: the
shuffle buffer's output order depends only on its seed and the number of its inputs, never on
their content, so it can be replayed on sample indices without reading a byte. When a run
resumes under another plan, the samples its previous segments did not consume become the next
segment's available samples: no sample is read twice in an epoch, and what a plan cannot read is
the tail of fewer than one global batch (world x batch samples) that every epoch drops.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import webdataset as wds

Interval = tuple[int, int]


def worker_quotas(batches: int, workers: int) -> list[int]:
    """Split a rank's batches over its workers (the first ones take the remainder)."""
    workers = max(1, workers)
    return [batches // workers + (w < batches % workers) for w in range(workers)]


def batch_order(quotas: list[int]) -> list[tuple[int, int]]:
    """(worker, batch index) in the order the stream yields them: round robin, like DataLoader."""
    return [(w, r) for r in range(max(quotas, default=0)) for w, t in enumerate(quotas) if r < t]


def worker_tag(epoch: int, rank: int, worker: int, segment: int) -> str:
    """The shuffle seed tag of one worker's range (segment 0 keeps the tag of a run that never moved)."""
    return f"{epoch}:{rank}:{worker}" + (f":s{segment}" if segment else "")


def shuffled_indices(n: int, buffer: int, seed: int, tag: str) -> list[int]:
    """The order in which a worker's shuffle buffer emits its `n` inputs (stream._ShardDataset._shuffle
    on indices instead of samples)."""
    if buffer <= 1:
        return list(range(n))
    return list(wds.shuffle(buffer, initial=buffer, rng=random.Random(f"{seed}:{tag}"))(iter(range(n))))


def total(intervals: list[Interval]) -> int:
    return sum(b - a for a, b in intervals)


def slice_intervals(intervals: list[Interval], start: int, length: int) -> list[Interval]:
    """Positions [start, start+length) of the concatenation of `intervals`, as intervals."""
    out, pos = [], 0
    for a, b in intervals:
        lo, hi = max(start, pos), min(start + length, pos + b - a)
        if lo < hi:
            out.append((a + lo - pos, a + hi - pos))
        pos += b - a
    return out


def to_intervals(positions: np.ndarray) -> list[Interval]:
    """Sorted positions -> maximal runs [a, b)."""
    if positions.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    return [(int(run[0]), int(run[-1]) + 1) for run in np.split(positions, breaks)]


@dataclass
class Segment:
    """A stretch of an epoch read under one plan, and how far it got."""

    world_size: int
    batch_size: int
    workers: int
    shuffle_buffer: int
    batches: int
    """Batches each rank consumed in this segment."""

    @classmethod
    def of(cls, state: dict[str, Any]) -> "Segment":
        return cls(*(int(state[k]) for k in ("world_size", "batch_size", "workers", "shuffle_buffer", "batches")))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def batches_per_rank(self, available: int) -> int:
        return available // (self.world_size * self.batch_size)

    def remaining(self, available: list[Interval], seed: int, epoch: int, index: int) -> list[Interval]:
        """The base positions of `available` that this segment (number `index` of its epoch) did
        not consume."""
        B, W = self.batch_size, self.world_size
        T = self.batches_per_rank(total(available))
        quotas = worker_quotas(T, self.workers)
        done = [0] * len(quotas)
        for w, _ in batch_order(quotas)[: self.batches]:
            done[w] += 1
        taken = np.zeros(total(available), dtype=bool)
        for rank, w in itertools.product(range(W), range(len(quotas))):
            if done[w]:
                start = (rank * T + sum(quotas[:w])) * B
                # Pass 0 of the worker's range (later passes only refill unreadable samples).
                order = shuffled_indices(quotas[w] * B, self.shuffle_buffer, seed, worker_tag(epoch, rank, w, index) + ":0")
                taken[start + np.asarray(order[: done[w] * B], dtype=np.int64)] = True
        positions = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in available] or [np.zeros(0, np.int64)])
        return to_intervals(positions[~taken])


def available_after(segments: list[Segment], num_samples: int, seed: int, epoch: int) -> list[Interval]:
    """The base positions of `epoch` that none of `segments` (in order) consumed."""
    available = [(0, num_samples)]
    for index, segment in enumerate(segments):
        available = segment.remaining(available, seed, epoch, index)
    return available
