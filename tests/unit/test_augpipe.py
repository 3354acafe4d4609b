"""The bgc augmentation pipeline: identity at p=0, differentiable ops, reproducible draws."""

import pytest
import torch

from distgan.gan.augpipe import BGC_OPS, AugmentPipe


def images(n=6, c=3, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 2 - 1


def test_identity_at_p_zero():
    x = images()
    assert AugmentPipe(0.0)(x) is x
    # A tensor p of 0 (adaptive p) runs the ops but every draw falls on the identity.
    assert torch.allclose(AugmentPipe(torch.tensor(0.0))(x), x, atol=1e-5)


@pytest.mark.parametrize("op", BGC_OPS)
def test_every_op_is_differentiable_and_keeps_shape(op):
    x = images().requires_grad_(True)
    out = AugmentPipe(1.0, ops=(op,), generator=torch.Generator().manual_seed(1))(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.allclose(out, x, atol=1e-4), f"{op} at p=1 left every image unchanged"
    (out * torch.randn_like(out)).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0, f"no gradient reaches the input through {op}"


def test_same_generator_state_gives_the_same_output_on_any_rank():
    x = images()
    a = AugmentPipe(0.5, generator=torch.Generator().manual_seed(7))(x)
    b = AugmentPipe(0.5, generator=torch.Generator().manual_seed(7))(x.clone())
    assert torch.equal(a, b)
    c = AugmentPipe(0.5, generator=torch.Generator().manual_seed(8))(x)
    assert not torch.equal(a, c)


def test_geometric_ops_keep_the_range_and_blit_ops_are_exact():
    x = images()
    geo = AugmentPipe(1.0, ops=("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac"),
                      generator=torch.Generator().manual_seed(2))(x)
    assert geo.min() >= -1 - 1e-5 and geo.max() <= 1 + 1e-5  # bilinear + reflection: no new extremes
    flipped = AugmentPipe(1.0, ops=("xflip",), generator=torch.Generator().manual_seed(3))(x)
    for i in range(len(x)):  # each sample either untouched or mirrored, pixel for pixel
        assert torch.allclose(flipped[i], x[i], atol=1e-5) or torch.allclose(flipped[i], x[i].flip(-1), atol=1e-5)


def test_probability_controls_how_often_ops_apply():
    x = images(n=400, side=8)
    changed = lambda p: (AugmentPipe(p, ops=("xflip",), generator=torch.Generator().manual_seed(4))(x) - x
                         ).abs().flatten(1).amax(1).gt(1e-5).float().mean().item()
    # xflip applies with probability p, and a flip changes the image half of the time it is drawn
    # (the flag is 0 or 1): so about p/2 of the images change.
    assert changed(0.2) == pytest.approx(0.1, abs=0.05)
    assert changed(1.0) == pytest.approx(0.5, abs=0.08)


def test_grayscale_and_bad_shapes():
    x = images(c=1)
    out = AugmentPipe(1.0, generator=torch.Generator().manual_seed(5))(x)
    assert out.shape == x.shape
    with pytest.raises(ValueError, match="N, C, H, W"):
        AugmentPipe(0.5)(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match="Unknown augmentation ops"):
        AugmentPipe(0.5, ops=("wobble",))
