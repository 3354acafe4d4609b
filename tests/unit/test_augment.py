"""DiffAugment: shapes, determinism, differentiability and the exact geometry of each op."""

import pytest
import torch

from distgan.gan.augment import (POLICIES, diff_augment, rand_brightness, rand_contrast, rand_cutout,
                                 rand_saturation, rand_translation)

ALL = "color,translation,cutout"


@pytest.mark.parametrize("channels,res", [(1, 16), (3, 32), (3, 64)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shape_dtype_device_kept(channels, res, dtype):
    x = torch.randn(4, channels, res, res, dtype=dtype)
    for policy in ["color", "translation", "cutout", ALL]:
        y = diff_augment(x, policy, torch.Generator().manual_seed(0))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device


def test_empty_policy_is_identity():
    x = torch.randn(2, 3, 16, 16)
    assert diff_augment(x, "") is x


def test_policy_keys_match_config():
    assert set(POLICIES) == {"color", "translation", "cutout"}


def test_unknown_policy_is_named():
    with pytest.raises(ValueError, match="blur"):
        diff_augment(torch.zeros(1, 3, 16, 16), "color,blur")


def test_gradients_flow_to_input():
    x = torch.randn(4, 3, 16, 16, requires_grad=True)
    y = diff_augment(x, ALL, torch.Generator().manual_seed(1))
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_deterministic_given_seed():
    x = torch.randn(8, 3, 16, 16)
    a = diff_augment(x, ALL, torch.Generator().manual_seed(5))
    b = diff_augment(x, ALL, torch.Generator().manual_seed(5))
    c = diff_augment(x, ALL, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    # Without a generator the global RNG is used, so torch.manual_seed reproduces a run.
    torch.manual_seed(11)
    d = diff_augment(x, ALL)
    torch.manual_seed(11)
    assert torch.equal(d, diff_augment(x, ALL))


@pytest.mark.parametrize("res", [16, 32])
def test_translation_shifts_content_with_zero_padding(res):
    n, bound, mid = 64, res // 8, res // 2
    marker = torch.zeros(n, 1, res, res)
    marker[:, :, mid, mid] = 1.0
    content = torch.rand(n, 1, res, res) + 0.5  # strictly positive, so padding zeros are visible
    x = torch.cat([marker, content], dim=1)
    y = rand_translation(x, torch.Generator().manual_seed(0))
    shifts = set()
    for i in range(n):
        hits = (y[i, 0] == 1).nonzero()
        assert hits.shape == (1, 2) and y[i, 0].sum() == 1  # the marker moved, not smeared
        dy, dx = hits[0, 0].item() - mid, hits[0, 1].item() - mid
        assert abs(dy) <= bound and abs(dx) <= bound
        shifts.add((dy, dx))
        # Every channel moved by the same (dy, dx); pixels read from outside the image are zero.
        expected = torch.zeros(res, res)
        src = content[i, 0, max(0, -dy):res - max(0, dy), max(0, -dx):res - max(0, dx)]
        expected[max(0, dy):res - max(0, -dy), max(0, dx):res - max(0, -dx)] = src
        assert torch.equal(y[i, 1], expected)
    assert len(shifts) > 10  # shifts really vary per sample


def test_cutout_zeros_one_square_of_half_side():
    n, c, res = 32, 3, 32
    x = torch.rand(n, c, res, res) + 0.5
    y = rand_cutout(x, torch.Generator().manual_seed(0))
    side = res // 2
    corners = set()
    for i in range(n):
        zero = y[i] == 0
        assert torch.equal(zero, zero[:1].expand_as(zero))  # same square in every channel
        rows, cols = zero[0].nonzero().unbind(1)
        assert zero[0].sum() == side * side
        assert rows.max() - rows.min() + 1 == side and cols.max() - cols.min() + 1 == side
        assert torch.equal(y[i][~zero], x[i][~zero])  # the rest is untouched
        corners.add((rows.min().item(), cols.min().item()))
    assert len(corners) > 10


def test_color_ops_follow_their_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(16, 3, 8, 8)
    b = rand_brightness(x, g) - x  # a constant offset per sample in [-0.5, 0.5]
    offsets = b.flatten(1)
    assert torch.allclose(offsets, offsets[:, :1].expand_as(offsets), atol=1e-6)
    assert offsets.abs().max() <= 0.5 and offsets[:, 0].std() > 0.05
    s = rand_saturation(x, g)  # per-pixel channel mean kept
    assert torch.allclose(s.mean(1), x.mean(1), atol=1e-6)
    k = rand_contrast(x, g)  # per-sample mean kept, spread scaled by a factor in [0.5, 1.5]
    assert torch.allclose(k.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-6)
    ratio = k.flatten(1).std(1) / x.flatten(1).std(1)
    assert ratio.min() >= 0.5 - 1e-5 and ratio.max() <= 1.5 + 1e-5 and ratio.std() > 0.05
    # Saturation is a no-op on grayscale (nothing to desaturate).
    gray = torch.rand(4, 1, 8, 8)
    assert torch.allclose(rand_saturation(gray, g), gray)


def test_color_policy_changes_statistics():
    x = torch.rand(16, 3, 16, 16)
    y = diff_augment(x, "color", torch.Generator().manual_seed(2))
    assert not torch.allclose(y.mean((1, 2, 3)), x.mean((1, 2, 3)), atol=1e-3)
    assert not torch.allclose(y.std((1, 2, 3)), x.std((1, 2, 3)), atol=1e-3)
