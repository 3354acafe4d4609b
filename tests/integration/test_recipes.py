"""Every shipped recipe trains: each configs/*.yaml, shrunk to a tiny width and resolution on the
test shards, trains 24 steps on the CPU in this process. Its losses must move, stay finite, and
the training-health monitor must not find a dead D or collapsed samples (D's gradient norm must
not fade either). A recipe that fails here is fixed or removed, not skipped.

What the shrinking keeps: the recipe's architecture, objective, regularizers and their schedule
shapes, augmentation, optimizer settings (learning rates, betas, D steps) and precision. What
it changes: data (the 16x16 test shards, so no recipe needs its dataset here), resolution (and
the projected discriminator's input side), widths, batch, run length, and no FID.

The GPU recipes are also held to what a GPU run needs, without a GPU: the paper's global batch
as `train.global_batch`, split evenly over 1, 8 and 64 GPUs, a per-process micro-batch whose
estimated step fits one 80 GB GPU (tests/helpers/activation_memory.py), and `auto` precision.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest

from distgan.config import Config, load_config
from distgan.global_batch import split_global_batch
from tests.helpers import REPO
from tests.helpers.activation_memory import GPU_BYTES, largest_micro_batch, step_bytes
from tests.helpers.inprocess import train_in_process

RECIPES = sorted((REPO / "configs").glob("*.yaml"))
STEPS = 24

GPU_RECIPES = {"r3gan-cifar10": 512, "r3gan-ffhq-64": 256, "r3gan-ffhq-256": 256, "stylegan2-ada-auto-256": 64,
               "stylegan2-ada-paper256": 64, "resnet-64": 64, "projected-cifar10": 64, "projected-ffhq-256": 64}
"""Recipes meant for GPUs (their first line says GPU) and the global batch each paper trains:
brownvc/R3GAN's README (`--gpus=8 --batch=512` CIFAR-10, `--batch=256` FFHQ-64/256), NVlabs
stylegan2-ada-pytorch's `paper256` and `auto` at 256x256 on 8 GPUs (64), SNGAN's 64, Projected GAN's
`--batch=64`."""
WORLD_SIZES = (1, 8, 64)

TINY = {"data.resolution": "16", "data.batch_size": "8", "data.workers": "0", "model.z_dim": "16",
        "model.g_width": "8", "model.d_width": "8", "model.widths": "[]", "model.projected_resolution": "0",
        "train.global_batch": "null",
        "optim.accumulate": "1", "train.steps": str(STEPS), "train.log_every": "4", "train.sample_every": "1000",
        "train.ckpt_every": "1000", "train.resume": "none", "eval.every_kimg": "0", "logging.wandb": "off",
        "train.progress": "false"}
"""Tiny-size overrides (keys this version of the config does not have are left out)."""


def _tiny(shards: Path, run_dir: Path) -> list[str]:
    known = {f"{s.name}.{f.name}" for s in dataclasses.fields(Config) for f in dataclasses.fields(s.default_factory)}
    return [f"{k}={v}" for k, v in TINY.items() if k in known] + [f"data.source={shards}", f"train.run_dir={run_dir}"]


def test_the_recipes_are_found():
    assert {"default", "stylegan-r1", "resnet-64"} <= {p.stem for p in RECIPES}


@pytest.mark.slow
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


def _says_gpu(recipe: Path) -> bool:
    return "GPU" in recipe.read_text().splitlines()[0]


def test_the_gpu_recipes_are_the_ones_that_say_so():
    assert {p.stem for p in RECIPES if _says_gpu(p)} == set(GPU_RECIPES)


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe_states_the_papers_global_batch_for_any_gpu_count(name):
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [])
    assert cfg.train.global_batch == GPU_RECIPES[name], f"{name}.yaml: train.global_batch={cfg.train.global_batch}"
    assert cfg.dist.mixed_precision == "auto", f"{name}.yaml: dist.mixed_precision={cfg.dist.mixed_precision!r}"
    for world in WORLD_SIZES:
        micro, accumulate = split_global_batch(cfg.train.global_batch, world, cfg.data.batch_size)
        assert micro * accumulate * world == cfg.train.global_batch and micro <= cfg.data.batch_size, (name, world)
    # On 8 GPUs (the papers' setting) each GPU runs the paper's per-GPU batch in as few micro-steps
    # as the micro-batch allows.
    per_gpu = cfg.train.global_batch // 8
    assert split_global_batch(cfg.train.global_batch, 8, cfg.data.batch_size) == (
        min(per_gpu, cfg.data.batch_size), max(1, per_gpu // cfg.data.batch_size)), name


@pytest.mark.parametrize("name", sorted(GPU_RECIPES))
def test_gpu_recipe_micro_batch_fits_one_80gb_gpu(name):
    """The bound comes from the recipe's own networks: the fp32 activations autograd keeps per
    image in the heavier of the D step (R1+R2, double backward) and the G step, x1.5 headroom, plus
    weights, gradients, Adam and the EMA (bf16/fp16 keep about half of the activations)."""
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [])
    bound = largest_micro_batch(cfg)
    assert cfg.data.batch_size <= bound, (
        f"{name}.yaml: data.batch_size={cfg.data.batch_size} is above the {bound} images per process whose step "
        f"is estimated to fit {GPU_BYTES / 1e9:.0f} GB ({step_bytes(cfg, cfg.data.batch_size) / 1e9:.1f} GB)")


def test_memory_estimate_follows_the_batch_and_the_resolution():
    """The estimate is a function of the networks: activations grow linearly with the batch, and
    R3GAN's FFHQ-256 networks need several times the memory per image of its FFHQ-64 ones."""
    small = load_config(REPO / "configs" / "r3gan-ffhq-64.yaml", [])
    large = load_config(REPO / "configs" / "r3gan-ffhq-256.yaml", [])
    assert step_bytes(small, 16) - step_bytes(small, 8) == pytest.approx(step_bytes(small, 8) - step_bytes(small, 0), rel=1e-6)
    assert largest_micro_batch(large) < largest_micro_batch(small) / 3
