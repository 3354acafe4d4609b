"""The augmentation pipeline's presets and per-op probability multipliers (no torch here: the
config imports it to check `loss.augment` and `loss.augment_ops` before any work starts).

As NVlabs' AugmentPipe (stylegan2-ada-pytorch, training/augment.py, `__init__`), op i runs on a
sample with probability multiplier_i x p, and an op whose multiplier is 0 does not run at all.
The presets are the references' own:

- `bgc`: NVlabs' `augpipe_specs['bgc']` (stylegan2-ada-pytorch train.py): the blit, geometric and
  color ops, each at multiplier 1.
- `bgc-r3gan`: R3GAN's `augment_kwargs` (brownvc/R3GAN train.py, "# Augmentation."): the blit and
  geometric ops at 1, the color ops at 0.5, and cutout at 1 (a rectangle of half the image side).
"""

from __future__ import annotations

BLIT_OPS = ("xflip", "rotate90", "xint")
GEOMETRIC_OPS = ("scale", "rotate", "aniso", "xfrac")
COLOR_OPS = ("brightness", "contrast", "lumaflip", "hue", "saturation")
BGC_OPS = BLIT_OPS + GEOMETRIC_OPS + COLOR_OPS
ALL_OPS = BGC_OPS + ("cutout",)
"""Every op the pipeline knows, in the order it applies them (NVlabs' order). NVlabs' image-space
filtering and additive noise are not implemented; no reference preset used here turns them on."""

PRESETS: dict[str, dict[str, float]] = {
    "bgc": {op: 1.0 for op in BGC_OPS},
    "bgc-r3gan": {**{op: 1.0 for op in BLIT_OPS + GEOMETRIC_OPS}, **{op: 0.5 for op in COLOR_OPS}, "cutout": 1.0},
}


def parse_overrides(text: str, key: str = "loss.augment_ops") -> dict[str, float]:
    """`op=multiplier,op=multiplier` (e.g. `hue=0,cutout=1`) as a mapping; ValueError naming
    `key` on an unknown op, a missing or non-numeric multiplier or a negative one."""
    overrides: dict[str, float] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        op, sep, value = (s.strip() for s in item.partition("="))
        if op not in ALL_OPS:
            raise ValueError(f"{key}: unknown op {op!r} in {text!r}; ops: {', '.join(ALL_OPS)}")
        try:
            multiplier = float(value) if sep else float("nan")
        except ValueError:
            multiplier = float("nan")
        if not multiplier >= 0:  # also catches nan
            raise ValueError(f"{key}: {item!r} needs a multiplier of at least 0, written {op}=<number> "
                             f"(e.g. {op}=0.5)")
        overrides[op] = multiplier
    return overrides


def multipliers(preset: str, overrides: str = "") -> dict[str, float]:
    """Per-op probability multipliers of `preset` with `overrides` applied (ops at 0 dropped)."""
    if preset not in PRESETS:
        raise ValueError(f"loss.augment={preset!r}: no such preset; choose from {', '.join(PRESETS)}")
    merged = {**PRESETS[preset], **parse_overrides(overrides)}
    return {op: merged[op] for op in ALL_OPS if merged.get(op, 0.0) > 0}


__all__ = ["ALL_OPS", "BGC_OPS", "PRESETS", "multipliers", "parse_overrides"]
