"""R3GAN networks: shapes for every variant, the fix-up initialization, resampling, bf16."""

import pytest
import torch

from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.models import build_models
from distgan.models.r3gan import Downsample, ResidualBlock, Upsample, preset_lowp_stages, stage_widths


def models(resolution=16, channels=3, classes=0, *extra):
    cfg = load_config(None, ["model.arch=r3gan", f"data.resolution={resolution}", f"data.channels={channels}",
                             "model.g_width=4", "model.d_width=4", "model.z_dim=8", "model.group_size=4",
                             f"model.conditional={str(classes > 0).lower()}", *extra])
    torch.manual_seed(0)
    return build_models(cfg.model, resolution, channels, classes)


@pytest.mark.parametrize("resolution", [16, 32, 64, 128])
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("classes", [0, 5])
def test_shapes_for_every_variant(resolution, channels, classes):
    G, D = models(resolution, channels, classes)
    z = torch.randn(3, 8)
    labels = torch.tensor([0, 4, 2]) if classes else None
    images = G(z, labels)
    assert images.shape == (3, channels, resolution, resolution)
    logits = D(images, labels)
    assert logits.shape == (3,) and torch.isfinite(logits).all()
    assert G.num_classes == D.num_classes == classes and G.z_dim == 8


def test_widths_derived_and_explicit():
    assert stage_widths(32, 16) == [128, 128, 64, 32, 16][1:]  # 4, 8, 16, 32: min(8, R/r) x 16
    assert stage_widths(64, 8) == [64, 64, 32, 16, 8]
    G, D = models(32, 3, 0, "model.widths=[12,8,8,4]", "model.blocks_per_stage=1")
    assert G.basis.shape == (12, 4, 4) and D.from_image.weight.shape[0] == 4
    with pytest.raises(ConfigError, match="needs 4 widths"):
        load_config(None, ["model.arch=r3gan", "data.resolution=32", "model.widths=[8,8]"])


def test_a_fresh_residual_branch_outputs_zero():
    block = ResidualBlock(channels=8, expansion=2, group_size=4, total_blocks=6)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(block.branch(x), torch.zeros_like(x))
    assert torch.equal(block(x), x)  # so a fresh network is a chain of resamplings and 1x1 convs
    # ... and the other convs start random, with a gain that shrinks as the network deepens.
    deep = ResidualBlock(channels=8, expansion=2, group_size=4, total_blocks=64)
    assert block.widen.weight.std() > 1.5 * deep.widen.weight.std()
    assert block.grouped.groups == 4  # 16 widened channels in groups of 4


def test_no_normalization_layers_and_samples_independent():
    G, D = models(16)
    assert not any(isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm, torch.nn.LayerNorm))
                   for m in [*G.modules(), *D.modules()])
    x = torch.randn(4, 3, 16, 16)
    assert torch.allclose(D(x)[:2], D(x[:2]), atol=1e-5)  # per-sample logits: R1/R2 are per-sample


TAPS = (1.0, 3.0, 3.0, 1.0)  # R3GAN's [1,2,1] convolved with [1,1] (R3GAN/Resamplers.py, CreateLowpassKernel)


def upfirdn2d_loop(x, up, down, pad0, pad1, gain):
    """upfirdn2d's definition, written out pixel by pixel in float64: insert up-1 zeros after each
    pixel, pad with pad0/pad1 zeros before/after, correlate with the normalized outer product of
    TAPS times `gain` (symmetric, so convolution alike), keep every down-th pixel."""
    kernel = [[a * b * gain / 64 for b in TAPS] for a in TAPS]
    n, c, h, w = x.shape
    grid = torch.zeros(n, c, h * up + pad0 + pad1, w * up + pad0 + pad1, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            grid[:, :, pad0 + i * up, pad0 + j * up] = x[:, :, i, j].double()
    out = torch.zeros(n, c, (grid.shape[2] - 3 + down - 1) // down, (grid.shape[3] - 3 + down - 1) // down,
                      dtype=torch.float64)
    for oi in range(out.shape[2]):
        for oj in range(out.shape[3]):
            for ki in range(4):
                for kj in range(4):
                    out[:, :, oi, oj] += kernel[ki][kj] * grid[:, :, oi * down + ki, oj * down + kj]
    return out


def test_resampling_equals_upfirdn2d_with_zero_padding_at_every_pixel():
    """R3GAN's `upsample2d(x, f)` is upfirdn2d with up=2, padding (2, 1), gain 4; `downsample2d`
    is down=2, padding (1, 1) (R3GAN/torch_utils/ops/upfirdn2d.py). Zeros beyond the image: the
    border differs from clamped/replicated edges, so every pixel is compared, border included."""
    x = torch.randn(2, 3, 5, 6, generator=torch.Generator().manual_seed(0))
    up, down = Upsample(3, 3), Downsample(3, 3)
    expected_up = upfirdn2d_loop(x, up=2, down=1, pad0=2, pad1=1, gain=4).float()
    assert expected_up.shape == (2, 3, 10, 12)
    torch.testing.assert_close(up(x), expected_up, atol=1e-6, rtol=0)
    x = torch.randn(2, 3, 8, 6, generator=torch.Generator().manual_seed(1))
    expected_down = upfirdn2d_loop(x, up=1, down=2, pad0=1, pad1=1, gain=1).float()
    assert expected_down.shape == (2, 3, 4, 3)
    torch.testing.assert_close(down(x), expected_down, atol=1e-6, rtol=0)


def test_resampling_keeps_constant_images_inside_and_darkens_the_zero_padded_border():
    x = torch.full((2, 3, 8, 8), 0.7)
    up, down = Upsample(3, 3), Downsample(3, 3)
    assert up(x).shape == (2, 3, 16, 16) and down(x).shape == (2, 3, 4, 4)
    # [1,2,1]-filtered: a constant image stays constant away from the border ...
    assert torch.allclose(up(x)[..., 1:-1, 1:-1], torch.full((2, 3, 14, 14), 0.7), atol=1e-6)
    assert torch.allclose(down(x)[..., 1:-1, 1:-1], torch.full((2, 3, 2, 2), 0.7), atol=1e-6)
    # ... and the zeros beyond it weigh 1/4 (up) or 1/8 (down) on each border row/column.
    border_up = torch.tensor([0.75] + [1.0] * 14 + [0.75])
    torch.testing.assert_close(up(x)[0, 0], 0.7 * border_up.outer(border_up))
    border_down = torch.tensor([0.875, 1.0, 1.0, 0.875])
    torch.testing.assert_close(down(x)[0, 0], 0.7 * border_down.outer(border_down))


def test_runs_in_bf16_and_under_autocast():
    G, D = models(16, 3, 5)
    z, labels = torch.randn(2, 8), torch.tensor([1, 3])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(D(G(z, labels), labels).float()).all()
    G, D = G.to(torch.bfloat16), D.to(torch.bfloat16)
    out = D(G(z.bfloat16(), labels), labels)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def stage_dtypes(net, run):
    """Output dtype of each stage of `net` (forward hooks) while `run()` executes."""
    seen = {}
    hooks = [stage.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.dtype))
             for k, stage in enumerate(net.stages)]
    try:
        out = run()
    finally:
        for h in hooks:
            h.remove()
    return [seen[k] for k in range(len(net.stages))], out


@pytest.mark.parametrize("lowp, g_expected", [(-1, "fbb"), (0, "bbb"), (1, "ffb"), (3, "bbb")])
def test_bf16_runs_only_the_highest_resolution_stages_low(lowp, g_expected):
    """R3GAN's FP16Stages: under bf16 autocast G's low-resolution stages (the basis with them) and
    D's low-resolution stages (its head with them) stay fp32; default (-1): its presets, min(4, N-1)."""
    G, D = models(16, 3, 5, f"model.lowp_stages={lowp}")
    z, labels = torch.randn(2, 8), torch.tensor([1, 3])
    as_dtype = {"f": torch.float32, "b": torch.bfloat16}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        g_dtypes, images = stage_dtypes(G, lambda: G(z, labels))
        x = images.detach().float().requires_grad_(True)
        d_dtypes, logits = stage_dtypes(D, lambda: D(x, labels))
    assert g_dtypes == [as_dtype[c] for c in g_expected]
    assert d_dtypes == [as_dtype[c] for c in reversed(g_expected)]  # D mirrors G: highest resolution first
    assert images.dtype == g_dtypes[-1]  # G's 1x1 to-image conv follows its last stage, as R3GAN
    assert logits.dtype == d_dtypes[-1]
    # R1 as the loss takes it (double backward through the same per-stage dtypes) stays finite.
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    grad.square().sum().backward()
    assert grad.dtype == torch.float32 and torch.isfinite(grad).all()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


def test_bf16_default_stays_close_to_fp32_and_no_autocast_is_fp32():
    G, D = models(32, 3, 0)
    z = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = G(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = G(z).float()
    assert full.dtype == torch.float32
    # Measured here: 1.0% of the largest pixel (bf16 keeps 8 mantissa bits: 0.4% per rounding).
    assert (half - full).abs().max() <= 0.03 * full.abs().max()


def test_default_lowp_stages_are_r3gans_presets():
    """brownvc/R3GAN train.py: FP16Stages [-1,-2,-3] for CIFAR10 and ImageNet-32 (4 stages),
    [-1..-4] for FFHQ-64 and ImageNet-64 (5) and FFHQ-256 (7); D's mirror G's."""
    assert [preset_lowp_stages(n) for n in (4, 5, 7)] == [3, 4, 4]
    G, D = models(256, 3, 0)  # 7 stages: 4x4, 8x8 and 16x16 stay fp32 in both
    assert G.fp32_stages == [True] * 3 + [False] * 4 and D.fp32_stages == [False] * 4 + [True] * 3
