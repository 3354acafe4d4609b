"""The objective's R3GAN terms against hand-written autograd: RpGAN + R1 + R2 in one D step,
the lazy R1/R2 phase, and the G phase that pairs fakes with reals; with a real StyleGAN2 D, that
the shared real+fake forward keeps minibatch statistics per set and that ADA counts the lazy R1
phase's reals. The phase handle here is
the smallest thing the objective calls (G, D, autocast, backward); distribution is tested with
real processes in tests/integration/test_distributed.py."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from distgan.config import load_config
from distgan.gan.ada import AdaptiveAugment
from distgan.gan.objective import GANObjective
from distgan.gan.phases import REAL_LAST, REAL_OWN, Schedule, build_phases
from distgan.models import build_models
from distgan.trainer import TrainerHooks
from tests.helpers import tiny_overrides
from tests.helpers.inprocess import train_in_process


class QuadraticD(torch.nn.Module):
    """D(x) = sum(w * x^2) + b per sample: grad_x D = 2 w x, known in closed form."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 4, 4, generator=torch.Generator().manual_seed(0)))
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, labels=None):
        return (self.w * x.square()).flatten(1).sum(1) + self.b


class Handle:
    def __init__(self, G, D):
        self.G, self.D = G, D

    def autocast(self):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()


class FixedNoise:
    def __init__(self, z):
        self.z = z

    def latents(self, n, z_dim, num_classes, device):
        return self.z[:n], None

    def uniform(self, shape, like):
        return torch.rand(shape)


def setup(*overrides):
    cfg = load_config(None, ["loss.objective=rpgan", "loss.diffaugment=", *overrides])
    z = torch.randn(5, 3 * 16, generator=torch.Generator().manual_seed(1))
    G = lambda z, c=None: z.view(-1, 3, 4, 4).tanh()  # noqa: E731  a parameter-free "generator"
    D = QuadraticD()
    objective = GANObjective(cfg.loss, 48, 0, 5, torch.device("cpu"), FixedNoise(z))
    objective.set_hyperparameters(cfg.loss.r1_gamma.at(0), cfg.loss.r2().at(0), 0.0)
    return cfg, objective, Handle(G, D), D, G(z)


def expected_d_grads(D, real, fake, r1, r2, adversarial=True, gain=1.0):
    D.zero_grad()
    w = D.w
    penalty = lambda x: (2 * w * x).square().flatten(1).sum(1).mean()  # noqa: E731  ||grad_x D||^2
    loss = r1 / 2 * penalty(real) + r2 / 2 * penalty(fake)
    if adversarial:
        loss = loss + F.softplus(D(fake) - D(real)).mean()
    (gain * loss).backward()
    return w.grad.clone()


def test_rpgan_with_r1_and_r2_in_the_d_step_matches_autograd():
    cfg, objective, h, D, fake = setup("loss.r1_gamma=0.7", "loss.r2_gamma=1.3", "loss.r1_interval=1")
    (dmain, gmain) = Schedule(build_phases(cfg)).phases[0], Schedule(build_phases(cfg)).phases[-1]
    assert dmain.terms == ("d_adv", "r1", "r2") and dmain.double_backward
    assert gmain.real == REAL_OWN and gmain.draws_reals  # R3GAN: G draws its own real batch
    real = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    stats = objective.accumulate_gradients(dmain, h, real, None, scale=1.0)
    got = D.w.grad.clone()
    want = expected_d_grads(D, real, fake, 0.7, 1.3)
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(stats["r1"], (2 * D.w * real).square().flatten(1).sum(1).detach(), atol=1e-5)
    assert torch.allclose(stats["r2"], (2 * D.w * fake).square().flatten(1).sum(1).detach(), atol=1e-5)


class CountBatches(TrainerHooks):
    def __init__(self):
        self.batches = 0

    def batch(self, trainer, images, labels):
        self.batches += 1


@pytest.mark.parametrize("g_reals", ["fresh", "reuse"])
def test_relativistic_g_step_draws_its_own_reals_not_counted_as_shown_to_d(g_reals, tiny_shards, tmp_path):
    """R3GAN's loop takes a D batch and a separate G batch each iteration and counts only the
    first in cur_nimg. `loss.g_reals=fresh` (the default) draws a third batch per generator step
    (2 D steps here), which the images-seen count and the logged kimg leave out; `reuse` draws none."""
    cfg = load_config(None, tiny_overrides(tiny_shards, tmp_path, "loss.objective=rpgan", "loss.r1_gamma=0.1",
                                           "loss.r1_interval=1", f"loss.g_reals={g_reals}", "train.steps=2",
                                           "train.log_every=2", "train.ckpt_every=2", "train.sample_every=2",
                                           "train.health_checks=false"))
    gmain = build_phases(cfg)[-1]
    assert gmain.real == (REAL_OWN if g_reals == "fresh" else REAL_LAST)
    hook = CountBatches()
    rows = train_in_process(cfg, [hook])
    assert hook.batches == 2 * (2 + (g_reals == "fresh"))  # steps x (D steps [+ G's own batch])
    assert rows[-1]["kimg"] == pytest.approx(2 * 2 * 8 / 1000)  # only D's reals count as images seen


def test_lazy_r1_r2_phase_matches_autograd_times_its_interval():
    cfg, objective, h, D, fake = setup("loss.r1_gamma=0.5", "loss.r1_interval=4")  # R2 defaults to R1 under rpgan
    phases = build_phases(cfg)
    dreg = next(p for p in phases if p.name == "Dreg")
    assert dreg.terms == ("r1", "r2") and dreg.interval == 4 and dreg.gain == 4.0
    real = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    objective.accumulate_gradients(dreg, h, real, None, scale=1.0)
    got = D.w.grad.clone()
    assert torch.allclose(got, expected_d_grads(D, real, fake, 0.5, 0.5, adversarial=False, gain=4.0), atol=1e-5)
    assert D.b.grad is None or D.b.grad == 0  # the penalties do not involve the bias


def test_r2_is_off_by_default_for_other_objectives():
    cfg = load_config(None, ["loss.objective=logistic", "loss.r1_gamma=1", "loss.r1_interval=1"])
    assert cfg.loss.penalties() == ("r1",) and build_phases(cfg)[0].terms == ("d_adv", "r1")
    cfg = load_config(None, ["loss.objective=logistic", "loss.r1_gamma=1", "loss.r2_gamma=0.5"])
    assert cfg.loss.penalties() == ("r1", "r2")


def test_relativistic_g_step_compares_each_fake_with_its_real():
    cfg, objective, h, D, fake = setup()
    gmain = build_phases(cfg)[-1]
    real = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    z = objective.noise.z.clone().requires_grad_(True)
    objective.noise.z = z  # the gradient into z stands in for G's parameters
    stats = objective.accumulate_gradients(gmain, h, real, None, scale=1.0)
    want = F.softplus(D(real) - D(z.view(-1, 3, 4, 4).tanh())).mean()
    assert stats["loss"].item() == pytest.approx(want.item(), abs=1e-6)
    (grad,) = torch.autograd.grad(want, z)
    assert torch.allclose(z.grad, grad, atol=1e-6)


class OneProcess:
    """The backend ADA's controller asks for, in one process (its all-reduce is the identity)."""

    device, world_size = torch.device("cpu"), 1

    def all_reduce_mean(self, tensor):
        return tensor


def stylegan2_setup(n, *overrides):
    """A real StyleGAN2 D (minibatch std groups of 4) behind the objective; n reals, n fakes."""
    cfg = load_config(None, ["model.arch=stylegan2", "data.resolution=16", "model.d_width=4", "model.g_width=4",
                             "model.z_dim=8", "model.mapping_layers=2", "model.mbstd_group=4", "loss.diffaugment=",
                             *overrides])
    torch.manual_seed(0)
    D = build_models(cfg.model, 16, 3, 0)[1]
    z = torch.randn(n, 3 * 16 * 16, generator=torch.Generator().manual_seed(1))
    G = lambda z, c=None: z.view(-1, 3, 16, 16).tanh()  # noqa: E731
    ada = AdaptiveAugment(OneProcess(), 0.0, 0.6, 500.0, 4, 1.0, n)
    objective = GANObjective(cfg.loss, 3 * 16 * 16, 0, n, torch.device("cpu"), FixedNoise(z), ada=ada)
    objective.set_hyperparameters(cfg.loss.r1_gamma.at(0), cfg.loss.r2().at(0), 0.0)
    real = torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return cfg, objective, Handle(G, D), D, real, G(z)


@pytest.mark.parametrize("n", [2, 4, 8])
def test_d_step_logits_equal_separate_forwards_of_reals_and_fakes(n):
    """Reals and fakes share one D forward, but D's minibatch-std groups stay within each, with
    min(mbstd_group, n) members: the logits are those of D(reals) and D(fakes) run alone (NVlabs).
    n=2 used to be one group of 2 reals and 2 fakes."""
    cfg, objective, h, D, real, fake = stylegan2_setup(n, "loss.objective=logistic", "loss.r1_gamma=1",
                                                       "loss.r1_interval=1")
    dmain = build_phases(cfg)[0]
    assert dmain.terms == ("d_adv", "r1")
    stats = objective.accumulate_gradients(dmain, h, real, None, scale=1.0)
    with torch.no_grad():
        assert torch.allclose(stats["D_real"], D(real), atol=1e-6)
        assert torch.allclose(stats["D_fake"], D(fake), atol=1e-6)


def test_relativistic_g_step_logits_equal_separate_forwards():
    cfg, objective, h, D, real, fake = stylegan2_setup(2, "loss.objective=rpgan", "loss.r1_gamma=1")
    stats = objective.accumulate_gradients(build_phases(cfg)[-1], h, real, None, scale=1.0)
    with torch.no_grad():
        assert torch.allclose(stats["D_real"], D(real), atol=1e-6)
        assert torch.allclose(stats["D_fake"], D(fake), atol=1e-6)


def test_ada_counts_the_lazy_r1_phases_real_logits():
    """NVlabs' r_t takes sign(D(real)) from the main D step and from the lazy R1 phase."""
    cfg, objective, h, D, real, _ = stylegan2_setup(4, "loss.objective=logistic", "loss.r1_gamma=1",
                                                    "loss.r1_interval=4")
    phases = {p.name: p for p in build_phases(cfg)}
    dmain, dreg = phases["Dmain"], phases["Dreg"]
    assert dreg.terms == ("r1",)
    objective.accumulate_gradients(dmain, h, real, None, scale=1.0)
    objective.accumulate_gradients(dreg, h, real, None, scale=1.0)
    with torch.no_grad():
        signs = D(real).sign().sum()
    assert torch.equal(objective.ada._sums, torch.stack([2 * signs, torch.tensor(8.0)]))
