"""Sweep files: grid and random expansion (counts, order, seeded determinism), every trial's
config validated before anything is written or submitted, the sweep folder, `distgan sweep`."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from distgan.cli import main
from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.sweep import load_sweep, write_folder
from tests.helpers import REPO


def sweep_file(tmp_path: Path, **spec) -> Path:
    spec.setdefault("folder", str(tmp_path / "sweep"))
    spec.setdefault("fixed", {"train.steps": 10, "logging.wandb": "off"})
    path = tmp_path / f"{spec.pop('file', 'sweep')}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


GRID = {"optim.g_lr": [1.0e-4, 2.0e-4], "optim.d_steps": [1, 2, 3]}
RANDOM = {"optim.g_lr": {"distribution": "log_uniform", "min": 1.0e-5, "max": 1.0e-3},
          "loss.r1_gamma": {"distribution": "uniform", "min": 0.0, "max": 10.0},
          "optim.d_steps": {"distribution": "int_uniform", "min": 1, "max": 3},
          "loss.diffaugment": ["", "color"]}


def test_grid_expands_every_combination_in_order(tmp_path):
    sweep = load_sweep(sweep_file(tmp_path, name="g", parameters=GRID))
    assert [t.params for t in sweep.trials] == [{"optim.g_lr": lr, "optim.d_steps": d} for lr in (1e-4, 2e-4)
                                                for d in (1, 2, 3)]
    for t in sweep.trials:
        cfg = t.config
        assert (cfg.optim.d_steps, cfg.train.steps, cfg.logging.group) == (t.params["optim.d_steps"], 10, "g")
        assert cfg.train.name == f"g-{t.index:03d}" and cfg.run_dir == tmp_path / "sweep" / f"trial-{t.index:03d}"


def test_grid_subset_is_seeded(tmp_path):
    def subset(seed: int) -> list[dict]:
        return [t.params for t in load_sweep(sweep_file(tmp_path, parameters=GRID, trials=4, seed=seed)).trials]

    full = [t.params for t in load_sweep(sweep_file(tmp_path, parameters=GRID)).trials]
    assert len(subset(0)) == 4 and subset(0) == subset(0) and subset(0) != subset(1)
    assert all(p in full for p in subset(0)) and subset(0) == sorted(subset(0), key=full.index)
    with pytest.raises(ConfigError, match="trials=7 but the grid has only 6 combinations"):
        load_sweep(sweep_file(tmp_path, parameters=GRID, trials=7))


def test_random_search_count_ranges_and_seeded_determinism(tmp_path):
    def draws(seed: int) -> list[dict]:
        return [t.params for t in load_sweep(sweep_file(tmp_path, method="random", trials=12, seed=seed,
                                                        parameters=RANDOM)).trials]

    a = draws(7)
    assert len(a) == 12 and a == draws(7) and a != draws(8)
    for p in a:
        assert 1e-5 <= p["optim.g_lr"] <= 1e-3 and 0 <= p["loss.r1_gamma"] <= 10
        assert p["optim.d_steps"] in (1, 2, 3) and isinstance(p["optim.d_steps"], int)
        assert p["loss.diffaugment"] in ("", "color")
    # log-uniform: about as many draws below the geometric middle as above it
    assert 2 <= sum(p["optim.g_lr"] < math.sqrt(1e-5 * 1e-3) for p in a) <= 10


@pytest.mark.parametrize("spec, message", [
    ({"parameters": {"optim.glr": [1e-4]}}, "trial 0 {'optim.glr': 0.0001}: Unknown config key 'optim.glr'. "
                                            "Did you mean 'optim.g_lr'?"),
    ({"parameters": {"optim.d_steps": [2, 0]}}, "trial 1 {'optim.d_steps': 0}: optim.d_steps=0: must be at least 1"),
    ({"parameters": GRID, "fixed": {"train.step": 3}}, "Did you mean 'train.steps'?"),
    ({"parameters": GRID, "trails": 3}, "unknown sweep key 'trails'. Did you mean 'trials'?"),
    ({"parameters": RANDOM}, "parameters.optim.g_lr: a grid sweep takes a non-empty list of values"),
    ({"parameters": RANDOM, "method": "random"}, "a random sweep needs trials=N"),
    ({"parameters": {"optim.g_lr": {"distribution": "normal"}}, "method": "random", "trials": 2},
     "parameters.optim.g_lr: give a list of values or {distribution: uniform|log_uniform|int_uniform"),
])
def test_bad_sweeps_are_refused_naming_the_key(tmp_path, spec, message):
    with pytest.raises(ConfigError) as e:
        load_sweep(sweep_file(tmp_path, **spec))
    assert message in str(e.value)


def test_submit_validates_every_trial_before_anything_is_written(tmp_path):
    bad = sweep_file(tmp_path, parameters={"optim.d_steps": [1, 2, -1]})
    result = CliRunner().invoke(main, ["sweep", str(bad), "--submit"])
    assert result.exit_code == 2 and "trial 2 {'optim.d_steps': -1}: optim.d_steps=-1" in result.output
    assert not (tmp_path / "sweep").exists()


def test_dry_run_prints_and_write_makes_trial_configs(tmp_path):
    path = sweep_file(tmp_path, name="lr", parameters=GRID, trials=2)
    result = CliRunner().invoke(main, ["sweep", str(path), "--dry-run"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == f"# sweep lr: 2 trials (grid, seed 0) in {tmp_path / 'sweep'}" and len(lines) == 3
    assert not (tmp_path / "sweep").exists()

    sweep = load_sweep(path)
    write_folder(sweep)
    for t in sweep.trials:  # what slurm/sweep.sh hands train.sh as --config: the trial's exact config
        assert load_config(t.run_dir / "trial.yaml").to_dict() == t.config.to_dict()
    write_folder(sweep)  # the same sweep again: reused (a resubmission resumes its trials)
    other = load_sweep(sweep_file(tmp_path, name="lr", parameters={"optim.g_lr": [5e-4]}))
    with pytest.raises(ConfigError, match="holds another sweep"):
        write_folder(other)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "sweeps").glob("*.yaml")))
def test_shipped_sweeps_are_valid(name, monkeypatch):
    monkeypatch.chdir(REPO)
    sweep = load_sweep(REPO / "configs" / "sweeps" / name)
    assert sweep.trials and sweep.folder == Path(f"runs/sweep-{sweep.name}")
