"""Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, ProGAN's "SWD").

Why a second distance: FID, KID and precision/recall all measure in Inception-v3 features, which
were trained on ImageNet labels, and a discriminator built on ImageNet features (Projected GAN) can
lower Inception FID without images that are equally better (Kynkaanniemi et al., ICLR 2023, "The
Role of ImageNet Classes in Frechet Inception Distance"). SWD uses no learned features at all: it
compares the distributions of local 7x7 patches of the images at every scale of a Laplacian
pyramid, so it cannot be gamed through ImageNet classes. (No self-supervised or CLIP image encoder
ships its weights inside a PyPI package, so a learned label-free feature space cannot be had
offline; see the README's quality section.)

The protocol follows ProGAN's description and released metric:
  * pyramid levels at resolutions R, R/2, ... down to 16 (the coarsest level is the Gaussian
    image, the others Laplacian details), with the 5x5 binomial filter and mirrored borders
    (OpenCV's pyrDown/pyrUp);
  * 128 random 7x7 patches per image and level (all channels: 7x7xC descriptors), fewer per
    image when the set is large: at most `MAX_DESCRIPTORS` per level and set (ProGAN's 16,384
    images make 2 M; sorting their projections takes minutes on a CPU, and 32,768 descriptors
    already estimate each 1-D distance to well under a percent);
  * per level and per set, every channel normalized to zero mean and unit standard deviation;
  * 4 repeats of 128 random unit directions: project, sort, mean absolute difference;
  * the distance of a level is the mean over the repeats, the reported SWD the mean over the
    levels, multiplied by 1e3 as ProGAN reports it (`SWDx1e3_avg`).
Images enter as 0..255 pixels (fakes quantized as a saved PNG would be). A seed fixes the patches
and the directions, so the same two image sets always give the same number.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

PATCH = 7
PATCHES_PER_IMAGE = 128
DIR_REPEATS, DIRS_PER_REPEAT = 4, 128
MIN_LEVEL_RESOLUTION = 16
SCALE = 1e3
MAX_IMAGES = 16384
"""ProGAN measured SWD on 16,384 images; more only costs memory."""
MAX_DESCRIPTORS = 1 << 15
"""Descriptors per level and set: 128 patches an image up to 256 images, fewer per image beyond."""

_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0])
_KERNEL = torch.outer(_BINOMIAL, _BINOMIAL) / 256.0


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 as they are; float images in [-1, 1] rounded to the uint8 a PNG would store."""
    if images.dtype == torch.uint8:
        return images
    return ((images.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def level_resolutions(resolution: int) -> list[int]:
    """The pyramid's resolutions: R, R/2, ... >= 16; just R for smaller images that still hold a patch."""
    if resolution < PATCH:
        raise ValueError(f"SWD needs images of at least {PATCH}x{PATCH} pixels, got {resolution}x{resolution}")
    out = [resolution]
    while out[-1] // 2 >= MIN_LEVEL_RESOLUTION:
        out.append(out[-1] // 2)
    return out


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    c = x.shape[1]
    weight = kernel.to(x.device, x.dtype).expand(c, 1, 5, 5)
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), weight, groups=c)  # reflect = scipy/OpenCV mirror


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[details at R, details at R/2, ..., Gaussian at the coarsest level], float32."""
    pyramid = [images.float()]
    for _ in range(1, levels):
        down = _blur(pyramid[-1], _KERNEL)[:, :, ::2, ::2]
        up = torch.zeros_like(pyramid[-1])
        up[:, :, ::2, ::2] = down
        pyramid[-1] = pyramid[-1] - _blur(up, _KERNEL * 4)
        pyramid.append(down)
    return pyramid


def patches_per_image(n: int) -> int:
    """128 (ProGAN) while the set's descriptors stay within MAX_DESCRIPTORS, fewer (at least 1) beyond."""
    return max(1, min(PATCHES_PER_IMAGE, MAX_DESCRIPTORS // max(1, n)))


def patch_descriptors(level: torch.Tensor, generator: torch.Generator, per_image: int = PATCHES_PER_IMAGE) -> torch.Tensor:
    """`per_image` random 7x7 patches of every image: [N x per_image, C x 49] (positions drawn on the CPU)."""
    n, c, h, w = level.shape
    half = PATCH // 2
    ys = torch.randint(half, h - half, (n, per_image), generator=generator).to(level.device)
    xs = torch.randint(half, w - half, (n, per_image), generator=generator).to(level.device)
    offsets = torch.arange(-half, half + 1, device=level.device)
    rows = (ys[:, :, None] + offsets)[:, :, :, None]  # [N, P, 7, 1]
    cols = (xs[:, :, None] + offsets)[:, :, None, :]  # [N, P, 1, 7]
    idx = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level.permute(0, 2, 3, 1)[idx, rows, cols]  # [N, P, 7, 7, C]
    return patches.permute(0, 1, 4, 2, 3).reshape(n * per_image, c * PATCH * PATCH)


def _normalized(desc: torch.Tensor, channels: int) -> torch.Tensor:
    """Each channel to zero mean, unit std over all patches and pixels of the level (ProGAN)."""
    per_channel = desc.view(len(desc), channels, PATCH * PATCH)
    mean = per_channel.mean(dim=(0, 2), keepdim=True)
    std = per_channel.std(dim=(0, 2), keepdim=True, unbiased=False).clamp_min(1e-8)  # flat images: no 0/0
    return ((per_channel - mean) / std).view(len(desc), -1)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, generator: torch.Generator) -> float:
    """Mean over DIR_REPEATS x DIRS_PER_REPEAT random unit directions of the 1-D Wasserstein-1
    distance between the projections of the rows of `a` and `b` (same shape)."""
    results = []
    for _ in range(DIR_REPEATS):
        dirs = torch.randn(a.shape[1], DIRS_PER_REPEAT, generator=generator).to(a.device)
        dirs = dirs / dirs.norm(dim=0, keepdim=True)
        # [direction, patch]: sorting along the contiguous last dim is several times faster than along dim 0
        proj_a = torch.sort((a @ dirs).T.contiguous(), dim=1).values
        proj_b = torch.sort((b @ dirs).T.contiguous(), dim=1).values
        results.append((proj_a - proj_b).abs().mean())
    return float(torch.stack(results).mean())


def _level_descriptors(images: torch.Tensor, levels: int, generator: torch.Generator, chunk: int,
                       device: torch.device) -> list[torch.Tensor]:
    """Normalized descriptors of every level, images taken `chunk` at a time (the pyramid of all
    images at once would be float32 copies of the whole set)."""
    per_level: list[list[torch.Tensor]] = [[] for _ in range(levels)]
    per_image = patches_per_image(len(images))
    for i in range(0, len(images), chunk):
        batch = images[i : i + chunk].to(device)
        for lod, level in enumerate(laplacian_pyramid(batch, levels)):
            per_level[lod].append(patch_descriptors(level, generator, per_image))
    channels = images.shape[1]
    return [_normalized(torch.cat(d), channels) for d in per_level]


@torch.no_grad()
def swd(real: torch.Tensor, fake: torch.Tensor, seed: int = 0, device: torch.device | str = "cpu",
        chunk: int = 256) -> dict[str, float]:
    """SWD x 1e3 between two image sets [N, C, H, W] (uint8, or float in [-1, 1]; same shape).

    Returns {"swd": mean over levels, "swd_<res>": each level}. Deterministic for a seed."""
    if real.shape != fake.shape or real.ndim != 4:
        raise ValueError(f"SWD compares two image sets of one shape [N, C, H, W], got {tuple(real.shape)} and "
                         f"{tuple(fake.shape)}")
    if real.shape[2] != real.shape[3]:
        raise ValueError(f"SWD expects square images, got {real.shape[2]}x{real.shape[3]}")
    device = torch.device(device)
    resolutions = level_resolutions(real.shape[-1])
    gen_real, gen_fake, gen_dirs = (torch.Generator().manual_seed(seed * 3 + k) for k in range(3))
    desc_real = _level_descriptors(to_pixels(real), len(resolutions), gen_real, chunk, device)
    desc_fake = _level_descriptors(to_pixels(fake), len(resolutions), gen_fake, chunk, device)
    per_level = {f"swd_{res}": sliced_wasserstein(a, b, gen_dirs) * SCALE
                 for res, a, b in zip(resolutions, desc_real, desc_fake)}
    return {"swd": sum(per_level.values()) / len(per_level), **per_level}
