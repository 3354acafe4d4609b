"""Benchmarks, reported as ratios measured in one run (these machines are noisy; absolute times
are not): `loop` (trainer vs a plain PyTorch loop), `data` (shards vs batches in memory, and the
stream's img/s) and `scaling` (2 processes vs 1, optimizer state per rank). `distgan bench`
(distgan/cli/bench.py) runs them.

The submodules are not imported here: `scaling` also runs as `python -m distgan.benchmarks.scaling`
(its worker processes), which must find it unimported.
"""
