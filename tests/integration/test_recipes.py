"""Every shipped recipe trains: each configs/*.yaml, shrunk to a tiny width and resolution on the
test shards, trains 24 steps on the CPU in this process. Its losses must move, stay finite, and
the training-health monitor must not find a dead D or collapsed samples (D's gradient norm must
not fade either). A recipe that fails here is fixed or removed, not skipped.

What the shrinking keeps: the recipe's architecture, objective, regularizers and their schedule
shapes, augmentation, optimizer settings (learning rates, betas, D steps) and precision. What
it changes: data (the 16x16 test shards, so no recipe needs its dataset here), resolution,
widths, batch, run length, and no FID.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from distgan.config import Config, load_config
from tests.helpers import REPO
from tests.helpers.inprocess import train_in_process

pytestmark = pytest.mark.slow

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
STEPS = 24

TINY = {"data.resolution": "16", "data.batch_size": "8", "data.workers": "0", "model.z_dim": "16",
        "model.g_width": "8", "model.d_width": "8", "model.widths": "[]", "train.global_batch": "null",
        "optim.accumulate": "1", "train.steps": str(STEPS), "train.log_every": "4", "train.sample_every": "1000",
        "train.ckpt_every": "1000", "train.resume": "none", "eval.every_kimg": "0", "logging.wandb": "off",
        "train.progress": "false"}
"""Tiny-size overrides (keys this version of the config does not have are left out)."""


def _tiny(shards: Path, run_dir: Path) -> list[str]:
    known = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)}
    return [f"{k}={v}" for k, v in TINY.items() if k in known] + [f"data.source={shards}", f"train.run_dir={run_dir}"]


def test_the_recipes_are_found():
    assert {"default", "stylegan-r1", "resnet-64"} <= {p.stem for p in RECIPES}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_each_recipe_trains(recipe, tiny_shards, tmp_path):
    rows = [r for r in train_in_process(load_config(recipe, _tiny(tiny_shards, tmp_path / "run"))) if "Dmain/loss" in r]
    assert len(rows) == STEPS // 4, f"{recipe.name}: {len(rows)} log rows"
    for key in ("Dmain/loss", "Gmain/loss"):
        values = [r[key] for r in rows]
        assert all(isinstance(v, float) and math.isfinite(v) for v in values), f"{recipe.name}: {key} = {values}"
        assert max(values) - min(values) > 1e-3 * max(1.0, max(abs(v) for v in values)), (
            f"{recipe.name}: {key} did not move in {STEPS} steps: {values}")
    warnings = {k: r[k] for r in rows for k in r if k.startswith("warning/")}
    assert not warnings, f"{recipe.name}: {warnings}"
    d_grad = [r["D/grad_norm"] for r in rows]
    assert d_grad[-1] > 0.05 * max(d_grad), f"{recipe.name}: D's gradient faded: {d_grad}"
