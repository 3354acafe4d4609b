"""`distgan bench loop` reports what the issue asks of it: the median ratio, the milliseconds per
step distgan adds, and every round. Only the report's shape and arithmetic are asserted here;
timings never decide a test (this machine is too noisy)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

TINY = ["data.resolution=16", "data.batch_size=4", "model.g_width=4", "model.d_width=4", "model.z_dim=8"]


def test_bench_loop_reports_median_ratio_difference_and_every_round():
    # A subprocess, as a user runs it (an in-process trainer would also leave accelerate's
    # process-wide state behind for later tests that fork this process).
    proc = subprocess.run([sys.executable, "-m", "distgan", "bench", "loop", "--steps", "2", "--rounds", "3", *TINY],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    rounds = report["rounds"]
    assert report["benchmark"] == "loop" and report["steps"] == 2 and len(rounds) == 3
    for r in rounds:
        assert r["plain_ms"] > 0 and r["distgan_ms"] > 0
        assert abs(r["ratio"] - r["distgan_ms"] / r["plain_ms"]) < 1e-3
        assert abs(r["diff_ms"] - (r["distgan_ms"] - r["plain_ms"])) < 1e-2
    assert report["ratio"] == statistics.median(r["ratio"] for r in rounds)
    assert report["diff_ms_per_step"] == statistics.median(r["diff_ms"] for r in rounds)
    # Per loop over the timed rounds: throughput and seconds per kimg agree with the step times;
    # memory is read only on a GPU (tests/gpu/test_benchmark.py), and this run is on the CPU.
    assert report["device"] == "cpu" and report["precision"] == "no" and report["batch"] == 4
    for loop in ("plain", "distgan"):
        r = report[loop]
        assert r["img_per_s"] > 0 and abs(r["sec_per_kimg"] * r["img_per_s"] - 1000) < 1, r
        mean_ms = statistics.mean(x[f"{loop}_ms"] for x in rounds)
        assert abs(report["images_per_step"] / (mean_ms / 1e3) - r["img_per_s"]) < 0.01 * r["img_per_s"], (r, mean_ms)
        assert r["peak_mib"] is None and r["resident_mib"] is None
