"""Checkpoints saved before a config key existed: how they trained, and what a resume changes.

When distgan adopts a reference's behaviour as a new default (issue 20: NVlabs' minibatch-std
layout, path-length target, ...), a run saved earlier has no value for the new key in its
config, and resuming it with the new default would quietly train the rest of the run another way.
`LEGACY` says, per key, the value such a checkpoint trained with and when the key matters for it;
`older_checkpoint_changes` compares that with the resuming config:

- a key that shapes the networks (the conditional StyleGAN2 D's class-map depth) must keep the
  checkpoint's value: an error naming the override that does;
- a key that changes only how training goes is a warning naming the override that keeps the old
  behaviour (the resume may go on either way: it continues the run, with the reference's
  behaviour from here unless the user says otherwise).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Saved = dict[str, dict[str, Any]]


def _get(cfg: Saved, key: str) -> Any:
    section, name = key.split(".")
    return cfg.get(section, {}).get(name)


@dataclass(frozen=True)
class Legacy:
    old_value: Callable[[Saved], Any]
    """The value a checkpoint saved before the key existed trained with (from its saved config)."""
    applies: Callable[[Saved], bool]
    """Whether the key changes anything for that run."""
    shapes_networks: bool = False
    """A different value would not load the checkpoint's weights."""


def _arch(cfg: Saved) -> str:
    return _get(cfg, "model.arch") or ""


LEGACY: dict[str, Legacy] = {
    "model.d_mapping_layers": Legacy(lambda c: _get(c, "model.mapping_layers"),
                                     lambda c: _arch(c) == "stylegan2" and bool(_get(c, "model.conditional")),
                                     shapes_networks=True),
    "model.mbstd_layout": Legacy(lambda c: "consecutive", lambda c: _arch(c) == "stylegan2"),
    "model.lowp_stages": Legacy(lambda c: 0, lambda c: _arch(c) in ("stylegan2", "r3gan")
                                and _get(c, "dist.mixed_precision") not in (None, "", "no")),
    "loss.pl_target": Legacy(lambda c: "phase_start", lambda c: float(_get(c, "loss.pl_weight") or 0) > 0),
    "loss.g_reals": Legacy(lambda c: "reuse", lambda c: _get(c, "loss.objective") == "rpgan"),
    "loss.fake_labels": Legacy(lambda c: "uniform", lambda c: bool(_get(c, "model.conditional"))),
    "loss.augment_supersample": Legacy(lambda c: False, lambda c: bool(_get(c, "loss.augment"))),
    "loss.augment_p_max": Legacy(lambda c: 1.0, lambda c: float(_get(c, "loss.ada_target") or 0) > 0),
}


def older_checkpoint_changes(saved: Saved, current: Saved) -> tuple[list[str], list[str]]:
    """(errors, warnings) for resuming a checkpoint whose config predates keys in `LEGACY`."""
    errors, warnings = [], []
    for key, legacy in LEGACY.items():
        if _get(saved, key) is not None or not legacy.applies(saved):
            continue
        old, new = legacy.old_value(saved), _get(current, key)
        if old == new:
            continue
        line = (f"{key}: the checkpoint predates this key and trained as {key}={old!r}; this config has {new!r} "
                f"(set {key}={old!r} to train on as before)")
        (errors if legacy.shapes_networks else warnings).append(line)
    return errors, warnings


__all__ = ["LEGACY", "Legacy", "older_checkpoint_changes"]
