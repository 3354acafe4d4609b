"""Golden fixtures for the ADA augmentation pipeline and ADA's p trajectory (NVlabs stylegan2-ada-pytorch).

    .venv/bin/python tools/make_golden_fixtures.py --stylegan2-ada /tmp/sg2ada --only augment

Writes tests/fixtures/golden/augment/:

- `pipeline.safetensors`: fixed images (batch 8; 1 and 3 channels; 16 and 32 px) and, per case,
  the reference AugmentPipe's output after `torch.manual_seed(seed)` and, for some, the gradient
  of sum(output * weights) with respect to the images (fixed `weights`); cases: the `bgc` preset at
  several p (one above 1, which NVlabs allows), the blit + geometric ops alone, R3GAN's
  multipliers (color ops at 0.5, cutout at 1). The metadata's `cases` lists each case's
  multipliers, p, seed and tensors.
- `ada.safetensors`: real logits of 200 ADA windows (`interval` D steps each) whose sign means
  cross the target both ways, drive p to 0 and past 1, and sometimes equal it; and the reference
  p after each adjustment. NVlabs' update lives inside its training loop
  (training/training_loop.py, "Execute ADA heuristic") and cannot be called alone: it is
  re-implemented here expression for expression, with the reference's own statistics collector
  (torch_utils.training_stats) computing r_t from the reported signs.

Only tensors and metadata are written, never reference source.
"""

from __future__ import annotations

import numpy as np
import torch

from tools.golden.common import parse_args, write_fixture

REFERENCE = "NVlabs/stylegan2-ada-pytorch"
BATCH = 8
BGC = dict(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1,
           brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
GEOMETRIC = {k: v for k, v in BGC.items() if k in ("xflip", "rotate90", "xint", "scale", "rotate", "aniso", "xfrac")}
R3GAN = {**BGC, "brightness": 0.5, "contrast": 0.5, "lumaflip": 0.5, "hue": 0.5, "saturation": 0.5, "cutout": 1}
# name, multipliers, channels, resolution, p, seed
CASES = [
    ("bgc_rgb16_p0.2", BGC, 3, 16, 0.2, 11),
    ("bgc_rgb16_p0.6", BGC, 3, 16, 0.6, 12),
    ("bgc_rgb32_p1.0", BGC, 3, 32, 1.0, 13),
    ("bgc_rgb16_p1.4", BGC, 3, 16, 1.4, 14),
    ("bgc_gray16_p0.6", BGC, 1, 16, 0.6, 15),
    ("bgc_gray32_p1.0", BGC, 1, 32, 1.0, 16),
    ("geometric_rgb16_p1.0", GEOMETRIC, 3, 16, 1.0, 17),
    ("r3gan_rgb16_p0.6", R3GAN, 3, 16, 0.6, 18),
    ("r3gan_gray16_p1.0", R3GAN, 1, 16, 1.0, 19),
]
WITH_GRADIENT = {"bgc_rgb16_p0.6", "bgc_gray16_p0.6", "geometric_rgb16_p1.0", "r3gan_rgb16_p0.6", "r3gan_gray16_p1.0"}
"""Cases whose input gradient is recorded too (16 px only: the fixtures stay small)."""
# ADA: batch (global images per D step), interval, kimg, target, start p
ADA = dict(batch=10, interval=4, kimg=0.5, target=0.6, initial_p=0.2)


def _images(channels: int, res: int) -> torch.Tensor:
    """Smooth images with edges (a blurred random field plus a bright square), in [-1, 1]."""
    g = torch.Generator().manual_seed(100 * channels + res)
    x = torch.rand(BATCH, channels, res // 4, res // 4, generator=g) * 2 - 1
    x = torch.nn.functional.interpolate(x, size=(res, res), mode="bilinear", align_corners=False)
    x[:, :, res // 4: res // 2, res // 4: res // 2] = 0.9
    return x + 0.05 * torch.randn(x.shape, generator=g)


def pipeline_fixture(args) -> None:
    from training.augment import AugmentPipe  # the reference, on PYTHONPATH

    tensors, cases = {}, []
    for name, mult, channels, res, p, seed in CASES:
        key, weights = f"images_c{channels}_r{res}", f"weights_c{channels}_r{res}"
        if key not in tensors:
            tensors[key] = _images(channels, res)
        pipe = AugmentPipe(**mult).train().requires_grad_(False)
        pipe.p.copy_(torch.as_tensor(p))
        x = tensors[key].clone().requires_grad_(True)
        torch.manual_seed(seed)
        out = pipe(x)
        tensors[f"{name}/output"] = out.detach()
        case = dict(name=name, multipliers=mult, p=p, seed=seed, images=key)
        if name in WITH_GRADIENT:  # the gradient of sum(output * weights) w.r.t. the images
            if weights not in tensors:
                tensors[weights] = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
            (tensors[f"{name}/grad"],) = torch.autograd.grad((out * tensors[weights]).sum(), x)
            case["weights"] = weights
        cases.append(case)
    write_fixture(args.out / "pipeline.safetensors", tensors, REFERENCE, args.commit, cases=cases,
                  produced_by="training/augment.py AugmentPipe.forward after torch.manual_seed(seed), on CPU "
                              "(upfirdn2d and grid_sample on their pure-PyTorch paths)")


def _window_positives(k: int, count: int) -> int:
    """How many of window k's `count` logits are positive: r_t below the target for 15 windows
    (p falls to 0 and stays), above it for 40 (p climbs past 1), equal to it for 5, below for 60
    (p back to 0), then alternating bands."""
    high, low, equal = count * 9 // 10, count * 3 // 10, count * 4 // 5  # r_t 0.8, -0.4, 0.6
    bands = [(15, low), (40, high), (5, equal), (60, low), (30, high), (10, equal), (40, low if k % 2 else high)]
    start = 0
    for length, positives in bands:
        if k < start + length:
            return positives
        start += length
    return high


def ada_fixture(args) -> None:
    from torch_utils import training_stats  # the reference's statistics collector

    steps = 200
    per_window = ADA["interval"] * ADA["batch"]
    g = torch.Generator().manual_seed(5)
    logits = torch.empty(steps, ADA["interval"], ADA["batch"])
    for k in range(steps):
        n_pos = _window_positives(k, per_window)
        magnitudes = torch.rand(per_window, generator=g) * 3 + 0.01
        signs = torch.cat([torch.ones(n_pos), -torch.ones(per_window - n_pos)])
        signs = signs[torch.randperm(per_window, generator=g)]
        logits[k] = (signs * magnitudes).view(ADA["interval"], ADA["batch"])
    # NVlabs: augment_pipe.p is a float32 buffer; every ada_interval batches (after all phases),
    # adjust = np.sign(Loss/signs/real - ada_target) * (batch_size * ada_interval) / (ada_kimg * 1000);
    # p = max(p + adjust, 0).
    ada_stats = training_stats.Collector(regex="Loss/signs/real")
    p = torch.tensor(ADA["initial_p"], dtype=torch.float32)
    p_after, rt = [], []
    for k in range(steps):
        for step in range(ADA["interval"]):
            training_stats.report("Loss/signs/real", logits[k, step].sign())
        ada_stats.update()
        rt.append(ada_stats["Loss/signs/real"])
        adjust = (np.sign(ada_stats["Loss/signs/real"] - ADA["target"])
                  * (ADA["batch"] * ADA["interval"]) / (ADA["kimg"] * 1000))
        p.copy_((p + adjust).max(torch.zeros([])))
        p_after.append(p.clone())
    p_after = torch.stack(p_after)
    assert p_after.min() == 0 and p_after.max() > 1, "the sequence must drive p to 0 and past 1"
    tensors = {"real_logits": logits, "p_after": p_after, "rt": torch.tensor(rt, dtype=torch.float64)}
    write_fixture(args.out / "ada.safetensors", tensors,
                  REFERENCE, args.commit, **ADA,
                  produced_by="a re-implementation of training/training_loop.py's ADA update (it lives inside "
                              "the training loop and cannot be called alone), r_t from "
                              "torch_utils.training_stats.Collector")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_grad_enabled(True)
    pipeline_fixture(args)
    ada_fixture(args)
    for path in sorted(args.out.iterdir()):
        print(f"{path}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
