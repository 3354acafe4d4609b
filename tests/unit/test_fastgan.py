"""FastGAN generator (`model.arch=fastgan`): shapes and range at every resolution, conditioning,
determinism, the reference's size at the paper's width, spectral norm and init, gradients to every
parameter, batch independence under g_norm=none, and a short real training run."""

from __future__ import annotations

import math

import pytest
import torch
from torch.nn.utils import parametrize

from distgan.config import ModelConfig, load_config
from distgan.models import RESOLUTIONS, build_models
from distgan.models.dcgan import DCGANDiscriminator
from distgan.models.fastgan import CHANNEL_MULTIPLIERS, FastGANGenerator, fastgan_widths
from tests.helpers import tiny_overrides
from tests.helpers.gpu_suite import assert_finite_losses
from tests.helpers.inprocess import train_in_process

Z = 16
N_CLASSES = 5


def build(res=16, ch=3, conditional=False, g_norm="batch", seed=0, width=4, noise_mode="random"):
    cfg = ModelConfig(arch="fastgan", z_dim=Z, g_width=width, d_width=4, conditional=conditional, g_norm=g_norm,
                      noise_mode=noise_mode)
    torch.manual_seed(seed)
    return build_models(cfg, res, ch, N_CLASSES)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def reference_param_count(ngf: int, nz: int, nc: int) -> int:
    """Parameters of the FastGAN paper's generator at 256 px (odegeasslbc/FastGAN-pytorch models.py,
    as ported by Projected GAN), counted layer by layer from its layout. Spectral norm's u/v and BN's
    running statistics are buffers, not parameters."""
    nfc = {r: int(m * ngf) for r, m in CHANNEL_MULTIPLIERS.items()}

    def gated(cin: int, cout: int) -> int:  # 3x3 conv (no bias) to 2*cout, BN on 2*cout
        return cin * 2 * cout * 9 + 2 * 2 * cout

    def comp(cin: int, cout: int) -> int:  # UpBlockComp: two gated convs, two noise weights
        return gated(cin, cout) + gated(cout, cout) + 2

    def sle(cin: int, cout: int) -> int:  # 4x4 conv + 1x1 conv, no biases
        return cin * cout * 16 + cout * cout

    init = nz * 2 * nfc[4] * 16 + 2 * 2 * nfc[4]
    ups = (comp(nfc[4], nfc[8]) + gated(nfc[8], nfc[16]) + comp(nfc[16], nfc[32]) + gated(nfc[32], nfc[64])
           + comp(nfc[64], nfc[128]) + gated(nfc[128], nfc[256]))
    excitations = sle(nfc[4], nfc[64]) + sle(nfc[8], nfc[128]) + sle(nfc[16], nfc[256])
    to_big, to_128 = nfc[256] * nc * 9, nfc[128] * nc  # the original's output convs have no bias
    return init + ups + excitations + to_big + to_128


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("ch", [1, 3])
@pytest.mark.parametrize("res", RESOLUTIONS)
def test_shapes_and_range(res, ch, conditional):
    G, D = build(res, ch, conditional)
    classes = N_CLASSES if conditional else 0
    assert isinstance(G, FastGANGenerator) and isinstance(D, DCGANDiscriminator)
    assert (G.z_dim, G.resolution, G.channels, G.num_classes, D.num_classes) == (Z, res, ch, classes, classes)
    y = torch.tensor([0, N_CLASSES - 1]) if conditional else None
    with torch.no_grad():
        x = G(torch.randn(2, Z), y)
        assert x.shape == (2, ch, res, res) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1 and x.std() > 1e-3
        assert D(x, y).shape == (2,)
    # Skip-layer excitation wherever its 64/128/256 px target exists.
    assert sorted(map(int, G.excitations)) == [r for r in (64, 128, 256) if r <= res]


def test_channel_layout_follows_the_reference():
    assert fastgan_widths(256, 64) == {4: 1024, 8: 512, 16: 256, 32: 128, 64: 128, 128: 64, 256: 32}
    assert fastgan_widths(32, 128) == {4: 2048, 8: 1024, 16: 512, 32: 256}  # Projected GAN's ngf
    assert fastgan_widths(256, 1)[256] == 1  # never zero channels
    G, _ = build(64, width=8)
    # UpBlockComp (two convs) into 8 and 32 px, UpBlock (one) into 16 and 64 px.
    assert [len(up.convs) for up in G.ups] == [2, 1, 2, 1]
    assert [up.convs[0].conv.out_channels for up in G.ups] == [2 * 64, 2 * 32, 2 * 16, 2 * 16]


def test_conditional_labels_change_the_output_and_unconditional_ignores_them():
    G, _ = build(32, conditional=True)
    z = torch.randn(4, Z)
    with torch.no_grad():
        a = G(z, torch.tensor([0, 1, 2, 3]))
        b = G(z, torch.tensor([4, 4, 4, 4]))
    # Per-class gains start at N(1, 0.02) (the reference's BN init), so labels matter from step 0.
    assert (a - b).abs().max() > 1e-3
    with pytest.raises(ValueError, match="needs labels"):
        G(z)
    G, _ = build(32, conditional=False)
    G.noise_mode = "const"
    G.eval()  # eval: spectral norm's power iteration does not advance between the two calls
    with torch.no_grad():
        torch.testing.assert_close(G(z, torch.tensor([0, 1, 2, 3])), G(z))


def test_deterministic_under_manual_seed():
    (G1, D1), (G2, D2), (G3, _) = (build(64, conditional=True, seed=s) for s in (7, 7, 8))
    for a, b in ((G1, G2), (D1, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:  # includes spectral norm's u/v, BN running stats and the const noise images
            assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(v, G3.state_dict()[k]) for k, v in G1.state_dict().items())
    z, y = torch.randn(3, Z), torch.tensor([0, 1, 2])
    G1.eval(), G2.eval()
    with torch.no_grad():
        # Random noise comes from the global RNG: the same seed gives the same image ...
        torch.manual_seed(1)
        first = G1(z, y)
        torch.manual_seed(1)
        assert torch.equal(first, G2(z, y))
        # ... and noise_mode=const gives it whatever the RNG state.
        G1.noise_mode = G2.noise_mode = "const"
        assert torch.equal(G1(z, y), G2(z, y))
        for up in G1.ups:  # learned noise strengths (zero at init) made visible
            for conv in up.convs:
                if conv.noise is not None:
                    conv.noise.strength.fill_(0.5)
        assert not torch.equal(G1(z, y), G2(z, y))
        torch.manual_seed(1)
        G1.noise_mode = "random"
        assert not torch.equal(G1(z, y), G1(z, y))


def test_paper_width_matches_the_reference_parameter_count():
    reference = reference_param_count(ngf=64, nz=256, nc=3)
    assert reference == 29_127_846
    torch.manual_seed(0)
    G, _ = build_models(ModelConfig(arch="fastgan", z_dim=256, g_width=64), 256, 3, 0)
    # Ours has no auxiliary 128 px output (-64*3) and a bias on the image conv (+3, as Projected GAN).
    assert n_params(G) == reference - 64 * 3 + 3
    assert math.isclose(n_params(G), reference, rel_tol=1e-4)


def test_spectral_norm_on_every_conv_and_reference_init():
    G, _ = build(64, conditional=True, width=16)
    convs = [m for m in G.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d))]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    embeddings = [m for m in G.modules() if isinstance(m, torch.nn.Embedding)]
    assert embeddings and not any(parametrize.is_parametrized(m, "weight") for m in embeddings)
    w = G.ups[0].convs[0].conv.parametrizations.weight.original  # 256 -> 256 channels, 3x3
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    gains = torch.cat([m.gain.weight.flatten() for m in G.modules() if hasattr(m, "gain")])
    assert abs(gains.mean().item() - 1) < 0.005 and 0.015 < gains.std().item() < 0.025


def test_a_gradient_reaches_every_parameter():
    G, D = build(256, conditional=True, width=2)  # every up block and all three excitations
    y = torch.tensor([0, 3])
    D(G(torch.randn(2, Z), y), y).sum().backward()
    for name, p in G.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("conditional", [False, True])
def test_g_norm_none_is_batch_independent(conditional):
    G, _ = build(64, conditional=conditional, g_norm="none", noise_mode="const")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    G.eval()  # only stops spectral norm's power iteration between the calls: no batch statistics left
    z = torch.randn(4, Z)
    y = torch.tensor([0, 1, 2, 3]) if conditional else None
    with torch.no_grad():
        full = G(z, y)
        alone = G(z[:1], None if y is None else y[:1])
    torch.testing.assert_close(alone[0], full[0], rtol=1e-5, atol=1e-6)
    # Control: with batch norm in train mode, sample 0 does depend on the rest of the batch.
    Gb, _ = build(64, conditional=conditional, g_norm="batch", noise_mode="const")
    with torch.no_grad():
        assert (Gb(z, y)[0] - Gb(torch.cat([z[:1], torch.randn(3, Z)]), y)[0]).abs().max() > 1e-3


def test_short_conditional_training_run(tiny_shards, tmp_path):
    """Through the real trainer: labelled tiny shards, the fastgan G and its DCGAN D, 6 steps."""
    cfg = load_config(None, tiny_overrides(tiny_shards, tmp_path / "run", "model.arch=fastgan", "model.g_width=4",
                                           "model.conditional=true", "train.log_every=1"))
    rows = train_in_process(cfg)
    assert_finite_losses(rows, 6, "fastgan")
    assert (tmp_path / "run" / "samples").is_dir() and any((tmp_path / "run" / "samples").iterdir())


def test_runs_under_bf16_autocast_and_in_bf16():
    G, D = build(64, conditional=True)
    z, y = torch.randn(2, Z), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(D(G(z, y), y).float()).all()
    G = G.to(torch.bfloat16)
    x = G(z.bfloat16(), y)
    assert x.dtype == torch.bfloat16 and x.shape == (2, 3, 64, 64) and torch.isfinite(x.float()).all()
