"""The bgc augmentation pipeline: identity at p=0, differentiable ops, reproducible draws, per-op
probability multipliers and presets (NVlabs' `bgc`, R3GAN's), cutout, the supersampled warp and
its single-sample option. (Number for number against NVlabs: tests/unit/test_golden_augment.py.)"""

import math

import pytest
import torch

from distgan.config import load_config
from distgan.errors import ConfigError
from distgan.gan.augment_presets import PRESETS, multipliers
from distgan.gan.augpipe import ALL_OPS, BGC_OPS, AugmentPipe, _rotate2d, _translate2d
from distgan.gan.resample import supersampled_warp


def images(n=6, c=3, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, c, side, side, generator=g) * 2 - 1


def test_identity_at_p_zero():
    x = images()
    assert AugmentPipe(0.0)(x) is x
    # A tensor p of 0 (adaptive p) runs the ops but every draw falls on the identity.
    assert torch.allclose(AugmentPipe(torch.tensor(0.0))(x), x, atol=1e-5)


@pytest.mark.parametrize("op", ALL_OPS)
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


def test_geometric_ops_warp_through_the_2x_wavelet_round_trip_as_nvlabs():
    """Every blit and geometric op goes through NVlabs' one supersampled warp: integer translations
    move the interior pixel for pixel, the sym6 filter's ringing overshoots the range a little,
    and flips and quarter turns are NOT pixel-exact (sym6 is not symmetric, so the 2x grid is not
    symmetric about the image centre; NVlabs' own AugmentPipe gives the same: golden fixtures)."""
    x = images()
    geo = AugmentPipe(1.0, ops=("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac"),
                      generator=torch.Generator().manual_seed(2))(x)
    assert geo.abs().max() > 1 and geo.abs().max() < 1.5
    shift = torch.tensor([3.0])
    moved = supersampled_warp(x[:1], _translate2d(-shift, torch.zeros(1)))  # out(x) = in(x - 3)
    torch.testing.assert_close(moved[..., 4:12], x[:1, ..., 1:9], atol=1e-5, rtol=0)
    turned = supersampled_warp(x[:1], _rotate2d(torch.tensor([math.pi])))
    assert (turned - x[:1].flip(-1, -2)).abs().max() > 0.05


def test_augment_supersample_false_samples_the_same_transforms_once():
    """`loss.augment_supersample=false` reaches the objective's pipe, which then draws the same
    transforms (the same generator stream) and samples them once: close to the supersampled warp
    on a smooth image away from the borders, not equal (no wavelet round trip)."""
    from distgan.gan.objective import GANObjective
    from distgan.gan.resample import single_warp

    cfg = load_config(None, ["loss.augment=bgc", "loss.augment_p=0.5", "loss.augment_supersample=false"])
    assert GANObjective(cfg.loss, 8, 0, 4, torch.device("cpu")).pipe.warp is single_warp
    assert load_config(None, ["loss.augment=bgc"]).loss.augment_supersample is True
    ramp = torch.linspace(-1, 1, 32)
    x = (ramp[None, :] * ramp[:, None]).expand(4, 3, 32, 32).contiguous()
    ops = ("xint", "scale", "rotate", "xfrac")
    fine = AugmentPipe(1.0, ops, generator=torch.Generator().manual_seed(6))(x)
    once = AugmentPipe(1.0, ops, generator=torch.Generator().manual_seed(6), supersample=False)(x)
    inner = (slice(None), slice(None), slice(10, 22), slice(10, 22))
    assert (fine[inner] - once[inner]).abs().max() < 0.05 and not torch.allclose(fine, once, atol=1e-3)


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


def seeded(p, ops, seed=11):
    return AugmentPipe(p, ops, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("op", ALL_OPS)
def test_with_every_other_multiplier_at_zero_the_pipe_is_that_op_alone(op):
    """An op at multiplier 0 does not run and draws nothing (NVlabs: `if self.<op> > 0`), so the
    pipe equals the op alone, draw for draw; and multiplier 2 at p=0.5 is multiplier 1 at p=1."""
    x = images(n=8)
    alone = seeded(1.0, (op,))(x)
    others_zero = {o: 0.0 for o in ALL_OPS} | {op: 1.0}
    assert torch.equal(seeded(1.0, others_zero)(x), alone)
    assert torch.equal(seeded(0.5, others_zero | {op: 2.0})(x), alone)
    assert torch.equal(seeded(torch.tensor(0.5), others_zero | {op: 2.0})(x), alone)  # ADA's device p
    assert not torch.allclose(alone, x, atol=1e-4)


def test_brightness_alone_shifts_every_pixel_of_an_image_by_one_value():
    """The op alone, checked for what it does: with p=1 every image is shifted by its own offset."""
    x = images(n=8)
    shift = (seeded(1.0, {"brightness": 1.0})(x) - x).flatten(1)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-5) and shift[:, 0].abs().min() > 0


def test_multipliers_scale_each_ops_probability():
    """Brightness changes an image whenever it is drawn (its offset is never exactly 0), so the
    share of changed images estimates multiplier x p (capped at 1): 4,000 seeded draws each."""
    x = images(n=4000, side=2)
    for p, mult in ((0.4, 0.25), (0.4, 0.5), (0.4, 1.0), (0.4, 2.0), (0.8, 0.5)):
        changed = (seeded(p, {"brightness": mult})(x) - x).abs().flatten(1).amax(1).gt(1e-6).float().mean().item()
        assert changed == pytest.approx(min(1.0, p * mult), abs=0.03), (p, mult)


def test_presets_are_the_references():
    """NVlabs' augpipe_specs['bgc'] (stylegan2-ada-pytorch train.py) and R3GAN's augment_kwargs
    (brownvc/R3GAN train.py): colors at 0.5, cutout at 1."""
    assert PRESETS["bgc"] == dict.fromkeys(BGC_OPS, 1.0)
    assert PRESETS["bgc-r3gan"] == {"xflip": 1, "rotate90": 1, "xint": 1, "scale": 1, "rotate": 1, "aniso": 1,
                                    "xfrac": 1, "brightness": 0.5, "contrast": 0.5, "lumaflip": 0.5, "hue": 0.5,
                                    "saturation": 0.5, "cutout": 1}
    cfg = load_config(None, ["loss.augment=bgc-r3gan", "loss.augment_ops=hue=0,cutout=0.25, xflip=2"])
    got = multipliers(cfg.loss.augment, cfg.loss.augment_ops)
    assert "hue" not in got and got["cutout"] == 0.25 and got["xflip"] == 2 and got["contrast"] == 0.5


@pytest.mark.parametrize("overrides, message", [
    (["loss.augment=bgc", "loss.augment_ops=wobble=1"], "unknown op 'wobble'"),
    (["loss.augment=bgc", "loss.augment_ops=hue"], "hue=<number>"),
    (["loss.augment=bgc", "loss.augment_ops=hue=-1"], "at least 0"),
    (["loss.augment_ops=cutout=1"], "set loss.augment"),
])
def test_bad_multipliers_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_config(None, overrides)
    assert "loss.augment" in str(err.value)


def test_cutout_zeroes_a_square_of_half_the_side_clipped_by_the_edges():
    x = torch.ones(200, 3, 16, 16)
    out = seeded(1.0, {"cutout": 1.0})(x)
    assert torch.equal(out, out[:, :1].expand_as(out))  # the same hole in every channel
    kept = out[:, 0] != 0
    for i in range(len(x)):
        rows, cols = (~kept[i]).any(1).nonzero().flatten(), (~kept[i]).any(0).nonzero().flatten()
        hole = torch.zeros(16, 16, dtype=torch.bool)
        hole[rows[:, None], cols] = True
        assert torch.equal(~kept[i], hole), "the zeroed pixels are not a rectangle"
        for idx in (rows, cols):  # contiguous, 8 = 0.5 x 16 wide unless the image edge clips it
            assert len(idx) and torch.equal(idx, torch.arange(idx[0], idx[-1] + 1))
            assert len(idx) == 8 or (len(idx) < 8 and (idx[0] == 0 or idx[-1] == 15))
    assert out.sum() < x.sum() - 200 * 3 * 16  # at least a pixel per image
    # Gated by multiplier x p: at p=0.5 about half the images keep every pixel.
    untouched = seeded(0.5, {"cutout": 1.0})(x).flatten(1).amin(1).eq(1).float().mean().item()
    assert untouched == pytest.approx(0.5, abs=0.1)


def test_luma_flip_negates_grayscale_images_with_probability_p_over_2():
    """NVlabs' luma flip runs on one-channel images too: the Householder reflection's rows each sum
    to -1, so the gray path multiplies by -1. It is drawn with probability p and flips half of
    those draws (the flag is 0 or 1): each image is negated with probability p/2."""
    x = images(n=2000, c=1, side=2)
    for p in (1.0, 0.4):
        out = seeded(p, {"lumaflip": 1.0})(x)
        negated = torch.isclose(out, -x, atol=1e-6).flatten(1).all(1)
        unchanged = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
        assert bool((negated | unchanged).all()), "luma flip on gray did something other than negate"
        assert negated.float().mean().item() == pytest.approx(p / 2, abs=0.03), p
