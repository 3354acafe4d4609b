"""The data position across world-size changes, on real shards, counted with sample keys: a run
that reads part of an epoch with W processes and continues it with W' (and back) reads no
sample twice in that epoch and leaves out fewer than one global batch of the last plan."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from distgan.config import DataConfig
from distgan.data import build_stream
from distgan.data.position import Segment, available_after, shuffled_indices, total
from distgan.data.shards import write_shards

N = 61  # samples: no world x batch below divides it


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> tuple[Path, dict[bytes, int]]:
    root = tmp_path_factory.mktemp("position")
    rng = np.random.default_rng(1)
    keys = {}
    (root / "img").mkdir()
    for i in range(N):
        a = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
        Image.fromarray(a).save(root / "img" / f"{i:03d}.png")
        keys[a.tobytes()] = i
    write_shards(str(root / "img"), root / "sh", resolution=16, crop="none", shard_size=7, workers=1, progress=False)
    return root / "sh", keys


def cfg(source: Path, batch: int, workers: int, buffer: int) -> DataConfig:
    return DataConfig(source=str(source), resolution=16, channels=3, batch_size=batch, workers=workers, hflip=False,
                      shuffle_buffer=buffer)


def keys_of(x, keys: dict[bytes, int]) -> list[int]:
    images = x.permute(0, 2, 3, 1).numpy()  # uint8 pixels, exactly as stored
    return [keys[img.tobytes()] for img in images]


def read(source: Path, keys, world: int, batch: int, workers: int, buffer: int, state: dict | None,
         batches: int | None) -> tuple[list[int], dict]:
    """Every rank of a `world`-process run resumes from rank 0's `state` (what the checkpointer
    hands each rank after a world change) and reads `batches` batches (None: to the epoch's end);
    returns the sample keys read over all ranks and rank 0's state after."""
    read_keys, states = [], []
    for rank in range(world):
        with build_stream(cfg(source, batch, workers, buffer), seed=5, rank=rank, world_size=world) as s:
            if state is not None:
                s.load_state_dict(json.loads(json.dumps(state)))
            epoch, it, n = s.state_dict()["epoch"], iter(s), 0
            while s.state_dict()["epoch"] == epoch if batches is None else n < batches:
                read_keys += keys_of(next(it)[0], keys)
                n += 1
            states.append(s.state_dict())
    assert all(st["epoch"] == states[0]["epoch"] and st["samples"] == states[0]["samples"] for st in states)
    return read_keys, states[0]


@pytest.mark.parametrize("plans", [
    [(2, 4, 2, 8, 3), (1, 4, 1, 8, None)],            # 2 -> 1 processes
    [(1, 3, 0, 1, 5), (2, 3, 2, 16, None)],           # 1 -> 2, other workers and shuffle buffer
    [(2, 2, 1, 8, 4), (1, 5, 2, 8, 2), (3, 2, 1, 4, None)],  # 2 -> 1 -> 3, other batch sizes
])
def test_world_change_reads_no_sample_twice_and_skips_less_than_a_global_batch(shards, plans):
    source, keys = shards
    seen, state = [], None
    for world, batch, workers, buffer, batches in plans:
        got, state = read(source, keys, world, batch, workers, buffer, state, batches)
        seen += got
        if batches is not None:
            assert len(got) == world * batch * batches
            assert state["samples"] == len(seen)  # "epoch e, k samples consumed"
    assert len(seen) == len(set(seen)), "a sample was read twice in one epoch"
    last_global_batch = plans[-1][0] * plans[-1][1]
    assert N - len(seen) < last_global_batch, f"{N - len(seen)} samples skipped"
    assert state["epoch"] == 1 and state["samples"] == 0 and state["segments"] == []


def test_same_plan_resume_is_exact_after_a_world_change(shards):
    """Inside a segment (same plan as the checkpoint) resume replays the same batches."""
    source, keys = shards
    _, moved = read(source, keys, 2, 4, 1, 8, None, 2)
    straight, _ = read(source, keys, 1, 4, 1, 8, moved, 5)
    _, part = read(source, keys, 1, 4, 1, 8, moved, 2)
    assert part["segments"] and part["batches"] == 2
    rest, _ = read(source, keys, 1, 4, 1, 8, part, 3)
    assert rest == straight[8:]


def test_replayed_shuffle_matches_the_stream_order():
    """The consumed-set computation replays the shuffle buffer on indices: its order must not depend on content."""
    a = shuffled_indices(50, 8, 3, "0:1:0:0")
    assert sorted(a) == list(range(50)) and a != list(range(50))
    seg = Segment(world_size=2, batch_size=3, workers=1, shuffle_buffer=1, batches=2)
    left = available_after([seg], 20, 0, 0)
    assert total(left) == 20 - 12 and left == [(6, 9), (15, 20)]  # rank 0 took 0..5, rank 1 took 9..14
