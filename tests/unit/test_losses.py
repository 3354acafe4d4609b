"""GAN objectives and regularizers checked against hand-computed values and analytic gradients."""

import math

import pytest
import torch

from distgan.gan.losses import OBJECTIVES, d_loss, g_loss, gradient_penalty, r1_penalty
from distgan.gan.phases import lazy_reg_adam_params


def t(*values):
    return torch.tensor(values, dtype=torch.float32)


# (objective, real logits, fake logits, expected D loss, expected G loss), worked out by hand:
#  logistic: D = mean softplus(-r) + mean softplus(f); softplus(0)=ln 2=0.693147, softplus(-2)=0.126928,
#            softplus(-1)=0.313262, softplus(1)=1.313262 -> (0.693147+0.126928)/2 + (0.693147+0.313262)/2
#            G = mean softplus(-f) = (0.693147 + 1.313262)/2
#  hinge:    relu(1-r) = [0.5, 0, 2] -> 2.5/3; relu(1+f) = [0, 1.5, 1] -> 2.5/3; G = -mean f = 0.5
#  wgan-gp:  mean f - mean r = 0.5 - 2 = -1.5; G = -0.5
#  lsgan:    (r-1)^2 = [1, 0.25] -> 0.625; f^2 = [0.25, 1] -> 0.625; D = 0.5*1.25; G = 0.5*mean([0.25, 4])
#  rpgan:    pairs (r_i, f_i) = (1, 0), (-1, 1): D = mean softplus(f - r) = (softplus(-1) + softplus(2))/2
#            = (0.313262 + 2.126928)/2; G = mean softplus(r - f) = (softplus(1) + softplus(-2))/2
#            = (1.313262 + 0.126928)/2
CASES = [
    ("logistic", t(0.0, 2.0), t(0.0, -1.0), 0.913242029840543, 1.003204434039084),
    ("hinge", t(0.5, 2.0, -1.0), t(-2.0, 0.5, 0.0), 5.0 / 3.0, 0.5),
    ("wgan-gp", t(1.0, 3.0), t(-1.0, 2.0), -1.5, -0.5),
    ("lsgan", t(2.0, 0.5), t(0.5, -1.0), 0.625, 1.0625),
    ("rpgan", t(1.0, -1.0), t(0.0, 1.0), 1.2200948, 0.7200948),
]


@pytest.mark.parametrize("objective,real,fake,d_expected,g_expected", CASES, ids=[c[0] for c in CASES])
def test_objectives_match_hand_values(objective, real, fake, d_expected, g_expected):
    d, g = d_loss(objective, real, fake), g_loss(objective, fake, real)
    assert d.shape == () and g.shape == ()
    assert d.item() == pytest.approx(d_expected, abs=1e-6)
    assert g.item() == pytest.approx(g_expected, abs=1e-6)
    # (N, 1) logits, as most discriminators return, give the same value.
    assert d_loss(objective, real[:, None], fake[:, None]).item() == pytest.approx(d_expected, abs=1e-6)


def test_objectives_cover_config_choices():
    from distgan.config import rule_of

    assert set(OBJECTIVES) == set(rule_of("loss.objective").choices)


@pytest.mark.parametrize("objective", OBJECTIVES)
def test_low_precision_logits_reduce_in_fp32(objective):
    real, fake = torch.randn(64).bfloat16(), torch.randn(64).bfloat16()
    d, g = d_loss(objective, real, fake), g_loss(objective, fake, real)
    assert d.dtype == torch.float32 and g.dtype == torch.float32
    assert d.item() == pytest.approx(d_loss(objective, real.float(), fake.float()).item(), abs=1e-6)


def test_unknown_objective_is_named():
    with pytest.raises(ValueError, match="wasserstein"):
        d_loss("wasserstein", t(0.0), t(0.0))
    with pytest.raises(ValueError, match="wasserstein"):
        g_loss("wasserstein", t(0.0))


def test_rpgan_pairs_fakes_with_reals():
    # Relativistic: shifting both logits by the same amount changes nothing, and G needs reals.
    real, fake = torch.randn(8), torch.randn(8)
    assert d_loss("rpgan", real + 5, fake + 5).item() == pytest.approx(d_loss("rpgan", real, fake).item(), abs=1e-5)
    assert g_loss("rpgan", fake - 3, real - 3).item() == pytest.approx(g_loss("rpgan", fake, real).item(), abs=1e-5)
    with pytest.raises(ValueError, match="pairs each fake with a real"):
        g_loss("rpgan", fake)
    with pytest.raises(ValueError, match="pairs each fake with a real"):
        g_loss("rpgan", fake, real[:4])


def test_losses_backpropagate_to_logits():
    fake = t(0.0, 1.0).requires_grad_(True)
    g_loss("logistic", fake).backward()
    # d/df mean softplus(-f) = -sigmoid(-f)/N
    assert torch.allclose(fake.grad, -torch.sigmoid(-fake.detach()) / 2)


def test_r1_matches_analytic_gradient_and_double_backward():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4, requires_grad=True)
    x = torch.randn(5, 3, 4, 4).requires_grad_(True)

    def D(images):  # D(x) = sum(w * x^2): dD/dx = 2 w x, so R1_i = sum(4 w^2 x_i^2)
        return (w * images.square()).flatten(1).sum(1)

    penalty = r1_penalty(D(x), x)
    expected = (4 * w.detach().square() * x.detach().square()).flatten(1).sum(1)
    assert penalty.shape == (5,)
    assert torch.allclose(penalty, expected, rtol=1e-5)
    # The graph is kept: d/dw sum_i R1_i = sum_i 8 w x_i^2.
    (grad_w,) = torch.autograd.grad(penalty.sum(), w)
    assert torch.allclose(grad_w, 8 * w.detach() * x.detach().square().sum(0), rtol=1e-5)


def test_r1_linear_discriminator():
    w = torch.randn(2, 8, 8, requires_grad=True)
    x = torch.randn(4, 2, 8, 8).requires_grad_(True)
    penalty = r1_penalty((x * w).flatten(1).sum(1, keepdim=True), x)
    assert torch.allclose(penalty, w.detach().square().sum().expand(4), rtol=1e-5)


def test_gradient_penalty_linear_critic_is_exact():
    w = torch.randn(3, 4, 4, requires_grad=True)
    real, fake = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    gp = gradient_penalty(lambda x: (x * w).flatten(1).sum(1), real, fake)
    norm = w.detach().norm()
    assert gp.item() == pytest.approx(((norm - 1) ** 2).item(), rel=1e-5)
    # create_graph=True: d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    (grad_w,) = torch.autograd.grad(gp, w)
    assert torch.allclose(grad_w, 2 * (norm - 1) * w.detach() / norm, rtol=1e-4, atol=1e-6)


def test_gradient_penalty_quadratic_critic_analytic():
    # With real == fake the interpolate is x itself whatever alpha is: grad = 2 w x.
    w = torch.rand(3, 4, 4) + 0.1
    x = torch.randn(5, 3, 4, 4)
    gp = gradient_penalty(lambda v: (w * v.square()).flatten(1).sum(1), x, x.clone())
    norms = (2 * w * x).flatten(1).norm(dim=1)
    assert gp.item() == pytest.approx(((norms - 1) ** 2).mean().item(), rel=1e-5)


def test_gradient_penalty_deterministic_given_generator():
    w = torch.rand(1, 8, 8)
    real, fake = torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)

    def D(v):
        return (w * v.square()).flatten(1).sum(1)

    runs = [gradient_penalty(D, real, fake, generator=torch.Generator().manual_seed(s)).item() for s in (3, 3, 4)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_gradient_penalty_does_not_reach_generator():
    z = torch.randn(4, 1, 4, 4, requires_grad=True)
    fake = z * 2  # stands in for G(z)
    gp = gradient_penalty(lambda v: v.square().flatten(1).sum(1), torch.randn(4, 1, 4, 4), fake)
    gp.backward()
    assert z.grad is None


def test_lazy_reg_adam_params():
    c = 16 / 17
    lr, betas = lazy_reg_adam_params(2e-4, (0.5, 0.999), 16)
    assert lr == pytest.approx(0.00018823529411764707, rel=1e-12)
    assert betas == pytest.approx((0.5208080053252919, 0.9990587958379759), rel=1e-12)
    # StyleGAN2's settings: lr 0.0025, betas (0, 0.99).
    lr, betas = lazy_reg_adam_params(0.0025, (0.0, 0.99), 16)
    assert lr == pytest.approx(0.0025 * c) and betas == pytest.approx((0.0, 0.9905854573074332), rel=1e-12)
    assert lazy_reg_adam_params(1e-3, (0.5, 0.9), 0) == (1e-3, (0.5, 0.9))
    assert math.isclose(lazy_reg_adam_params(1e-3, (0.5, 0.9), 1)[0], 5e-4)


def test_fake_labels_follow_a_skewed_datasets_class_frequencies(tmp_path):
    """NVlabs draws each fake's label from the training set (`get_label(randint(len))`). A stream
    has no random access, so `distgan shards` records the samples per class in dataset.json and
    `loss.fake_labels=data` (the default) samples labels from those counts on the device
    (torch.multinomial: no host sync, watched here with test_host_syncs' watch); `uniform` keeps
    all classes alike."""
    from distgan.config import load_config
    from distgan.data import build_stream
    from distgan.data.shards import write_shards
    from distgan.gan.objective import GANObjective
    from tests.helpers import make_image_folder
    from tests.unit.test_host_syncs import HostSyncWatch

    counts = {"common": 24, "rare": 2, "some": 6}  # folder names: sorted, they are the class order
    for name, n in counts.items():
        make_image_folder(tmp_path / "images", n_per_class=n, classes=(name,))
    write_shards(str(tmp_path / "images"), tmp_path / "shards", resolution=16, channels=3, crop="none",
                 shard_size=16, workers=1, progress=False)
    frequencies = {}
    for mode in ("data", "uniform"):
        cfg = load_config(None, [f"data.source={tmp_path / 'shards'}", "data.resolution=16",
                                 f"loss.fake_labels={mode}"])
        info = build_stream(cfg.data, 0, 0, 1).info
        assert info.class_names == sorted(counts) and info.class_counts == [counts[c] for c in info.class_names]
        objective = GANObjective(cfg.loss, 4, info.num_classes, 8, torch.device("cpu"), class_counts=info.class_counts)
        torch.manual_seed(0)
        with HostSyncWatch() as watch:
            _, labels = objective.latents(20000)
        assert not watch.syncs, [str(s) for s in watch.syncs]
        frequencies[mode] = torch.bincount(labels, minlength=3).double() / labels.numel()
    expected = torch.tensor([counts[c] for c in sorted(counts)], dtype=torch.float64) / sum(counts.values())
    torch.testing.assert_close(frequencies["data"], expected, atol=0.01, rtol=0)  # ~3 sigma at n=20000
    torch.testing.assert_close(frequencies["uniform"], torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.015, rtol=0)
