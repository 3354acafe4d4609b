"""Data pipeline throughput: images/s that ``build_stream`` delivers to the training loop.

(a) builtin:twemoji at 32x32, batch 32, with 1 and 2 DataLoader workers (decode + flip + batch in
    the workers, the main process only receives batches). The first batch (worker start-up) is
    not timed. (b), the step-time ratio with a model, is added by the trainer's owner.

    OMP_NUM_THREADS=1 python benchmarks/data_throughput.py [--cache-dir DIR] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import time
from itertools import islice

os.environ.setdefault("OMP_NUM_THREADS", "1")

from distgan.config import DataConfig  # noqa: E402
from distgan.data import build_stream  # noqa: E402
from distgan.data.builtin import materialize  # noqa: E402


def pipeline_throughput(cfg: DataConfig, batches: int, seed: int = 0) -> tuple[float, float]:
    """(images per second over `batches` batches after the first, seconds to the first batch)."""
    t0 = time.perf_counter()
    with build_stream(cfg, seed=seed, rank=0, world_size=1) as stream:
        it = iter(stream)
        next(it)
        first = time.perf_counter() - t0
        t1 = time.perf_counter()
        n = sum(x.shape[0] for x, _ in islice(it, batches))
        return n / (time.perf_counter() - t1), first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir", default=DataConfig().cache_dir, help="where builtin:twemoji is materialized")
    ap.add_argument("--epochs", type=float, default=3.0, help="epochs to time per setting")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--resolution", type=int, default=32)
    args = ap.parse_args()

    t0 = time.perf_counter()
    materialize("twemoji", args.resolution, 3, args.cache_dir)
    print(f"builtin:twemoji shards ready in {time.perf_counter() - t0:.1f} s (built once, then cached)")
    print(f"{'workers':>7} {'img/s':>9} {'batches':>8} {'first batch s':>14}")
    for workers in args.workers:
        cfg = DataConfig(source="builtin:twemoji", resolution=args.resolution, channels=3,
                         batch_size=args.batch_size, workers=workers, hflip=True, cache_dir=args.cache_dir)
        batches = int(args.epochs * (4009 // args.batch_size))
        rate, first = pipeline_throughput(cfg, batches)
        print(f"{workers:>7} {rate:>9.0f} {batches:>8} {first:>14.2f}")


if __name__ == "__main__":
    main()
