"""`distgan bench scaling`'s arithmetic, without launching processes: the probe times whole steps
after the warm-up from step starts, the runs are long enough to time any `--steps >= 1`, and a run
that could not be timed gives no efficiency and a notice, never a ZeroDivisionError."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from distgan.benchmarks import scaling


class _Backend:
    rank, world_size = 0, 2

    def optimizer(self, net):
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(3))])
        opt.state[0] = {"exp_avg": torch.zeros(3), "step": torch.tensor(1.0)}
        return opt


def _trainer(nimg: int):
    cfg = SimpleNamespace(dist=SimpleNamespace(backend="accelerate", zero_stage=0))
    return SimpleNamespace(backend=_Backend(), cfg=cfg, state=SimpleNamespace(nimg=nimg))


def test_probe_times_the_steps_after_warmup_from_images_really_shown(tmp_path, monkeypatch):
    clock = iter([0.0, 1.0, 3.0, 4.0, 5.0])  # two warm-up steps, then starts at 3, 4, 5: two timed steps
    monkeypatch.setattr(scaling.time, "perf_counter", lambda: next(clock))
    probe = scaling.ScalingProbe(tmp_path, warmup=2)
    for nimg in (0, 8, 16, 24, 32):
        probe.step_start(_trainer(nimg))
    probe.fit_end(_trainer(32), "done")
    row = json.loads((tmp_path / "rank-0.json").read_text())
    assert (row["timed_steps"], row["timed_seconds"], row["timed_images"]) == (2, 2.0, 16)
    assert row["img_per_s"] == 8.0 and row["optimizer_bytes"] == 2 * 3 * 4


def test_probe_of_a_run_too_short_to_time_reports_zero_not_an_error(tmp_path):
    probe = scaling.ScalingProbe(tmp_path, warmup=5)
    probe.step_start(_trainer(0))
    probe.fit_end(_trainer(8), "preempted")
    row = json.loads((tmp_path / "rank-0.json").read_text())
    assert row["timed_steps"] == 0 and row["img_per_s"] == 0.0


def _fake_launch(rates: dict[int, float], seen: list):
    def launch(nproc, run_dir, overrides, warmup):
        seen.append((nproc, list(overrides)))
        rate = rates[nproc]
        return [{"img_per_s": rate, "timed_steps": 2 if rate else 0, "optimizer_bytes": 100 // nproc}
                for _ in range(nproc)]
    return launch


def test_runs_are_long_enough_to_time_the_requested_steps(monkeypatch, tmp_path):
    seen: list = []
    monkeypatch.setattr(scaling, "make_shards", lambda root: tmp_path)
    monkeypatch.setattr(scaling, "launch", _fake_launch({1: 100.0, 2: 180.0}, seen))
    summary, sizes = list(scaling.measure_scaling(steps=2, warmup=1, rounds=1))
    assert "train.steps=4" in seen[0][1]  # warm-up 1 + 2 timed + the step that closes the last interval
    assert summary["efficiency"] == 0.9 and "noisy" in summary["notice"]
    assert sizes["zero2_vs_ddp"] == 1.0


def test_an_untimed_run_gives_no_efficiency_and_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(scaling, "make_shards", lambda root: tmp_path)
    monkeypatch.setattr(scaling, "launch", _fake_launch({1: 0.0, 2: 0.0}, []))
    summary = next(scaling.measure_scaling(steps=2, warmup=1, rounds=1, skip_zero=True, overrides=("train.steps=2",)))
    assert summary["efficiency"] is None and "no step rate" in summary["notice"]


def test_bad_counts_are_refused():
    with pytest.raises(ValueError, match="--steps >= 1"):
        next(scaling.measure_scaling(steps=0))
