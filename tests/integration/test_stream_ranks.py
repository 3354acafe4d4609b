"""Several ranks over uneven shards: equal batch counts (no DDP hang), disjoint data per epoch,
and one loader pass over all epochs (the pipeline does not drain at an epoch boundary).

Ranks are simulated by building one stream per rank (rank=r, world_size=2) in this process, each
with real DataLoader worker processes: the same code path a real rank runs, since the stream takes
rank/world_size as arguments and never reads the environment.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distgan.config import DataConfig
from distgan.data import build_stream
from distgan.data.stream import batch_order, shard_pieces, worker_quotas


def write_uneven(folder: Path, sizes: list[int], res: int = 8) -> int:
    """Shards of the given sizes; sample i has pixel (0,0) = (i % 256, i // 256, 7). Returns the total."""
    folder.mkdir(parents=True)
    idx, shards = 0, []
    for s, n in enumerate(sizes):
        name = f"train-{s:06d}.tar"
        with tarfile.open(folder / name, "w") as t:
            for _ in range(n):
                a = np.random.default_rng(idx).integers(0, 256, (res, res, 3), dtype=np.uint8)
                a[0, 0] = (idx % 256, idx // 256, 7)
                buf = io.BytesIO()
                Image.fromarray(a).save(buf, "PNG")
                for ext, data in (("png", buf.getvalue()), ("cls", str(idx % 3).encode())):
                    info = tarfile.TarInfo(f"{idx:06d}.{ext}")
                    info.size = len(data)
                    t.addfile(info, io.BytesIO(data))
                idx += 1
        shards.append({"name": name, "count": n})
    (folder / "dataset.json").write_text(json.dumps({"num_samples": idx, "shards": shards, "resolution": res,
                                                     "channels": 3, "class_names": ["a", "b", "c"]}))
    return idx


def ids(x: torch.Tensor) -> list[int]:
    px = x[:, :2, 0, 0].long()  # uint8 pixels as stored
    return (px[:, 0] + 256 * px[:, 1]).tolist()


def run_ranks(folder: Path, world: int, epochs: int, **kw) -> list[list[list[int]]]:
    """ids[rank][epoch] for `epochs` epochs of every rank."""
    c = DataConfig(source=str(folder), resolution=8, channels=3, batch_size=3, workers=2, hflip=False,
                   shuffle_buffer=50, **kw)
    streams = [build_stream(c, seed=11, rank=r, world_size=world) for r in range(world)]
    try:
        assert len({s.batches_per_epoch for s in streams}) == 1
        per_rank = []
        for s in streams:
            it = iter(s)
            epochs_ids = []
            for e in range(epochs):
                batches = list(islice(it, s.batches_per_epoch))
                assert all(x.shape == (3, 3, 8, 8) for x, _ in batches)
                epochs_ids.append([i for x, _ in batches for i in ids(x)])
                assert s.stats()["epoch"] == e + 1
            assert s.loader_passes == 1  # every epoch from the same worker iterators: none restarted
            per_rank.append(epochs_ids)
        return per_rank
    finally:
        for s in streams:
            s.close()


@pytest.mark.parametrize("sizes,epochs", [
    ([3, 11, 7, 2, 17], 2),  # 5 uneven shards
    ([19, 21], 2),           # fewer shards than 2 ranks x 2 workers
    ([3, 11, 7, 2, 7], 3),   # 30 = 2 ranks x 5 batches x 3: every sample once per epoch; quotas 3+2 (padding)
])
def test_two_ranks_equal_batches_disjoint_samples(tmp_path, sizes, epochs):
    total = write_uneven(tmp_path / "sh", sizes)
    per_rank = run_ranks(tmp_path / "sh", world=2, epochs=epochs)
    expected = total // 6  # floor(N / (world * batch)) batches on every rank
    for e in range(epochs):
        both = per_rank[0][e] + per_rank[1][e]
        assert len(per_rank[0][e]) == len(per_rank[1][e]) == expected * 3
        assert len(set(both)) == len(both) and set(both) <= set(range(total))  # nobody sees a sample twice
        if total % 6 == 0:
            assert sorted(both) == list(range(total))  # nothing dropped: each sample exactly once
    assert per_rank[0][0] != per_rank[0][1]  # the epoch reshuffles shards and samples
    assert run_ranks(tmp_path / "sh", world=2, epochs=epochs) == per_rank  # deterministic from the seed


def test_resampled_mode_equal_batches(tmp_path):
    total = write_uneven(tmp_path / "sh", [3, 11, 7, 2, 17])
    per_rank = run_ranks(tmp_path / "sh", world=2, epochs=2, resampled=True)
    for e in range(2):
        assert len(per_rank[0][e]) == len(per_rank[1][e]) == (total // 6) * 3
    counts = Counter(i for r in per_rank for e in r for i in e)
    assert set(counts) <= set(range(total)) and len(counts) > total // 2


def test_plan_covers_each_sample_once():
    counts = [3, 11, 7, 2, 17]
    for world, workers, batch in ((1, 1, 4), (2, 2, 3), (3, 4, 2), (4, 3, 5)):
        t = sum(counts) // (world * batch)
        seen = []
        for rank in range(world):
            quotas = worker_quotas(t, workers)
            assert sum(quotas) == t and sorted(batch_order(quotas)) == sorted(
                (w, r) for w, q in enumerate(quotas) for r in range(q))
            for w in range(len(quotas)):
                start = (rank * t + sum(quotas[:w])) * batch
                pieces = shard_pieces(counts, 0, 5, start, quotas[w] * batch)
                assert sum(hi - lo for _, lo, hi in pieces) == quotas[w] * batch
                seen += [(s, i) for s, lo, hi in pieces for i in range(lo, hi)]
        assert len(seen) == len(set(seen)) == world * t * batch
