"""Model registry and architectures: shapes, ranges, conditioning, batch independence, errors,
determinism, parameter budgets and double backward (R1)."""

from __future__ import annotations

import pytest
import torch

from distgan.config import ConfigError, ModelConfig, load_config
from distgan.models import ARCHS, build_models, register_arch
from distgan.models import registry
from distgan.models.layers import ConditionalBatchNorm2d, PlainNorm2d

RESOLUTIONS = (16, 32, 64, 128, 256)
Z = 16
N_CLASSES = 5


def tiny(arch: str, conditional: bool = False, g_norm: str = "batch") -> ModelConfig:
    return ModelConfig(arch=arch, z_dim=Z, g_width=8, d_width=8, conditional=conditional, g_norm=g_norm)


def build(arch, res=16, ch=3, conditional=False, g_norm="batch", seed=0, num_classes=N_CLASSES):
    torch.manual_seed(seed)
    return build_models(tiny(arch, conditional, g_norm), res, ch, num_classes)


def n_params(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def randomize_class_affines(g: torch.nn.Module) -> None:
    """Stand-in for training: CBN starts at gain 1 / bias 0 for every class (label-blind)."""
    gen = torch.Generator().manual_seed(123)
    with torch.no_grad():
        for m in g.modules():
            if isinstance(m, ConditionalBatchNorm2d):
                m.gain.weight.copy_(1 + 0.5 * torch.randn(m.gain.weight.shape, generator=gen))
                m.bias.weight.copy_(0.5 * torch.randn(m.bias.weight.shape, generator=gen))


def test_registry_lists_builtin_archs():
    assert "dcgan" in ARCHS and "resnet" in ARCHS


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("ch", [1, 3])
@pytest.mark.parametrize("res", RESOLUTIONS)
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_shapes_and_ranges(arch, res, ch, conditional):
    G, D = build(arch, res, ch, conditional)
    classes = N_CLASSES if conditional else 0
    assert (G.z_dim, G.resolution, G.channels, G.num_classes, D.num_classes) == (Z, res, ch, classes, classes)
    z = torch.randn(2, Z)
    y = torch.tensor([0, N_CLASSES - 1]) if conditional else None
    with torch.no_grad():
        x = G(z, y)
        assert x.shape == (2, ch, res, res) and x.dtype == torch.float32
        assert torch.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        assert x.std() > 1e-3  # not a constant image
        logits = D(x, y)
    assert logits.shape == (2,) and logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # D also takes a batch of one (a (N,) output, not a squeezed scalar).
    with torch.no_grad():
        assert D(x[:1], None if y is None else y[:1]).shape == (1,)


@pytest.mark.parametrize("g_norm", ["batch", "none"])
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_generator_uses_labels(arch, g_norm):
    G, D = build(arch, 32, 3, conditional=True, g_norm=g_norm)
    G.eval()  # running stats: the two samples below share z, batch stats would see zero variance
    z = torch.randn(1, Z).repeat(2, 1)
    y = torch.tensor([0, 3])
    with torch.no_grad():
        x0 = G(z, y)
        # Gain 1 / bias 0 init: an untrained conditional G ignores the label ...
        torch.testing.assert_close(x0[0], x0[1])
        randomize_class_affines(G)
        x = G(z, y)
        # ... and once the class embeddings differ, so do the images.
        assert (x[0] - x[1]).abs().max() > 1e-3
        # The projection D's class term is live from the start.
        logits = D(x[:1].repeat(2, 1, 1, 1), y)
    assert (logits[0] - logits[1]).abs() > 1e-6


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_conditional_needs_labels_and_unconditional_ignores_them(arch):
    Gc, Dc = build(arch, conditional=True)
    with pytest.raises(ValueError, match="needs labels"):
        Gc(torch.randn(2, Z))
    with pytest.raises(ValueError, match="needs labels"):
        Dc(torch.zeros(2, 3, 16, 16))
    G, D = build(arch, conditional=False, num_classes=N_CLASSES)
    assert G.num_classes == 0 and D.num_classes == 0
    G.eval()
    z, y = torch.randn(2, Z), torch.tensor([1, 2])
    with torch.no_grad():
        torch.testing.assert_close(G(z, y), G(z))
        x = G(z)
        torch.testing.assert_close(D.eval()(x, y), D(x))


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_g_norm_none_is_batch_independent(arch, conditional):
    z = torch.randn(4, Z)
    y = torch.tensor([0, 1, 2, 3]) if conditional else None
    G, _ = build(arch, 32, 3, conditional, g_norm="none")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in G.modules())
    G.train()  # the mode training uses; must not matter without batch statistics
    with torch.no_grad():
        full = G(z, y)
        alone = G(z[:1], None if y is None else y[:1])
        other = G(torch.cat([z[:1], torch.randn(3, Z)]), y)
    torch.testing.assert_close(alone[0], full[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(other[0], full[0], rtol=1e-5, atol=1e-6)
    # Control: with batch norm in train mode, sample 0 does depend on the rest of the batch.
    Gb, _ = build(arch, 32, 3, conditional, g_norm="batch")
    with torch.no_grad():
        assert (Gb(z, y)[0] - Gb(torch.cat([z[:1], torch.randn(3, Z)]), y)[0]).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_g_norm_none_starts_as_identity_affine(arch):
    for conditional in (False, True):
        G, _ = build(arch, conditional=conditional, g_norm="none")
        norms = [m for m in G.modules() if isinstance(m, (PlainNorm2d, ConditionalBatchNorm2d))]
        assert norms and all(m.bn is None for m in norms)
        for m in norms:
            gain = m.gain.weight if isinstance(m, ConditionalBatchNorm2d) else m.gain
            bias = m.bias.weight if isinstance(m, ConditionalBatchNorm2d) else m.bias
            assert torch.all(gain == 1) and torch.all(bias == 0)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_discriminator_is_per_sample(arch):
    _, D = build(arch, 32, 3, conditional=True)
    D.eval()  # eval: spectral norm's power iteration does not advance between the calls
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        torch.testing.assert_close(D(x[:1], y[:1]), D(x, y)[:1], rtol=1e-5, atol=1e-6)


def nvlabs_minibatch_std(x: torch.Tensor, group: int) -> torch.Tensor:
    """NVlabs' MinibatchStdLayer (one channel), written out: groups of strided samples."""
    n, c, h, w = x.shape
    y = x.reshape(group, -1, 1, c, h, w)
    y = (y - y.mean(dim=0)).square().mean(dim=0).add(1e-8).sqrt().mean(dim=[2, 3, 4])
    return torch.cat([x, y.reshape(-1, 1, 1, 1).repeat(group, 1, h, w)], dim=1)


def test_minibatch_std_layouts():
    """`strided` is NVlabs' grouping; `consecutive` splits across processes exactly: 2 ranks x 4
    samples give the statistics of 1 x 8 (the strided layout does not, which the world-size
    exactness tests avoid with model.mbstd_layout=consecutive)."""
    from distgan.models.stylegan2_layers import MinibatchStd

    x = torch.randn(8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(MinibatchStd(2, "strided")(x), nvlabs_minibatch_std(x, 2), rtol=0, atol=1e-6)
    for layout, exact in (("consecutive", True), ("strided", False)):
        layer = MinibatchStd(2, layout)
        split = torch.cat([layer(x[:4]), layer(x[4:])])
        assert torch.allclose(split, layer(x), atol=1e-6) == exact, layout
    with pytest.raises(ConfigError, match="model.mbstd_layout"):
        load_config(None, ["model.mbstd_layout=random"])


def test_stylegan2_d_class_map_depth_is_its_own():
    """NVlabs' conditional D maps labels through 8 layers whatever G's mapping depth."""
    cfg = load_config(None, ["model.arch=stylegan2", "model.mapping_layers=2", "model.conditional=true"]).model
    G, D = build_models(cfg, 16, 3, N_CLASSES)
    assert (len(G.mapping.layers), len(D.mapping.layers)) == (2, 8)
    _, D = build_models(load_config(None, ["model.arch=stylegan2", "model.conditional=true",
                                           "model.d_mapping_layers=3"]).model, 16, 3, N_CLASSES)
    assert len(D.mapping.layers) == 3


def test_unknown_arch_suggests_nearest():
    with pytest.raises(ConfigError, match="Did you mean 'dcgan'") as e:
        build_models(tiny("dcgn"), 32, 3, 0)
    assert "'dcgn'" in str(e.value) and "resnet" in str(e.value)
    with pytest.raises(ConfigError, match="Did you mean 'resnet'"):
        build_models(tiny("resnt"), 32, 3, 0)
    with pytest.raises(ConfigError, match="not a known architecture"):
        build_models(tiny("stylegan9000xl"), 32, 3, 0)


@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
@pytest.mark.parametrize("res", [8, 24, 48, 512, 0])
def test_bad_resolution(arch, res):
    with pytest.raises(ConfigError) as e:
        build_models(tiny(arch), res, 3, 0)
    msg = str(e.value)
    assert f"'{arch}'" in msg and f"resolution {res}" in msg and "16, 32, 64, 128, 256" in msg


@pytest.mark.parametrize("ch", [0, 2, 4])
def test_bad_channels(ch):
    with pytest.raises(ConfigError, match=r"data\.channels.*supported: 1, 3"):
        build_models(tiny("dcgan"), 32, ch, 0)


@pytest.mark.parametrize("num_classes", [0, 1])
def test_conditional_without_classes(num_classes):
    with pytest.raises(ConfigError, match="model.conditional=true needs labelled data") as e:
        build_models(tiny("resnet", conditional=True), 32, 3, num_classes)
    assert "model.conditional=false" in str(e.value)


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_same_seed_same_weights(arch, conditional):
    (G1, D1), (G2, D2), (G3, _) = (build(arch, 32, 3, conditional, seed=s) for s in (7, 7, 8))
    for a, b in ((G1, G2), (D1, D2)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:  # includes spectral norm's u/v vectors and BN running stats
            assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(v, G3.state_dict()[k]) for k, v in G1.state_dict().items())


def test_state_dict_roundtrip_with_spectral_norm():
    _, D1 = build("resnet", 32, 3, True, seed=1)
    _, D2 = build("resnet", 32, 3, True, seed=2)
    sd = D1.state_dict()
    assert any(k.endswith("parametrizations.weight.original") for k in sd)
    assert all(type(v) is torch.Tensor for v in sd.values())  # plain tensors, new SN API
    D2.load_state_dict(sd)
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        torch.testing.assert_close(D1.eval()(x, y), D2.eval()(x, y))


def test_init_schemes():
    G, D = build("dcgan", 64, 3, seed=0)
    w = torch.cat([m.weight.flatten() for m in D.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(w.std().item() - 0.02) < 0.002 and abs(w.mean().item()) < 0.002
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in D.modules())  # no BN in D (R1)
    _, Dr = build("resnet", 32, 3)
    sn = [m for m in Dr.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    assert sn and all(torch.nn.utils.parametrize.is_parametrized(m, "weight") for m in sn)


def test_default_param_counts():
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(arch="dcgan"), 32, 3, 0)  # z 128, width 64
    assert 0.5e6 < n_params(G) < 5e6 and 0.2e6 < n_params(D) < 5e6
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(arch="resnet"), 32, 3, 0)
    assert 1e6 < n_params(G) < 10e6 and 1e6 < n_params(D) < 10e6
    # Width caps keep 256 px models bounded.
    torch.manual_seed(0)
    G, D = build_models(ModelConfig(arch="dcgan"), 256, 3, 0)
    assert n_params(G) < 20e6 and n_params(D) < 20e6


@pytest.mark.parametrize("conditional", [False, True])
@pytest.mark.parametrize("arch", ["dcgan", "resnet"])
def test_double_backward_through_d(arch, conditional):
    """R1 needs d/dtheta of ||dD/dx||^2: double backward through every D layer incl. spectral norm."""
    G, D = build(arch, 32, 3, conditional)
    D.train()  # training mode: spectral norm runs its power iteration during the forward
    y = torch.tensor([0, 1]) if conditional else None
    x = G(torch.randn(2, Z), y).detach().requires_grad_(True)
    logits = D(x, y)
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    assert grad.shape == x.shape and grad.abs().sum() > 0
    penalty = grad.square().flatten(1).sum(1).mean()
    penalty.backward()
    # Every weight (spectral norm's `original` included) gets a nonzero gradient. Biases get
    # zero/None: the input gradient of a piecewise-linear net does not depend on them.
    weights = {n: p.grad for n, p in D.named_parameters() if not n.endswith("bias")}
    assert any("parametrizations.weight.original" in n for n in weights) == (arch == "resnet")
    for n, g in weights.items():
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0, n
    assert D.head.linear.bias.grad is None  # so a DDP R1-only backward must touch it (see report)


def test_register_custom_arch():
    name = "test-tiny-arch"

    @register_arch(name, resolutions=(32,))
    def _build(cfg, resolution, channels, num_classes):
        return torch.nn.Identity(), torch.nn.Identity()

    try:
        assert name in ARCHS
        G, D = build_models(tiny(name), 32, 3, 0)
        assert isinstance(G, torch.nn.Identity)
        with pytest.raises(ConfigError, match="supported resolutions: 32"):
            build_models(tiny(name), 64, 3, 0)
        with pytest.raises(ValueError, match="already registered"):
            register_arch(name)(_build)
    finally:
        registry._REGISTRY.pop(name, None)
        if name in ARCHS:
            ARCHS.remove(name)
