"""Training step fed by sharded data vs the same batches already in memory.

    OMP_NUM_THREADS=1 python benchmarks/data_overhead.py [--steps 40 --rounds 3] [key=value ...]

Prints one JSON line; `ratio` = shards seconds per step / in-memory seconds per step (target <= 1.05).
"""

import sys

from distgan.cli import main

if __name__ == "__main__":
    main(["bench", "data", *sys.argv[1:]])
