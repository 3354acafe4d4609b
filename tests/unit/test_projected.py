"""The projected discriminator (`model.d_arch=projected`): the shipped EfficientNet-Lite0 weights,
what stays fixed (feature network, CCM/CSM) and where it never goes (parameters, optimizer state,
checkpoints, DDP's buffer broadcast), gradients to the input, and a short real training run that
resumes exactly. (A missing extra: tests/integration/test_packaging.py, in a venv without it.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distgan.config import ModelConfig, load_config
from distgan.models import build_models
from distgan.models.feature_net import WEIGHTS_SHA256, EfficientNetLite0Features
from tests.helpers.inprocess import train_in_process
from tests.helpers.resume import assert_identical, ckpt

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "efficientnet_lite0_logits.json"
"""ImageNet logits of `synthetic_images()` from the installed package's own forward, recorded by
tools/make_feature_net_fixture.py."""


def synthetic_images() -> torch.Tensor:
    """Four 64x64 images in [-1, 1]: smooth colour gradients, stripes and a seeded noise pattern
    (drawn with torch's CPU generator, whose stream is stable across releases)."""
    side = torch.linspace(-1, 1, 64)
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    gradient = torch.stack([xx, yy, -xx * yy])
    stripes = torch.stack([torch.sin(8 * xx), torch.sin(8 * yy), torch.cos(8 * (xx + yy))])
    disc = (xx.square() + yy.square() < 0.4).float().mul(2).sub(1).expand(3, -1, -1)
    noise = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0)).mul(2).sub(1)
    return torch.stack([gradient, stripes, disc, noise])


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"arch": "dcgan", "d_arch": "projected", "z_dim": 8, "g_width": 8, "d_width": 8, **kw})


@pytest.fixture(scope="module")
def features() -> EfficientNetLite0Features:
    return EfficientNetLite0Features()


def test_feature_network_classifies_like_the_recorded_reference_forward(features):
    recorded = json.loads(FIXTURE.read_text())
    assert recorded["weights_sha256"] == WEIGHTS_SHA256
    with torch.no_grad():
        logits = features.classify(synthetic_images())
    assert logits.topk(5).indices.tolist() == recorded["top5"]
    torch.testing.assert_close(logits, torch.tensor(recorded["logits"]), atol=2e-4, rtol=1e-4)


def test_stages_have_the_projected_gan_channels_and_strides(features):
    maps = features(torch.zeros(2, 3, 64, 64))
    assert [(m.shape[1], 64 // m.shape[-1]) for m in maps] == [(24, 4), (40, 8), (112, 16), (320, 32)]


def test_fixed_parts_are_buffers_outside_parameters_state_and_ddp_broadcast():
    _, D = build_models(tiny(), 32, 3, 0)
    trainable = dict(D.named_parameters())
    assert trainable and all(name.startswith("heads.") for name in trainable)
    assert not [k for k in D.state_dict() if k.startswith(("features.", "projection."))]
    fixed = [n for n, _ in D.named_buffers() if n.startswith(("features.", "projection."))]
    assert len(fixed) > 100 and set(fixed) == set(D._ddp_params_and_buffers_to_ignore)
    D.train()
    assert not D.features.training and D.heads.training  # ImageNet statistics stay in eval mode


def test_projection_is_the_same_whatever_the_seed_and_the_heads_are_not():
    torch.manual_seed(1)
    _, a = build_models(tiny(), 32, 3, 0)
    torch.manual_seed(2)
    _, b = build_models(tiny(), 32, 3, 0)
    for (name, x), (_, y) in zip(a.projection.named_buffers(), b.projection.named_buffers()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, y) for x, y in zip(a.heads.parameters(), b.heads.parameters()))


@pytest.mark.parametrize("resolution,channels,classes,input_side", [(16, 3, 0, 0), (32, 1, 3, 0), (64, 3, 0, 96)])
def test_logits_per_patch_and_gradients_reach_the_input_not_the_fixed_weights(resolution, channels, classes,
                                                                              input_side):
    torch.manual_seed(0)
    cfg = tiny(conditional=classes > 0, projected_resolution=input_side, projected_scales=3)
    _, D = build_models(cfg, resolution, channels, classes)
    x = torch.randn(4, channels, resolution, resolution, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0]) if classes else None
    logits = D(x, labels)
    assert logits.ndim == 2 and logits.shape[0] == 4 and logits.shape[1] >= 3  # >= one logit per scale
    logits.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is not None for p in D.parameters())
    assert all(not b.requires_grad for b in D.buffers())
    if classes:
        assert not torch.allclose(D(x, torch.tensor([1, 1, 1, 1])), D(x, torch.tensor([2, 2, 2, 2])))


def test_bf16_autocast_forward_and_backward():
    _, D = build_models(tiny(), 32, 3, 0)
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = D(x)
    assert logits.dtype == torch.bfloat16
    logits.float().sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("side", [16, 48])
def test_projected_resolution_off_the_feature_network_strides_is_refused(side):
    with pytest.raises(Exception, match=f"projected_resolution={side}: must be a multiple of 32"):
        build_models(tiny(projected_resolution=side), 32, 3, 0)


def test_training_keeps_the_fixed_parts_out_of_checkpoints_and_resumes_exactly(tiny_shards, tmp_path):
    """4 steps straight vs 2 + resume to 4, under DiffAugment and the hinge loss of the recipe."""
    args = ["data.resolution=16", "data.batch_size=4", "data.workers=0", "model.z_dim=8", "model.g_width=8",
            "model.d_width=8", "model.d_arch=projected", "model.projected_scales=2", "loss.objective=hinge",
            "loss.diffaugment=color,translation,cutout", "optim.d_steps=1", "train.log_every=1",
            "train.sample_every=1000", "train.ckpt_every=2", "logging.wandb=off", "train.progress=false",
            f"data.source={tiny_shards}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    rows = train_in_process(load_config(None, args + ["train.steps=4", f"train.run_dir={straight}"]))
    assert [r["step"] for r in rows if "Dmain/loss" in r] == [1, 2, 3, 4]
    train_in_process(load_config(None, args + ["train.steps=2", f"train.run_dir={resumed}"]))
    shutil.rmtree(ckpt(resumed, 2).parent / "step-000000002.tmp", ignore_errors=True)
    train_in_process(load_config(None, args + ["train.steps=4", f"train.run_dir={resumed}"]))
    assert_identical(ckpt(resumed, 4), ckpt(straight, 4))
    D = load_file(str(ckpt(straight, 4) / "D.safetensors"))
    assert D and all(k.startswith("heads.") for k in D), sorted(D)[:5]
    size = sum(f.stat().st_size for f in ckpt(straight, 4).iterdir())
    assert size < 4_000_000, f"checkpoint of {size} bytes: the 17 MB feature network must not be in it"
