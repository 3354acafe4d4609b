"""SWD (ProGAN's sliced Wasserstein distance on Laplacian-pyramid patches): zero-ish for a set
against itself, growing with the strength of a corruption, deterministic for a seed, and the
pyramid levels for 1 or 3 channels at 32 and 64 px."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from distgan.metrics.swd import laplacian_pyramid, level_resolutions, swd, to_pixels


def smooth_images(n: int, channels: int = 3, res: int = 32, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] with structure at several scales: coarse random fields plus finer ones."""
    g = torch.Generator().manual_seed(seed)
    coarse = F.interpolate(torch.randn(n, channels, 4, 4, generator=g), size=res, mode="bicubic", align_corners=False)
    fine = F.interpolate(torch.randn(n, channels, res // 4, res // 4, generator=g), size=res, mode="bilinear",
                         align_corners=False)
    return torch.tanh(coarse + 0.5 * fine)


def blurred(images: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma == 0:
        return images
    x = torch.arange(-4, 5, dtype=torch.float32)
    k = torch.exp(-x**2 / (2 * sigma**2))
    k = k / k.sum()
    c = images.shape[1]
    out = F.conv2d(F.pad(images, (4, 4, 0, 0), mode="reflect"), k.view(1, 1, 1, 9).expand(c, 1, 1, 9), groups=c)
    return F.conv2d(F.pad(out, (0, 0, 4, 4), mode="reflect"), k.view(1, 1, 9, 1).expand(c, 1, 9, 1), groups=c)


def noised(images: torch.Tensor, sigma: float) -> torch.Tensor:
    return (images + sigma * torch.randn(images.shape, generator=torch.Generator().manual_seed(1))).clamp(-1, 1)


REAL = smooth_images(40)  # 5,120 patches a level: enough to rank, quick to sort


def test_same_set_is_near_zero_next_to_a_shifted_set():
    same = swd(REAL, REAL)["swd"]
    # Not 0: the two sides draw their patches at other positions (the floor of 40 images' sampling noise).
    shifted = swd(REAL, noised(smooth_images(40, seed=1), 0.5))["swd"]  # grainy: another distribution
    assert 0 <= same < 0.5 * shifted, (same, shifted)


@pytest.mark.parametrize("corrupt, strengths", [(blurred, [0, 0.7, 1.5, 3.0]), (noised, [0, 0.05, 0.2, 0.6])])
def test_worse_monotonically_with_the_corruption_strength(corrupt, strengths):
    scores = [swd(REAL, corrupt(REAL, s))["swd"] for s in strengths]
    assert scores == sorted(scores) and scores[-1] > 2 * scores[0], scores


def test_deterministic_for_a_seed():
    fake = noised(REAL, 0.1)
    assert swd(REAL, fake, seed=3) == swd(REAL, fake, seed=3)
    assert swd(REAL, fake, seed=3)["swd"] != swd(REAL, fake, seed=4)["swd"]  # the seed picks patches and directions
    # uint8 pixels and the [-1, 1] floats they come from are the same images
    assert swd(to_pixels(REAL), to_pixels(fake), seed=3) == swd(REAL, fake, seed=3)


@pytest.mark.parametrize("channels, res, levels", [(1, 32, [32, 16]), (3, 32, [32, 16]), (1, 64, [64, 32, 16]),
                                                   (3, 64, [64, 32, 16])])
def test_levels_and_channels(channels, res, levels):
    images = smooth_images(8, channels, res)
    pyramid = laplacian_pyramid(to_pixels(images), len(levels))
    assert [tuple(p.shape) for p in pyramid] == [(8, channels, r, r) for r in levels]
    out = swd(images, noised(images, 0.3))
    assert set(out) == {"swd"} | {f"swd_{r}" for r in levels}
    assert out["swd"] == pytest.approx(sum(out[f"swd_{r}"] for r in levels) / len(levels)) and out["swd"] > 0


def test_pyramid_reconstructs_the_image():
    """Laplacian details plus the upsampled coarse level give the image back (the pyramid is exact)."""
    images = to_pixels(smooth_images(4)).float()
    details, coarse = laplacian_pyramid(images, 2)
    up = torch.zeros_like(images)
    up[:, :, ::2, ::2] = coarse
    k = torch.outer(torch.tensor([1.0, 4, 6, 4, 1]), torch.tensor([1.0, 4, 6, 4, 1])) / 64
    up = F.conv2d(F.pad(up, (2, 2, 2, 2), mode="reflect"), k.expand(3, 1, 5, 5), groups=3)
    assert torch.allclose(details + up, images, atol=1e-3)


def test_small_and_mismatched_inputs():
    assert level_resolutions(16) == [16] and level_resolutions(8) == [8]
    with pytest.raises(ValueError, match="at least 7x7"):
        level_resolutions(4)
    with pytest.raises(ValueError, match="one shape"):
        swd(REAL, REAL[:, :1])
