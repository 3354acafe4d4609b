"""The data pipeline's cost: the trainer fed by the sharded stream against the same trainer fed by
the same batches already in memory (target ratio <= 1.05: loading never starves the step), and
the stream's own images per second with 1 and 2 loader workers."""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time

from distgan.benchmarks.timing import InMemoryStream, time_distgan
from distgan.config import Config
from distgan.data import build_stream


def data_overhead(cfg: Config, steps: int = 40, rounds: int = 3) -> dict:
    """Step time fed by shards / fed by the same batches in memory (median over rounds)."""
    cfg = copy.deepcopy(cfg)
    ratios, fed, mem = [], [], []
    for r in range(rounds):
        stream = build_stream(cfg.data, cfg.train.seed + r, 0, 1)
        it = iter(stream)
        count = min(stream.batches_per_epoch, 2 * steps * (cfg.optim.d_steps + 1))
        batches = [tuple(t.clone() for t in next(it)) for _ in range(count)]
        stream.close()
        mem.append(time_distgan(cfg, InMemoryStream(batches, list(stream.info.class_names)), steps))
        stream = build_stream(cfg.data, cfg.train.seed + r, 0, 1)
        try:
            fed.append(time_distgan(cfg, stream, steps))
        finally:
            stream.close()
        ratios.append(fed[-1] / mem[-1])
    return {"benchmark": "data", "ratio": statistics.median(ratios), "ratios": ratios,
            "shards_s_per_step": statistics.median(fed), "memory_s_per_step": statistics.median(mem)}


def data_throughput(cfg: Config, batches: int = 60) -> dict:
    """Images per second of the stream alone, for 1 and 2 loader workers, and the bytes of one
    batch as it travels from the workers to the device (uint8 pixels, labels)."""
    out = {"benchmark": "data_throughput"}
    for workers in (1, 2):
        data_cfg = dataclasses.replace(cfg.data, workers=workers)
        stream = build_stream(data_cfg, cfg.train.seed, 0, 1)
        it = iter(stream)
        for _ in range(5):
            images, labels = next(it)
        out["bytes_per_batch"] = sum(t.numel() * t.element_size() for t in (images, labels))
        start = time.perf_counter()
        n = sum(next(it)[0].shape[0] for _ in range(batches))
        out[f"img_per_s_{workers}_workers"] = n / (time.perf_counter() - start)
        stream.close()
    return out
