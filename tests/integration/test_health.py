"""The training-health monitor (distgan/health.py) on tiny runs that really fail, and on one that
does not: each failure gives exactly one warning naming the step, the signal and what to try, in
the log, in metrics.jsonl (`warning/<name>`) and, with W&B on, as an alert in the offline run file.

* D wins outright: G's learning rate is ~0 (G frozen) and D's is high; config only, through the
  real CLI with W&B offline.
* Dead D: the ReLUs after the residual D's last block never fire again (their conv bias far
  below zero), so D outputs its bias for every image: the state the stylegan-r1 recipe reached
  by step ~350 with a learning rate 12x too high (configs/stylegan-r1.yaml).
* Sample collapse: from step 10 on, G's weights from the latent are zero before every step (and
  G's learning rate ~0, so they stay ~0), so every latent gives (nearly) the same image.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distgan.config import load_config
from distgan.health import SPREAD_KEY
from distgan.trainer import TrainerHooks
from tests.helpers import REPO, tiny_overrides
from tests.helpers.inprocess import metric_rows, train_in_process
from tests.wandb_reader import find_runs, read_run

pytestmark = pytest.mark.slow

WARNINGS = ("warning/dead_discriminator", "warning/discriminator_wins", "warning/sample_collapse")


def _overrides(shards: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return tiny_overrides(shards, run_dir, f"train.steps={steps}", "train.log_every=2", "train.sample_every=1000",
                          "train.ckpt_every=1000", "train.resume=none", *extra)


def _warnings(rows: list[dict]) -> dict[str, list[tuple[int, str]]]:
    """Each warning key -> [(step, message)] of the rows that carry it."""
    return {key: [(r["step"], r[key]) for r in rows if key in r] for key in WARNINGS if any(key in r for r in rows)}


def _train_here(overrides: list[str], hooks=()) -> list[dict]:
    """Train in this process (the hooks reach into the live networks); returns the metric rows."""
    return train_in_process(load_config(None, overrides), hooks)


class DeadLastReLUs(TrainerHooks):
    """Before the first step, push the residual D's last conv bias far below zero: with the
    identity shortcut of the last block no pre-activation ever gets positive again, so no
    gradient reaches any D weight but the output bias."""

    def step_start(self, trainer) -> None:
        if trainer.state.step == 0:
            with torch.no_grad():
                trainer.backend.module("D").blocks[-1].conv2.bias.fill_(-1e3)


class ConstantG(TrainerHooks):
    """From step `at` on, G's input layer (latent -> first features) is zero before every step."""

    def __init__(self, at: int):
        self.at = at

    def step_start(self, trainer) -> None:
        if trainer.state.step >= self.at:
            with torch.no_grad():
                trainer.backend.module("G").input.weight.zero_()


def test_a_discriminator_that_wins_outright_warns_once_in_log_metrics_and_wandb(tiny_shards, tmp_path):
    run_dir = tmp_path / "wins"
    # The non-saturating loss without R1/R2 (the default recipe's zero-centered penalties bound D's margin).
    args = _overrides(tiny_shards, run_dir, 60, "optim.g_lr=1e-9", "optim.d_lr=0.002", "logging.wandb=offline",
                      "train.name=wins", "loss.objective=logistic", "loss.r1_gamma=0")
    proc = subprocess.run([sys.executable, "-m", "distgan", "train", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = _warnings(metric_rows(run_dir))
    assert list(found) == ["warning/discriminator_wins"], found
    [(step, message)] = found["warning/discriminator_wins"]
    assert message.startswith(f"step {step}: the discriminator is winning outright: D(real) - D(fake) rose from")
    assert "Try a higher optim.g_lr" in message
    logged = [line for line in proc.stderr.splitlines() if "Training health:" in line]
    assert len(logged) == 1 and logged[0].endswith(message), logged
    [wandb_file] = find_runs(run_dir)
    alerts = read_run(wandb_file).alerts
    assert alerts == [{"title": "distgan wins: discriminator wins", "text": message, "level": "WARN"}], alerts


def test_a_dead_discriminator_warns_once(tiny_shards, tmp_path, caplog):
    rows = _train_here(_overrides(tiny_shards, tmp_path / "dead", 24, "model.arch=resnet"), [DeadLastReLUs()])
    found = _warnings(rows)
    assert list(found) == ["warning/dead_discriminator"], found
    [(step, message)] = found["warning/dead_discriminator"]
    assert step == 10  # the 5th log row: the first full window
    assert f"step {step}: the discriminator looks dead" in message and "a constant D gives 1.386" in message
    assert "Try a lower optim.d_lr" in message
    assert [r.getMessage() for r in caplog.records if "Training health" in r.getMessage()] == [
        f"Training health: {message}"]


def test_collapsed_samples_warn_once(tiny_shards, tmp_path):
    # g_norm=none: batch norm would re-amplify whatever latent dependence G re-learns.
    rows = _train_here(_overrides(tiny_shards, tmp_path / "collapse", 30, "model.g_norm=none", "optim.g_lr=1e-6"),
                       [ConstantG(at=10)])
    spreads = {r["step"]: r[SPREAD_KEY] for r in rows if SPREAD_KEY in r}
    before, after = [s for step, s in spreads.items() if step <= 10], [s for step, s in spreads.items() if step > 10]
    assert max(after) < 0.01 * min(before), spreads
    found = _warnings(rows)
    assert "warning/sample_collapse" in found, found
    [(step, message)] = found["warning/sample_collapse"]
    assert step == 20  # 5 log rows after the collapse (steps 12..20)
    assert message.startswith(f"step {step}: the samples have collapsed")


def test_a_healthy_run_warns_nothing(tiny_shards, tmp_path):
    rows = _train_here(_overrides(tiny_shards, tmp_path / "healthy", 40))
    assert not _warnings(rows)
    assert rows[-1][SPREAD_KEY] > 0.01  # small at first (G's batch-norm statistics), then it rises


def test_health_checks_can_be_turned_off(tiny_shards, tmp_path):
    rows = _train_here(_overrides(tiny_shards, tmp_path / "off", 24, "model.arch=resnet", "train.health_checks=false"),
                       [DeadLastReLUs()])
    assert not _warnings(rows) and not any(SPREAD_KEY in r for r in rows)
