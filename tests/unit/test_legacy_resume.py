"""Resuming a checkpoint saved before a key existed (distgan/checkpoint/legacy.py).

Issue 20 made reference behaviours the new defaults; a run saved before that has no value for
those keys in its saved config. Its resume must not quietly change how it trains: a key that
shapes the networks is refused naming the override that fits the checkpoint, a behaviour key is
a warning naming the override that keeps the old behaviour. The saved configs here are real
`Config.to_dict()` output with the new keys removed, as an older distgan wrote them.
"""

from __future__ import annotations

import logging

import pytest

from distgan.checkpoint import check_resume_compatible
from distgan.checkpoint.legacy import LEGACY
from distgan.config import ConfigError, load_config

STYLEGAN2 = ["model.arch=stylegan2", "model.conditional=true", "model.mapping_layers=2", "loss.pl_weight=2",
             "loss.augment=bgc", "loss.ada_target=0.6", "dist.mixed_precision=bf16"]


def older(overrides: list[str]) -> dict:
    """The config an older distgan saved: today's with the keys it did not have removed."""
    saved = load_config(None, overrides).to_dict()
    for key in LEGACY:
        section, name = key.split(".")
        del saved[section][name]
    return saved


def test_the_d_class_map_depth_of_an_older_conditional_stylegan2_is_kept_or_refused():
    saved = older(STYLEGAN2)
    with pytest.raises(ConfigError, match=r"model.d_mapping_layers: the checkpoint predates this key and trained "
                                          r"as model.d_mapping_layers=2; this config has 8 \(set "
                                          r"model.d_mapping_layers=2"):
        check_resume_compatible(saved, load_config(None, STYLEGAN2).to_dict())
    check_resume_compatible(saved, load_config(None, [*STYLEGAN2, "model.d_mapping_layers=2"]).to_dict())


def test_new_reference_defaults_are_named_when_an_older_run_resumes(caplog):
    saved = older(STYLEGAN2)
    keep = [*STYLEGAN2, "model.d_mapping_layers=2"]
    with caplog.at_level(logging.WARNING, logger="distgan"):
        check_resume_compatible(saved, load_config(None, keep).to_dict())
    warned = {r.getMessage().split(":")[1].strip() for r in caplog.records}
    assert warned == {"model.mbstd_layout", "model.lowp_stages", "loss.pl_target", "loss.fake_labels",
                      "loss.augment_supersample", "loss.augment_p_max"}
    assert any("set loss.pl_target='phase_start' to train on as before" in r.getMessage() for r in caplog.records)
    caplog.clear()
    as_before = ["model.mbstd_layout=consecutive", "model.lowp_stages=0", "loss.pl_target=phase_start",
                 "loss.fake_labels=uniform", "loss.augment_supersample=false", "loss.augment_p_max=1"]
    with caplog.at_level(logging.WARNING, logger="distgan"):
        check_resume_compatible(saved, load_config(None, [*keep, *as_before]).to_dict())
    assert not caplog.records


def test_keys_that_do_not_apply_or_that_the_checkpoint_has_are_not_mentioned(caplog):
    dcgan = ["model.arch=dcgan"]
    with caplog.at_level(logging.WARNING, logger="distgan"):
        check_resume_compatible(older(dcgan), load_config(None, dcgan).to_dict())  # nothing of LEGACY applies
        check_resume_compatible(load_config(None, STYLEGAN2).to_dict(), load_config(None, STYLEGAN2).to_dict())
    assert not caplog.records
    rpgan = ["model.arch=r3gan", "loss.objective=rpgan"]
    with caplog.at_level(logging.WARNING, logger="distgan"):
        check_resume_compatible(older(rpgan), load_config(None, rpgan).to_dict())
    assert [r.getMessage().split(":")[1].strip() for r in caplog.records] == ["loss.g_reals"]
