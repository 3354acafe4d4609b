"""Every StyleGAN2-ADA and R3GAN GPU recipe reproduces its reference's preset, value for value.

Each such recipe names, in a `# reference: owner/name@commit: command` comment, the reference
training command it reproduces. This test holds a table of the references' presets at those
commits (NVlabs' `cfg_specs` and the `auto` rules in stylegan2-ada-pytorch train.py; the presets
of brownvc/R3GAN train.py), derives from the command what the reference would train with, in
distgan's keys, and compares it with the recipe: widths, mapping depth, learning rates, betas,
gamma, EMA and its ramp-up, minibatch-std group, global batch, augmentation multipliers,
conditioning, mirroring and precision per stage. A recipe edit that drifts from its reference,
or a reference row copied wrong, fails here.

What distgan expresses differently, and is checked in its own terms:
- NVlabs' EMA `ema_kimg` is a half-life in kimg (beta = 0.5 ** (batch / ema_nimg)): distgan's
  `optim.ema_halflife_kimg`. R3GAN's `ema_scheduler` ramps that half-life (in images) by its
  cosine schedule: the same schedule on `ema_halflife_kimg`, with distgan's own ramp-up off.
- R3GAN's `cosine_decay_with_warmup(cur_nimg, base, total_nimg, final)` (no warm-up, no hold)
  is distgan's `{start: base, end: final, kimg: total_nimg / 1000, shape: cosine}`.
- Low precision: NVlabs runs fp16 in the `num_fp16_res` highest-resolution blocks with
  activations clamped at `conv_clamp`; distgan's `model.lowp_stages`/`model.conv_clamp` under
  `dist.mixed_precision=auto` (bf16 where the GPU has it, else fp16).
- A reference's per-GPU batch is `train.global_batch` split over the processes.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest

from distgan.config import load_config
from distgan.gan.augment_presets import multipliers
from distgan.models.r3gan import lowp_stage_count
from distgan.models.stylegan2 import NVLABS_LOWP_STAGES
from distgan.schedules import Scheduled
from tests.helpers import REPO

NVLABS = ("NVlabs/stylegan2-ada-pytorch", "d72cc7d041b42ec8e806021a205ed9349f87c6a4")
R3GAN = ("brownvc/R3GAN", "19a7ddf463fbac2bd39b4c1c73d63f1c441c7403")

NVLABS_SPECS = {
    # train.py cfg_specs (the rows distgan's recipes use); -1: filled by the `auto` rules.
    "auto": dict(ref_gpus=-1, mb=-1, mbstd=-1, fmaps=-1, lrate=-1, gamma=-1, ema=-1, ramp=0.05, map=2),
    "paper256": dict(ref_gpus=8, mb=64, mbstd=8, fmaps=0.5, lrate=0.0025, gamma=1, ema=20, ramp=None, map=8),
}
NVLABS_FIXED = {
    # train.py and training_loop.py values every cfg shares (loss.py defaults included).
    "z_dim": 512, "w_dim": 512, "channel_max": 512, "num_fp16_res": 4, "conv_clamp": 256,
    "betas": (0.0, 0.99), "pl_weight": 2, "style_mixing_prob": 0.9, "pl_batch_shrink": 2, "pl_decay": 0.01,
    "G_reg_interval": 4, "D_reg_interval": 16, "ada_target": 0.6, "ada_kimg": 500, "ada_interval": 4,
    "augpipe": "bgc", "D_mapping_layers": 8,
}

R3GAN_PRESETS = {
    # train.py presets: WidthPerStage, BlocksPerStage, CardinalityPerStage, FP16Stages, NoiseDimension,
    # ema_nimg, decay_nimg, and the cosine schedules' (base, final).
    "CIFAR10": dict(widths=[768] * 4, blocks=[2] * 4, cardinality=[96] * 4, fp16_stages=[-1, -2, -3], noise=64,
                    ema_nimg=5000 * 1000, decay_nimg=2e7, aug=(0, 0.55), lr=(2e-4, 5e-5), gamma=(0.05, 0.005),
                    beta2=(0.9, 0.99)),
    "FFHQ-64": dict(widths=[768] * 4 + [384], blocks=[2] * 5, cardinality=[96] * 4 + [48],
                    fp16_stages=[-1, -2, -3, -4], noise=64, ema_nimg=500 * 1000, decay_nimg=2e7, aug=(0, 0.3),
                    lr=(2e-4, 5e-5), gamma=(2, 0.2), beta2=(0.9, 0.99)),
    "FFHQ-256": dict(widths=[768] * 4 + [384, 192, 96], blocks=[2] * 7, cardinality=[96] * 4 + [48, 24, 12],
                     fp16_stages=[-1, -2, -3, -4], noise=64, ema_nimg=500 * 1000, decay_nimg=2e7, aug=(0, 0.3),
                     lr=(2e-4, 5e-5), gamma=(150, 15), beta2=(0.9, 0.99)),
}
R3GAN_FIXED = {"expansion": 2, "beta1": 0.0, "augment": "bgc-r3gan",
               # train.py's AugmentPipe kwargs under --aug=1
               "multipliers": dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=0.5,
                                   contrast=0.5, lumaflip=0.5, hue=0.5, saturation=0.5, cutout=1)}

RECIPES = {
    "stylegan2-ada-auto-256": NVLABS, "stylegan2-ada-paper256": NVLABS,
    "r3gan-cifar10": R3GAN, "r3gan-ffhq-64": R3GAN, "r3gan-ffhq-256": R3GAN,
}
"""The GPU recipes that reproduce a reference preset, and that reference."""

REFERENCE_LINE = re.compile(r"^# reference: (?P<repo>[\w.-]+/[\w.-]+)@(?P<commit>[0-9a-f]{40}): (?P<command>.+)$", re.M)


def reference_of(recipe: Path) -> tuple[str, str, dict[str, str]]:
    """(repository, commit, command-line options) from the recipe's `# reference:` comment."""
    found = REFERENCE_LINE.search(recipe.read_text())
    assert found, f"{recipe.name}: no '# reference: owner/name@<40-hex commit>: <command>' line"
    words = shlex.split(found["command"])
    assert words[:2] == ["python", "train.py"], f"{recipe.name}: the reference command is its train.py"
    options = dict(w[2:].split("=", 1) for w in words[2:])
    return found["repo"], found["commit"], options


def cosine(base: float, final: float, total_nimg: float) -> Scheduled:
    return Scheduled(base, final, total_nimg / 1000, "cosine")


def nvlabs_expected(options: dict[str, str], resolution: int) -> dict[str, Any]:
    """What NVlabs' train.py trains with for these options, in distgan's keys."""
    spec, gpus, fixed = dict(NVLABS_SPECS[options["cfg"]]), int(options["gpus"]), NVLABS_FIXED
    if options["cfg"] == "auto":  # train.py's rules for --cfg=auto
        spec["mb"] = max(min(gpus * min(4096 // resolution, 32), 64), gpus)
        spec["mbstd"] = min(spec["mb"] // gpus, 4)
        spec["fmaps"] = 1 if resolution >= 512 else 0.5
        spec["lrate"] = 0.002 if resolution >= 1024 else 0.0025
        spec["gamma"] = 0.0002 * resolution**2 / spec["mb"]
        spec["ema"] = spec["mb"] * 10 / 32
    channel_base = int(spec["fmaps"] * 32768)
    stages = [2**k for k in range(2, resolution.bit_length())]
    return {
        "model.arch": "stylegan2", "model.z_dim": fixed["z_dim"], "model.w_dim": fixed["w_dim"],
        "model.widths": [min(channel_base // r, fixed["channel_max"]) for r in stages],
        "model.mapping_layers": spec["map"], "model.d_mapping_layers": fixed["D_mapping_layers"],
        "model.mbstd_group": spec["mbstd"], "model.mbstd_layout": "strided",
        "model.style_mixing_prob": fixed["style_mixing_prob"],
        "lowp stages": fixed["num_fp16_res"], "model.conv_clamp": fixed["conv_clamp"],
        "model.conditional": options.get("cond", "0") in ("1", "true"),
        "data.hflip": options.get("mirror", "0") in ("1", "true"),
        "loss.objective": "logistic", "loss.r1_gamma": spec["gamma"], "loss.r2": 0.0,
        "loss.r1_interval": fixed["D_reg_interval"], "loss.pl_weight": fixed["pl_weight"],
        "loss.pl_interval": fixed["G_reg_interval"], "loss.pl_batch_shrink": fixed["pl_batch_shrink"],
        "loss.pl_decay": fixed["pl_decay"], "loss.augment": fixed["augpipe"],
        "loss.multipliers": {op: 1.0 for op in multipliers("bgc")}, "loss.augment_p": 0.0,
        "loss.ada_target": fixed["ada_target"], "loss.ada_kimg": fixed["ada_kimg"],
        "loss.ada_interval": fixed["ada_interval"],
        "optim.d_steps": 1, "optim.g_lr": spec["lrate"], "optim.d_lr": spec["lrate"],
        "optim.g_betas": fixed["betas"], "optim.d_betas": fixed["betas"],
        "optim.ema_halflife_kimg": spec["ema"], "optim.ema_rampup": spec["ramp"] or 0.0,
        "train.global_batch": spec["mb"], "dist.mixed_precision": "auto",
    }


def r3gan_expected(options: dict[str, str], resolution: int) -> dict[str, Any]:
    """What brownvc/R3GAN's train.py trains with for these options, in distgan's keys."""
    p, fixed = R3GAN_PRESETS[options["preset"]], R3GAN_FIXED
    assert 4 * 2 ** (len(p["widths"]) - 1) == resolution, "one stage per resolution from 4x4"
    group_sizes = {w * fixed["expansion"] // c for w, c in zip(p["widths"], p["cardinality"])}
    assert len(group_sizes) == 1 and len(set(p["blocks"])) == 1, "distgan: one group size, one block count"
    decay = p["decay_nimg"]
    beta2 = cosine(*p["beta2"], decay)
    return {
        "model.arch": "r3gan", "model.z_dim": p["noise"], "model.widths": p["widths"],
        "model.blocks_per_stage": p["blocks"][0], "model.expansion": fixed["expansion"],
        "lowp stages": len(p["fp16_stages"]),  # bf16 in G's last and D's first stages, the rest fp32
        "model.group_size": group_sizes.pop(),
        "model.conditional": options.get("cond", "0") in ("1", "true"),
        "data.hflip": options.get("mirror", "0") in ("1", "true"),
        "loss.objective": "rpgan", "loss.r1_gamma": cosine(*p["gamma"], decay), "loss.r2": cosine(*p["gamma"], decay),
        "loss.r1_interval": 1,
        "loss.augment": fixed["augment"] if options.get("aug", "1") in ("1", "true") else "",
        "loss.multipliers": fixed["multipliers"], "loss.augment_p": cosine(*p["aug"], decay),
        "optim.d_steps": 1, "optim.g_lr": cosine(*p["lr"], decay), "optim.d_lr": cosine(*p["lr"], decay),
        "optim.g_betas": (fixed["beta1"], beta2), "optim.d_betas": (fixed["beta1"], beta2),
        "optim.ema_halflife_kimg": cosine(0, p["ema_nimg"] / 1000, decay), "optim.ema_rampup": 0.0,
        "train.global_batch": int(options["batch"]), "dist.mixed_precision": "auto",
    }


def recipe_values(cfg, keys) -> dict[str, Any]:
    """The recipe's values for `keys` (distgan's dotted keys, plus the derived `loss.r2`,
    `loss.multipliers` and the count of low-precision stages `model.lowp_stages` resolves to)."""
    stages = cfg.data.resolution.bit_length() - 2  # 4x4 up to the resolution
    lowp = (lowp_stage_count(cfg.model.lowp_stages, stages) if cfg.model.arch == "r3gan"
            else NVLABS_LOWP_STAGES if cfg.model.lowp_stages < 0 else cfg.model.lowp_stages)
    derived = {"loss.r2": cfg.loss.r2(), "loss.multipliers": multipliers(cfg.loss.augment, cfg.loss.augment_ops)
               if cfg.loss.augment else {}, "lowp stages": lowp}
    out = {}
    for key in keys:
        if key in derived:
            out[key] = derived[key]
            continue
        section, name = key.split(".")
        out[key] = getattr(getattr(cfg, section), name)
    return out


def plain(value: Any) -> Any:
    """A comparable form: a Scheduled as its (start, end, kimg, shape), a constant as its float,
    floats to 12 significant digits (0.0002 * 256**2 / 64 is 0.2048 up to rounding)."""
    if isinstance(value, Scheduled):
        return plain(value.start) if value.constant else [plain(value.start), plain(value.end), plain(value.kimg),
                                                          value.shape]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, bool) or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(f"{float(value):.12g}")
    return value


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_reproduces_its_reference_preset(name):
    recipe = REPO / "configs" / f"{name}.yaml"
    repo, commit, options = reference_of(recipe)
    assert (repo, commit) == RECIPES[name], f"{name}: the table holds {RECIPES[name]}'s presets, not {repo}@{commit}"
    cfg = load_config(recipe)
    expected = (nvlabs_expected if repo == NVLABS[0] else r3gan_expected)(options, cfg.data.resolution)
    got = recipe_values(cfg, expected)
    wrong = {k: (plain(got[k]), plain(v)) for k, v in expected.items() if plain(got[k]) != plain(v)}
    assert not wrong, f"{name} differs from {repo}@{commit[:7]} {options}: " + "; ".join(
        f"{k} is {g!r}, the reference {e!r}" for k, (g, e) in wrong.items())


def test_every_gpu_recipe_of_a_reference_is_in_the_table():
    """A new stylegan2-ada-* or r3gan-* GPU recipe must join the table (CPU recipes say 'CPU' first)."""
    for recipe in sorted((REPO / "configs").glob("*.yaml")):
        if recipe.stem.startswith(("stylegan2-ada-", "r3gan-")) and "GPU" in recipe.read_text().splitlines()[0]:
            assert recipe.stem in RECIPES, f"{recipe.name} is a GPU recipe of a reference but not in the table"


def test_the_table_catches_a_drifted_value():
    """The comparison is not vacuous: the paper256 recipe with its R1 gamma changed fails."""
    recipe = REPO / "configs" / "stylegan2-ada-paper256.yaml"
    _, _, options = reference_of(recipe)
    cfg = load_config(recipe, ["loss.r1_gamma=2.0"])
    expected = nvlabs_expected(options, cfg.data.resolution)
    got = recipe_values(cfg, expected)
    assert plain(got["loss.r1_gamma"]) != plain(expected["loss.r1_gamma"])
