"""The training progress bar's expected end: the earlier of train.steps and train.max_minutes.

Clock values are passed in (the trainer passes its host-clock `train_seconds`), so these tests
drive the real bar logic with chosen times instead of waiting for them."""

from __future__ import annotations

import io

from distgan.config import load_config
from distgan.progress import TrainingProgress, expected_total

ROW = {"kimg": 1.0, "img_per_s": 100.0, "Dmain/loss": 0.5, "Gmain/loss": 1.5}


def test_without_a_time_budget_the_total_is_the_step_budget():
    assert expected_total(100, 12000, 100, 10.0, 0.0, 50) == 12000


def test_before_any_measured_step_the_total_is_the_step_budget():
    assert expected_total(0, 12000, 0, 0.0, 1200.0, 50) == 12000


def test_the_issue_case_time_budget_binds():
    """12,000 steps at ~6 steps/s (33 min) with a 19-minute budget: the bar must aim at ~6,840
    steps (19 min x 6/s), not 12,000."""
    step, seconds = 600, 100.0  # 6 steps/s measured over this launch
    total = expected_total(step, 12000, step, seconds, 19 * 60, 50)
    assert total == 6850  # 600 + 1040 s x 6/s = 6840, rounded up to the next log step
    eta_seconds = (total - step) / (step / seconds)
    assert abs(eta_seconds - (19 * 60 - seconds)) < 50 / 6  # the ETA is the minutes left (within a log step)


def test_step_budget_binds_when_it_comes_first():
    """A 60-minute budget on a 33-minute run changes nothing."""
    assert expected_total(600, 12000, 600, 100.0, 60 * 60, 50) == 12000


def test_spent_budget_ends_at_this_step():
    assert expected_total(700, 12000, 700, 1200.0, 1200.0, 50) == 700
    assert expected_total(700, 12000, 700, 1250.0, 1200.0, 50) == 700


def test_resumed_launch_uses_only_its_own_steps_for_the_rate():
    """After a resume at step 5000 the launch trained 300 steps in 100 s (3/s), and its clock
    (this launch's minutes, which max_minutes is checked against) has 500 s left: 1,500 more."""
    assert expected_total(5300, 12000, 300, 100.0, 600.0, 50) == 6800


def test_estimate_never_exceeds_the_step_budget_nor_goes_below_the_step():
    for step, seconds in [(1, 0.001), (11990, 1.0), (50, 599.999)]:
        total = expected_total(step, 12000, step, seconds, 600.0, 50)
        assert step <= total <= 12000


def _bar(tmp_path, monkeypatch, *overrides: str) -> TrainingProgress:
    monkeypatch.setenv("DISTGAN_NO_PROGRESS", "0")  # tests/conftest.py turns bars off
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.progress=true", *overrides])
    return TrainingProgress(cfg, is_main=True, initial=0, file=io.StringIO())  # the real tqdm, read back


def test_bar_follows_the_time_budget_at_log_steps(tmp_path, monkeypatch):
    bar = _bar(tmp_path, monkeypatch, "train.steps=12000", "train.max_minutes=19", "train.log_every=50")
    assert bar.total == 12000 and not bar.time_bound  # nothing measured yet
    bar.update(600)
    bar.log_step(600, 100.0, ROW)
    assert bar.total == 6850 and bar.time_bound
    bar.bar.refresh()
    shown = bar.bar.fp.getvalue()
    assert "600/6850" in shown and "ends by time: 19 min" in shown and "kimg 1.0" in shown
    bar.update(50)
    bar.log_step(650, 1140.0, ROW)  # budget spent: this log step is the last
    assert bar.total == 650
    bar.close()


def test_bar_keeps_the_step_budget_when_it_binds(tmp_path, monkeypatch):
    bar = _bar(tmp_path, monkeypatch, "train.steps=1000", "train.max_minutes=60", "train.log_every=50")
    bar.update(100)
    bar.log_step(100, 10.0, ROW)  # 10 steps/s: 100 s for the whole run, far below 60 min
    assert bar.total == 1000 and not bar.time_bound
    bar.bar.refresh()
    assert "ends by time" not in bar.bar.fp.getvalue()
    bar.close()


def test_disabled_bar_accepts_the_same_calls(tmp_path, monkeypatch):
    monkeypatch.setenv("DISTGAN_NO_PROGRESS", "1")
    cfg = load_config(None, [f"train.run_dir={tmp_path}", "train.steps=100", "train.max_minutes=1",
                             "train.log_every=10"])
    bar = TrainingProgress(cfg, is_main=True, initial=0)
    bar.update(10)
    bar.log_step(10, 30.0, ROW)
    assert bar.total == 20  # still estimated: 30 s left at 1/3 step/s -> 10 more steps, next log step
    bar.close()
