"""`train.global_batch`: the same number of images per optimizer step on any world size.

A run that moves from 8 to 4 processes keeps its optimization (learning rate, EMA, R1 per
image) only if the global batch stays the same; this derives the per-process micro-batch and
the accumulation steps from it, before anything is built, and says clearly when the new world
cannot divide it.
"""

from __future__ import annotations

import math

from distgan.config import Config
from distgan.errors import ConfigError


def split_global_batch(global_batch: int, world_size: int, max_micro_batch: int) -> tuple[int, int]:
    """(micro-batch per process, accumulation steps) with micro x accumulation x world = global and
    the micro-batch as large as possible up to `max_micro_batch`."""
    if global_batch % world_size:
        divisors = [w for w in range(1, 2 * world_size + 1) if global_batch % w == 0]
        raise ConfigError(f"train.global_batch={global_batch} cannot be split evenly over {world_size} processes; "
                          f"use a world size that divides it (e.g. {', '.join(map(str, divisors[-4:]))}) or a global "
                          f"batch that {world_size} divides (e.g. {world_size * max(1, round(global_batch / world_size))}).")
    per_process = global_batch // world_size
    accumulate = math.ceil(per_process / max_micro_batch)
    while per_process % accumulate:  # terminates: accumulate = per_process always divides
        accumulate += 1
    return per_process // accumulate, accumulate


def apply_global_batch(cfg: Config, world_size: int) -> None:
    """Set data.batch_size and optim.accumulate from train.global_batch (no-op when unset)."""
    if cfg.train.global_batch is None:
        return
    cfg.data.batch_size, cfg.optim.accumulate = split_global_batch(cfg.train.global_batch, world_size, cfg.data.batch_size)
