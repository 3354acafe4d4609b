"""Scheduled hyperparameters: values at given kimg, config forms, and the trainer's view."""

import math

import pytest

from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.gan.hyperparams import Hyperparameters
from distgan.gan.phases import Schedule, build_phases
from distgan.schedules import Scheduled


def test_values_at_given_kimg():
    cos = Scheduled(2e-4, 5e-5, kimg=100, shape="cosine")
    assert cos.at(0) == pytest.approx(2e-4)
    assert cos.at(50_000) == pytest.approx((2e-4 + 5e-5) / 2)  # half way: the cosine's midpoint
    assert cos.at(25_000) == pytest.approx(2e-4 + 0.5 * (1 - math.cos(math.pi / 4)) * (5e-5 - 2e-4))
    assert cos.at(100_000) == pytest.approx(5e-5) and cos.at(10**9) == pytest.approx(5e-5)  # held at the end
    lin = Scheduled(0.0, 0.3, kimg=10, shape="linear")
    assert lin.at(2500) == pytest.approx(0.075)
    assert Scheduled(0.5).at(12345) == 0.5 and Scheduled(0.5).constant


def test_config_accepts_numbers_and_mappings_and_names_errors():
    cfg = load_config(None, ["optim.g_lr={start: 2e-4, end: 5e-5, kimg: 20000, shape: cosine}",
                             "optim.d_betas=[0, {start: 0.9, end: 0.99, kimg: 100}]", "optim.d_lr=1e-3"])
    assert cfg.optim.g_lr.at(20_000_000) == pytest.approx(5e-5) and cfg.optim.d_lr == 1e-3
    assert cfg.optim.d_betas[1].at(0) == pytest.approx(0.9)
    plain = cfg.to_dict()["optim"]
    assert plain["d_lr"] == 1e-3 and plain["g_lr"] == {"start": 2e-4, "end": 5e-5, "kimg": 20000.0, "shape": "cosine"}
    assert load_config(None, plain and {f"optim.{k}": v for k, v in plain.items()}).optim.g_lr == cfg.optim.g_lr
    for bad, message in [("optim.g_lr={start: 1, end: 2}", "needs kimg > 0"),
                         ("optim.g_lr={start: 1, stop: 2}", "unknown keys"),
                         ("optim.g_lr={start: 1, end: 2, kimg: 5, shape: wiggly}", "not one of cosine, linear"),
                         ("optim.g_lr={start: 2e-4, end: -1, kimg: 5}", "must be greater than 0"),
                         ("loss.augment_p={start: 0, end: 1.5, kimg: 5}", "at most 1")]:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [bad])


def _hyper(*overrides):
    cfg = load_config(None, list(overrides))
    return Hyperparameters(cfg, Schedule(build_phases(cfg)))


def test_hyperparameters_depend_on_images_seen_only():
    """Values are functions of nimg: any world size or resume point that reached the same kimg
    gets the same values (so nothing about them needs saving)."""
    overrides = ["optim.g_lr={start: 2e-4, end: 5e-5, kimg: 10}", "loss.r1_gamma={start: 1, end: 0.1, kimg: 10}",
                 "loss.objective=rpgan", "loss.r1_interval=1", "optim.ema_halflife_kimg={start: 0, end: 5, kimg: 10}"]
    one = _hyper(*overrides, "data.batch_size=64")
    two = _hyper(*overrides, "data.batch_size=32")
    # 1 process x 64 images after 100 steps and 2 processes x 32 after 100 steps: both 6400 images.
    assert one.at(64 * 100) == two.at(2 * 32 * 100)
    assert one.scheduled == ("G/lr", "r1_gamma", "r2_gamma", "ema_halflife_kimg")  # R2 follows R1 under rpgan
    logged = one.logged(one.at(5000))
    assert logged["schedule/G/lr"] == pytest.approx((2e-4 + 5e-5) / 2) and "schedule/D/lr" not in logged


def test_lazy_regularization_correction_applies_to_scheduled_values():
    h = _hyper("loss.r1_gamma=1", "loss.r1_interval=4", "optim.d_lr={start: 1e-3, end: 1e-4, kimg: 1}",
               "optim.d_betas=[0, 0.99]")
    spec = h.adam(h.at(1000), "D")
    assert spec.lr == pytest.approx(1e-4 * 4 / 5) and spec.betas[1] == pytest.approx(0.99 ** (4 / 5))
    assert h.adam(h.at(1000), "G").lr == pytest.approx(2e-4)  # G has no regularization phase
