"""Hyperparameter sweeps from a file: expansion into trials, validation, the sweep folder, sbatch.

A sweep file (`configs/sweeps/*.yaml`):

    name: lr-d-steps              # default: the file name; the W&B group of every trial
    base: configs/default.yaml    # recipe every trial starts from (default: as `distgan train`)
    folder: runs/sweep-lr         # default runs/sweep-<name>; trial i trains in <folder>/trial-<iii>
    method: grid                  # grid: every combination; random: `trials` draws
    trials: 4                     # random: required; grid: a seeded subset of the combinations
    seed: 0                       # random draws and grid subsets
    fixed: {train.steps: 2000}    # overrides shared by every trial
    parameters:                   # section.key -> values
      optim.g_lr: [1.0e-4, 2.0e-4]                                   # a list (grid or random choice)
      optim.d_lr: {distribution: log_uniform, min: 1.0e-5, max: 1.0e-3}   # random only
      optim.d_steps: {distribution: int_uniform, min: 1, max: 3}          # also `uniform`

Every trial's full config is built with `distgan.config` before anything is written or submitted,
so an unknown key or a bad value stops the sweep naming the key and the trial. The sweep folder
holds `sweep.json` (the trials) and per trial `trial.yaml`, the resolved config that
`slurm/sweep.sh` trains (array task i -> trial i, through `slurm/train.sh`).
"""

from __future__ import annotations

import difflib
import itertools
import json
import math
import os
import random
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distgan.config import Config, ConfigError, load_config
from distgan.run import resolve_recipe

TOP_KEYS = ("name", "base", "folder", "method", "trials", "seed", "fixed", "parameters")
METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
SWEEP_SH = Path(__file__).resolve().parent.parent / "slurm" / "sweep.sh"
"""The array script in a source checkout (`distgan sweep --submit --script` points elsewhere)."""


@dataclass
class Trial:
    index: int
    params: dict[str, Any]
    """The swept keys' values of this trial."""
    config: Config
    """Its full config: base recipe, `fixed`, `params`, run folder, name and W&B group."""

    @property
    def run_dir(self) -> Path:
        return self.config.run_dir


@dataclass
class Sweep:
    file: Path
    name: str
    folder: Path
    method: str
    seed: int
    trials: list[Trial] = field(default_factory=list)


def load_sweep(path: str | Path) -> Sweep:
    """Read, expand and validate a sweep file (ConfigError naming the file and key otherwise)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Sweep file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with keys {', '.join(TOP_KEYS)}")
    for key in spec:
        if key not in TOP_KEYS:
            close = difflib.get_close_matches(str(key), TOP_KEYS, n=1)
            raise ConfigError(f"{path}: unknown sweep key '{key}'." + (f" Did you mean '{close[0]}'?" if close else
                                                                      f" Valid keys: {', '.join(TOP_KEYS)}."))
    name = str(spec.get("name") or path.stem)
    method = spec.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{path}: method={method!r} must be grid or random")
    parameters, fixed = spec.get("parameters") or {}, spec.get("fixed") or {}
    if not isinstance(parameters, dict) or not parameters or not isinstance(fixed, dict):
        raise ConfigError(f"{path}: 'parameters' must map section.key to values (and 'fixed' to one value each)")
    seed = _int(spec.get("seed", 0), "seed", path)
    trials = spec.get("trials")
    trials = None if trials is None else _int(trials, "trials", path)
    if trials is not None and trials < 1:
        raise ConfigError(f"{path}: trials={trials} must be at least 1")
    points = (grid(parameters, trials, seed, path) if method == "grid" else sample_random(parameters, trials, seed, path))
    sweep = Sweep(path, name, Path(spec.get("folder") or f"runs/sweep-{name}"), method, seed)
    for i, params in enumerate(points):
        sweep.trials.append(Trial(i, params, _trial_config(spec.get("base"), fixed, params, sweep, i)))
    return sweep


def _int(value: Any, key: str, path: Path) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{path}: {key}={value!r} must be an integer")
    return value


def grid(parameters: dict[str, Any], trials: int | None, seed: int, path: Path) -> list[dict[str, Any]]:
    """Every combination (first key slowest); with `trials`, a seeded subset kept in grid order."""
    for key, values in parameters.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: parameters.{key}: a grid sweep takes a non-empty list of values, got {values!r}")
    keys = list(parameters)
    points = [dict(zip(keys, combo)) for combo in itertools.product(*parameters.values())]
    if trials is None or trials == len(points):
        return points
    if trials > len(points):
        raise ConfigError(f"{path}: trials={trials} but the grid has only {len(points)} combinations")
    return [points[i] for i in sorted(random.Random(seed).sample(range(len(points)), trials))]


def sample_random(parameters: dict[str, Any], trials: int | None, seed: int, path: Path) -> list[dict[str, Any]]:
    """`trials` draws, keys drawn in file order from one `random.Random(seed)`: the same file
    gives the same trials on any machine."""
    if trials is None:
        raise ConfigError(f"{path}: a random sweep needs trials=N")
    rng = random.Random(seed)
    return [{key: _draw(rng, key, spec, path) for key, spec in parameters.items()} for _ in range(trials)]


def _draw(rng: random.Random, key: str, spec: Any, path: Path) -> Any:
    if isinstance(spec, dict) and "values" in spec:
        spec = spec["values"]
    if isinstance(spec, list) and spec:
        return rng.choice(spec)
    if not isinstance(spec, dict) or spec.get("distribution") not in DISTRIBUTIONS:
        raise ConfigError(f"{path}: parameters.{key}: give a list of values or {{distribution: "
                          f"{'|'.join(DISTRIBUTIONS)}, min: A, max: B}}, got {spec!r}")
    lo, hi, kind = spec.get("min"), spec.get("max"), spec["distribution"]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)) or lo > hi or \
            (kind == "log_uniform" and lo <= 0):
        raise ConfigError(f"{path}: parameters.{key}: min and max must be numbers with min <= max "
                          f"(and > 0 for log_uniform), got min={lo!r} max={hi!r}")
    if kind == "int_uniform":
        return rng.randint(int(lo), int(hi))
    if kind == "log_uniform":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    return rng.uniform(lo, hi)


def _trial_config(base: str | None, fixed: dict, params: dict, sweep: Sweep, index: int) -> Config:
    overrides = {"logging.group": sweep.name, **fixed, **params, "train.name": f"{sweep.name}-{index:03d}",
                 "train.run_dir": str(sweep.folder / f"trial-{index:03d}")}
    try:
        return load_config(resolve_recipe(base), overrides)
    except ConfigError as e:
        raise ConfigError(f"{sweep.file}, trial {index} {params}: {e}") from None


# ---------------------------------------------------------------------------- the sweep folder and sbatch


def describe(sweep: Sweep) -> str:
    """What `--dry-run` prints: one line per trial."""
    lines = [f"# sweep {sweep.name}: {len(sweep.trials)} trials ({sweep.method}, seed {sweep.seed}) in {sweep.folder}"]
    for t in sweep.trials:
        params = " ".join(f"{k}={_plain(v)}" for k, v in t.params.items())
        lines.append(f"{t.index:3d}  {t.run_dir}  {params}")
    return "\n".join(lines)


def _plain(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else (repr(value) if value == "" else str(value))


def write_folder(sweep: Sweep) -> Path:
    """`sweep.json` and each trial's `trial.yaml` under the sweep folder. Resubmitting the same
    sweep reuses its folder (trials resume); a folder holding another sweep is refused."""
    record = {"name": sweep.name, "file": str(sweep.file), "method": sweep.method, "seed": sweep.seed,
              "trials": [{"index": t.index, "params": t.params, "run_dir": str(t.run_dir)} for t in sweep.trials]}
    index = sweep.folder / "sweep.json"
    if index.is_file() and json.loads(index.read_text())["trials"] != json.loads(json.dumps(record["trials"])):
        raise ConfigError(f"{sweep.folder} holds another sweep ({index} lists other trials): set folder: in "
                          f"{sweep.file} or remove the old folder.")
    for t in sweep.trials:
        t.run_dir.mkdir(parents=True, exist_ok=True)
        (t.run_dir / "trial.yaml").write_text(t.config.to_yaml())
    index.write_text(json.dumps(record, indent=1))
    return sweep.folder


def submit(sweep: Sweep, sbatch_args: list[str], script: Path = SWEEP_SH, parallel: int = 0) -> str:
    """Write the sweep folder and submit one array task per trial; returns the array job id."""
    if shutil.which("sbatch") is None:
        raise ConfigError("--submit needs SLURM's sbatch on PATH; `distgan sweep FILE --dry-run` lists the trials, and "
                          "`distgan train --config <folder>/trial-NNN/trial.yaml` runs one without SLURM.")
    if not script.is_file():
        raise ConfigError(f"{script} not found: pass --script path/to/slurm/sweep.sh")
    write_folder(sweep)
    array = f"0-{len(sweep.trials) - 1}" + (f"%{parallel}" if parallel else "")
    env = dict(os.environ)
    env.setdefault("DISTGAN_TRAIN_SH", str(script.parent / "train.sh"))
    cmd = ["sbatch", "--parsable", f"--array={array}", f"--job-name={sweep.name}", *sbatch_args, str(script),
           str(sweep.folder.resolve())]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise ConfigError(f"sbatch refused the sweep ({' '.join(cmd)}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


__all__ = ["Sweep", "Trial", "load_sweep", "grid", "sample_random", "describe", "write_folder", "submit"]
