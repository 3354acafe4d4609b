"""distgan's training loop vs a plain hand-written PyTorch loop (same models and batches).

    OMP_NUM_THREADS=1 python benchmarks/loop_overhead.py [--steps 40 --rounds 3] [key=value ...]

Prints one JSON line; `ratio` = distgan seconds per step / plain seconds per step (target <= 1.03).
"""

import sys

from distgan.cli import main

if __name__ == "__main__":
    main(["bench", "loop", *sys.argv[1:]])
