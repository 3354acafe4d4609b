"""Load a generator from a checkpoint and write images (`distgan sample`, eval, notebooks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from distgan.checkpoint import load_weights, resolve_checkpoint
from distgan.config import Config, load_config
from distgan.samples import fixed_latents, generate, grid_layout, save_grid, to_uint8


def load_generator(ckpt: str | Path, raw: bool = False, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, dict]:
    """(G in eval mode, its Config, the run's extra facts such as class_names)."""
    from distgan.models import build_models

    path = resolve_checkpoint(ckpt)
    meta = json.loads((path / "state.json").read_text())
    cfg = load_config(None, {f"{s}.{k}": v for s, sec in meta["config"].items() for k, v in sec.items()})
    extra = meta.get("extra", {})
    G, _ = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, len(extra.get("class_names", [])))
    load_weights(G, path / ("G.safetensors" if raw else "G_ema.safetensors"))
    return G.to(device).eval().requires_grad_(False), cfg, extra


def sample_to(ckpt: str | Path, n: int, out: str | Path, seed: int = 0, class_index: int | None = None,
              raw: bool = False, device: str | None = None) -> Path:
    """A grid PNG when `out` ends in .png, else a folder of N PNGs."""
    from PIL import Image

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    G, _, _ = load_generator(ckpt, raw=raw, device=device)
    z, c = fixed_latents(n, G.z_dim, G.num_classes, seed, device)
    if class_index is not None:
        if not G.num_classes:
            raise ValueError("--class given but this checkpoint's generator is unconditional")
        if not 0 <= class_index < G.num_classes:
            raise ValueError(f"--class {class_index} is out of range: the model has {G.num_classes} classes (0..{G.num_classes - 1})")
        c = torch.full((n,), class_index, dtype=torch.long, device=device)
    images = generate(G, z, c)
    out = Path(out)
    if out.suffix.lower() == ".png":
        # One row per class (as in training grids) unless a single class was asked for.
        _, per_row = grid_layout(n, G.num_classes if class_index is None else 0)
        return save_grid(images, out, nrow=per_row)
    out.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(to_uint8(images)):
        Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(out / f"{seed:04d}-{i:06d}.png")
    return out
