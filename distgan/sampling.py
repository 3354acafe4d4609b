"""Images from a generator: fixed latents, chunked generation, grids, and a generator loaded from
a checkpoint, run folder or export (used by training's sample grids, `distgan sample`,
evaluation, reports, exports, notebooks)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from distgan.checkpoint import CheckpointInfo, load_weights
from distgan.config import Config
from distgan.errors import DistganError
from distgan.models import build_models
from distgan.weights import open_weights


def fixed_latents(n: int, z_dim: int, num_classes: int, seed: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The same latents every time for a seed; one row per class when conditional."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, z_dim, generator=g)
    c = None
    if num_classes:
        per_row = max(1, n // num_classes) if num_classes <= n else 1
        c = (torch.arange(n) // per_row).clamp(max=num_classes - 1)
    return z.to(device), (c.to(device) if c is not None else None)


def grid_layout(n: int, num_classes: int) -> tuple[int, int]:
    """(images, images per row) for a grid of about `n` fixed latents.

    Conditional: `n // num_classes` per row and exactly one row per class (so `fixed_latents`
    gives every row a single class); unconditional, or more classes than images: a square grid."""
    if num_classes and num_classes <= n:
        per_row = n // num_classes
        return per_row * num_classes, per_row
    return n, max(1, math.ceil(math.sqrt(n)))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] NCHW float -> uint8 NHWC."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1) -> Image.Image:
    """Tile a batch of [-1, 1] images into one PIL image (`nrow` images per row)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    return Image.fromarray(grid[..., 0] if c == 1 else grid)


@torch.no_grad()
def generate(G: torch.nn.Module, z: torch.Tensor, c: torch.Tensor | None, batch_size: int = 64,
             truncation_psi: float = 1.0) -> torch.Tensor:
    """Run G in eval mode over z in chunks (restores its train/eval mode afterwards).

    `truncation_psi` < 1 pulls each latent's w towards the average w (the truncation trick), for
    generators with a mapping network (`stylegan2`)."""
    kwargs = {}
    if truncation_psi != 1.0:
        if not getattr(G, "w_dim", 0):
            raise DistganError(f"truncation psi={truncation_psi} needs a generator with a mapping network "
                               f"(model.arch=stylegan2); this one ({type(G).__name__}) has none. Leave it at 1.")
        kwargs["truncation_psi"] = truncation_psi
    was_training = G.training
    G.eval()
    try:
        out = [G(z[i:i + batch_size], None if c is None else c[i:i + batch_size], **kwargs)
               for i in range(0, len(z), batch_size)]
    finally:
        G.train(was_training)
    return torch.cat(out)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    make_grid(images, nrow).save(tmp)
    tmp.replace(path)
    return path


def load_generator(ckpt: str | Path, raw: bool = False,
                   device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, CheckpointInfo]:
    """(G in eval mode, its Config, the facts) of a checkpoint, run folder or `distgan export` folder."""
    source = open_weights(ckpt)
    cfg = source.config()
    G, _ = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, len(source.info.class_names))
    load_weights(G, source.file("G" if raw else "G_ema"))
    return G.to(device).eval().requires_grad_(False), cfg, source.info


def sample_to(ckpt: str | Path, n: int, out: str | Path, seed: int = 0, class_index: int | None = None,
              raw: bool = False, device: str | None = None, truncation_psi: float = 1.0) -> Path:
    """A grid PNG when `out` ends in .png, else a folder of N PNGs."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    G, _, _ = load_generator(ckpt, raw=raw, device=device)
    z, c = fixed_latents(n, G.z_dim, G.num_classes, seed, device)
    if class_index is not None:
        if not G.num_classes:
            raise DistganError("--class given but this checkpoint's generator is unconditional")
        if not 0 <= class_index < G.num_classes:
            raise DistganError(f"--class {class_index} is out of range: the model has {G.num_classes} classes "
                               f"(0..{G.num_classes - 1})")
        c = torch.full((n,), class_index, dtype=torch.long, device=device)
    images = generate(G, z, c, truncation_psi=truncation_psi)
    out = Path(out)
    if out.suffix.lower() == ".png":
        # One row per class (as in training grids) unless a single class was asked for.
        _, per_row = grid_layout(n, G.num_classes if class_index is None else 0)
        return save_grid(images, out, nrow=per_row)
    out.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(to_uint8(images)):
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / f"{seed:04d}-{i:06d}.png")
    return out
