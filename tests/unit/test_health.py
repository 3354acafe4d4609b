"""The health monitor's pieces on real objects: a constant D's loss for every objective, the
sample spread of a real generator with and without its latent input, and the window rules
(a condition must hold `window` rows in a row; each detector warns once)."""

from __future__ import annotations

import math

import pytest
import torch

from distgan.config import ModelConfig
from distgan.gan.losses import OBJECTIVES, d_loss, gradient_penalty
from distgan.health import DEAD_D, HealthMonitor, HealthThresholds, constant_d_loss, sample_spread
from distgan.models import build_models


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_constant_d_loss_is_the_loss_of_a_d_that_outputs_zero(objective):
    real, fake = torch.rand(8, 3, 8, 8), torch.rand(8, 3, 8, 8)

    def flat_d(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).sum(1) * 0.0  # 0 everywhere, and a zero input gradient

    expected = float(d_loss(objective, flat_d(real), flat_d(fake)))
    if objective == "wgan-gp":
        expected += 10.0 * float(gradient_penalty(flat_d, real, fake))
    assert constant_d_loss(objective, gp_weight=10.0) == pytest.approx(expected)
    assert constant_d_loss("logistic") == pytest.approx(2 * math.log(2))


def test_sample_spread_is_zero_when_g_ignores_its_latent():
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(z_dim=16, g_width=8, d_width=8), 16, 3, 0)
    z = torch.randn(32, 16)  # train mode: batch statistics (a new G's running statistics shrink its outputs)
    with torch.no_grad():
        assert sample_spread(G(z)) > 0.01
        G.input.weight.zero_()
        assert sample_spread(G(z)) < 1e-6


def _dead_row(step: int) -> dict[str, float]:
    return {"step": step, "Dmain/D_real": 0.001, "Dmain/D_fake": -0.002, "Dmain/loss": 1.3865, "D/grad_norm": 0.004,
            "Gmain/loss": 0.69}


def test_a_condition_must_hold_for_a_whole_window_and_warns_once():
    monitor = HealthMonitor("logistic", thresholds=HealthThresholds(window=3))
    alive = {**_dead_row(0), "D/grad_norm": 1.0, "Dmain/D_real": 0.8, "Dmain/D_fake": -0.7, "Dmain/loss": 0.9}
    assert monitor.check(1, alive) == []
    assert monitor.check(2, _dead_row(2)) == [] and monitor.check(3, _dead_row(3)) == []
    assert monitor.check(4, alive) == []  # a good row breaks the window
    assert monitor.check(5, _dead_row(5)) == [] and monitor.check(6, _dead_row(6)) == []
    [warning] = monitor.check(7, _dead_row(7))
    assert (warning.name, warning.step) == (DEAD_D, 7) and warning.message.startswith("step 7: the discriminator looks dead")
    assert all(monitor.check(s, _dead_row(s)) == [] for s in range(8, 12))  # once per run
