"""EMA generator: the StyleGAN2-ADA beta schedule and the exact update arithmetic."""

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from distgan.config import load_config
from distgan.gan.ema import EMA, ema_beta, make_ema, update_ema
from distgan.trainer import Trainer
from tests.helpers import tiny_overrides
from tests.helpers.inprocess import build_trainer


def test_beta_formula():
    # 0.5 ** (batch / halflife_nimg)
    assert ema_beta(32, 10.0, None, 10**6) == pytest.approx(0.9977843871238888, rel=1e-12)
    assert ema_beta(64, 2.0, None, 0) == pytest.approx(0.9780634734473393, rel=1e-12)
    # Ramp-up caps the half-life at cur_nimg * rampup: 100k * 0.05 = 5k < 10k.
    assert ema_beta(32, 10.0, 0.05, 100_000) == pytest.approx(0.9955736831881946, rel=1e-12)
    # ...and stops mattering once cur_nimg * rampup exceeds the half-life.
    assert ema_beta(32, 10.0, 0.05, 10**6) == ema_beta(32, 10.0, None, 10**6)
    assert ema_beta(32, 10.0, 0.0, 0) == ema_beta(32, 10.0, None, 0)
    # At the very start the EMA simply copies G.
    assert ema_beta(32, 10.0, 0.05, 0) == 0.0


def test_halflife_zero_makes_the_ema_a_copy():
    """`optim.ema_halflife_kimg: 0` ("0: the EMA copies G"; R3GAN's schedules start there): beta 0,
    the limit of 0.5 ** (batch / halflife), not 1 (which would freeze the EMA at its initial copy)."""
    assert ema_beta(32, 0.0, 0.05, 5000) == 0.0
    assert ema_beta(32, 0.0, None, 5000) == 0.0
    model = nn.Linear(3, 2)
    ema = EMA(model, halflife_kimg=0.0, rampup=None)
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model, 32, 5000)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ema.module.parameters()))


def started_trainer(tiny_shards, tmp_path, *overrides: str) -> Trainer:
    """A real single-process trainer on the tiny shards, started (call `finish` when done)."""
    trainer = build_trainer(load_config(None, tiny_overrides(tiny_shards, tmp_path, *overrides)))
    trainer.start()
    return trainer


def test_the_first_training_step_leaves_the_ema_a_copy_of_g(tiny_shards, tmp_path):
    """The ramp-up caps the half-life at `ema_rampup` x the images seen BEFORE the step (NVlabs'
    cur_nimg): after the first step beta is 0 and the EMA equals G exactly (counting the step's
    own images gave beta = 0.5 ** 10 with the two D steps of the tiny config)."""
    trainer = started_trainer(tiny_shards, tmp_path, "optim.ema_rampup=0.05", "optim.ema_halflife_kimg=10",
                              "train.steps=1")
    try:
        trainer.train_step()
    finally:
        trainer.finish("failed")
        trainer.backend.close()
    G = trainer.backend.module("G")
    assert trainer.state.nimg > 0
    assert all(torch.equal(a, b) for a, b in zip(G.parameters(), trainer.ema.module.parameters()))


def test_ema_beta_sequence_of_the_first_steps_follows_nvlabs(tiny_shards, tmp_path):
    """NVlabs (training_loop.py): ema_nimg = min(ema_kimg * 1000, cur_nimg * ema_rampup) with
    cur_nimg BEFORE the step's increment, beta = 0.5 ** (batch_size / max(ema_nimg, 1e-8)), and
    batch_size the images the step trained on. With two D steps per generator step that is both
    D steps' reals (16 here): beta per step, written out from the formula, must take the EMA from
    one step's weights to the next. (A ramp-up of 10 keeps beta far from 0 and 1, so a one-step
    lag or a one-D-step batch would show.)"""
    trainer = started_trainer(tiny_shards, tmp_path, "optim.ema_rampup=10", "optim.ema_halflife_kimg=10",
                              "train.steps=4")
    snapshots = []  # (images before the step, images after, G's weights, the EMA's weights) per step
    try:
        for _ in range(4):
            before = trainer.state.nimg
            trainer.train_step()
            copy = lambda m: [p.detach().clone() for p in m.parameters()]  # noqa: E731
            snapshots.append((before, trainer.state.nimg, copy(trainer.backend.module("G")), copy(trainer.ema.module)))
    finally:
        trainer.finish("failed")
        trainer.backend.close()
    assert [s[1] - s[0] for s in snapshots] == [16] * 4  # batch 8 x 2 D steps
    ema = snapshots[0][3]
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0][2], ema))  # step 0: cur_nimg 0, beta 0: a copy
    for cur_nimg, after, G, expected in snapshots[1:]:
        beta = 0.5 ** ((after - cur_nimg) / max(min(10 * 1000, cur_nimg * 10), 1e-8))
        assert 0.9 < beta < 0.98
        ema = [e.lerp(g, 1 - beta) for e, g in zip(ema, G)]
        for a, b in zip(expected, ema):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_make_ema_is_frozen_independent_copy():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    ema = make_ema(model)
    assert not ema.training and model.training
    assert all(not p.requires_grad for p in ema.parameters())
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert not torch.equal(ema[0].weight, model[0].weight)


def test_update_is_exact_lerp():
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    ema = make_ema(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    old = {k: v.clone() for k, v in ema.state_dict().items()}
    beta = 0.9
    update_ema(ema, model, beta)
    for name, p in model.named_parameters():
        assert torch.equal(ema.get_parameter(name), torch.lerp(old[name], p.detach(), 1 - beta))
        assert torch.allclose(ema.get_parameter(name), p.detach() + (old[name] - p.detach()) * beta, atol=1e-6)
    update_ema(ema, model, 0.0)
    assert all(torch.equal(a, b) for a, b in zip(ema.parameters(), model.parameters()))


def test_buffers_are_copied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    ema = make_ema(model)
    model(torch.randn(16, 3) * 3 + 1)  # train-mode forward updates the running stats
    update_ema(ema, model, 0.99)
    bn, ema_bn = model[1], ema[1]
    assert torch.equal(ema_bn.running_mean, bn.running_mean)
    assert torch.equal(ema_bn.running_var, bn.running_var)
    assert ema_bn.num_batches_tracked.item() == 1


def test_spectral_norm_parametrization():
    torch.manual_seed(0)
    model = nn.Sequential(spectral_norm(nn.Linear(5, 4)), nn.ReLU(), spectral_norm(nn.Linear(4, 1)))
    ema = make_ema(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.randn(8, 5)).sum().backward()  # also runs a power iteration (u, v change)
    opt.step()
    old = ema[0].parametrizations.weight.original.clone()
    orig = model[0].parametrizations.weight.original.detach()
    update_ema(ema, model, 0.5)
    assert torch.equal(ema[0].parametrizations.weight.original, orig + (old - orig) * 0.5)
    assert torch.equal(ema[0].parametrizations.weight[0]._u, model[0].parametrizations.weight[0]._u)
    update_ema(ema, model, 0.0)  # an exact copy computes exactly what the model does
    x = torch.randn(3, 5)
    model.eval()
    with torch.no_grad():
        assert torch.equal(ema(x), model(x))


class _Wrapper(nn.Module):  # stands in for DDP, which stores the net as .module
    def __init__(self, module):
        super().__init__()
        self.module = module


def test_wrapped_model_matched_by_name_and_mismatch_raises():
    model = nn.Linear(2, 2)
    ema = make_ema(model)
    with torch.no_grad():
        model.weight.fill_(1.0)
    update_ema(ema, _Wrapper(model), 0.0)
    assert torch.equal(ema.weight, model.weight)
    with pytest.raises(KeyError, match="weight"):
        update_ema(make_ema(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2)), 0.5)
