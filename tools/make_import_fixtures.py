"""Make the `distgan import` test fixtures from a local checkout of NVlabs/stylegan2-ada-pytorch.

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
    .venv/bin/python tools/make_import_fixtures.py --reference /tmp/sg2ada [--real-out /tmp/real-pkls]

For each configuration in `CONFIGS` this builds tiny reference networks with the reference code
on CPU (its custom ops fall back to their pure-PyTorch paths there), gives every parameter and
buffer random values (so biases, noise strengths and w_avg matter), and writes:

- `tests/fixtures/stylegan2_ada_import/<name>.pkl`: the snapshot dict exactly as the reference's
  training loop pickles it (`pickle.dump(dict(training_set_kwargs, G, D, G_ema, augment_pipe))`,
  each network deep-copied, eval, no grad, on CPU: same globals, persistent-object records and
  state), except that each record's embedded module source is a placeholder. NVIDIA's source is
  under a non-commercial license and must not be committed; the importer never reads it.
- `<name>.expected.safetensors`: fixed z, labels and images, and what the reference computes
  from them in fp32: G and G_ema images (noise_mode='const', psi=1) and D's logits. Its metadata
  names the reference commit, torch and numpy versions.

With `--real-out DIR` the same snapshots are also written there with the real embedded source,
to check by hand that real reference-made pickles import the same way (never commit those).
Nothing here is imported by distgan or its tests.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

PLACEHOLDER = "# module source removed: NVIDIA Source Code License-NC; distgan's importer never reads it\n"
OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "stylegan2_ada_import"
CONFIGS = {
    # name: (resolution, channels, c_dim, z_dim, w_dim, channel_base, channel_max, mapping layers,
    #        mbstd group, num_fp16_res, conv_clamp)
    "uncond16": (16, 3, 0, 16, 16, 128, 16, 2, 4, 0, None),
    "cond32": (32, 1, 3, 8, 12, 128, 8, 3, 2, 2, 256),
}
BATCH = 4


def build(reference: Path, spec: tuple, seed: int):
    """(snapshot dict as the reference pickles it, expected tensors) for one configuration."""
    import dnnlib
    from training import augment, networks

    res, ch, c_dim, z_dim, w_dim, cbase, cmax, maps, mbstd, fp16, clamp = spec
    torch.manual_seed(seed)
    G_kwargs = dnnlib.EasyDict(z_dim=z_dim, w_dim=w_dim, mapping_kwargs=dnnlib.EasyDict(num_layers=maps),
                               synthesis_kwargs=dnnlib.EasyDict(channel_base=cbase, channel_max=cmax,
                                                                num_fp16_res=fp16, conv_clamp=clamp))
    D_kwargs = dnnlib.EasyDict(channel_base=cbase, channel_max=cmax, num_fp16_res=fp16, conv_clamp=clamp,
                               mapping_kwargs=dnnlib.EasyDict(num_layers=maps),
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=mbstd))
    common = dict(c_dim=c_dim, img_resolution=res, img_channels=ch)
    G = networks.Generator(**G_kwargs, **common).train().requires_grad_(False)
    D = networks.Discriminator(**D_kwargs, **common).train().requires_grad_(False)
    randomize(G)
    randomize(D)
    G_ema = copy.deepcopy(G).eval()
    randomize(G_ema, scale=0.05, add=True)  # G_ema differs from G, so a swapped mapping shows
    pipe = augment.AugmentPipe(xflip=1, rotate90=1, xint=1, scale=1, rotate=1, aniso=1, xfrac=1, brightness=1,
                               contrast=1, lumaflip=1, hue=1, saturation=1).train().requires_grad_(False)
    pipe.p.copy_(torch.as_tensor(0.25))
    set_kwargs = dnnlib.EasyDict(class_name="training.dataset.ImageFolderDataset", path="/data/tiny.zip",
                                 use_labels=bool(c_dim), max_size=100, xflip=False, resolution=res)
    snapshot = dict(training_set_kwargs=dict(set_kwargs))  # as training_loop.py, snapshot step
    for name, module in [("G", G), ("D", D), ("G_ema", G_ema), ("augment_pipe", pipe)]:
        snapshot[name] = copy.deepcopy(module).eval().requires_grad_(False).cpu()

    g = torch.Generator().manual_seed(seed + 1)
    z = torch.randn(BATCH, z_dim, generator=g)
    labels = torch.arange(BATCH) % max(c_dim, 1)
    c = torch.nn.functional.one_hot(labels, c_dim).float() if c_dim else torch.zeros(BATCH, 0)
    images = torch.randn(BATCH, ch, res, res, generator=g)
    with torch.no_grad():
        nets = {k: snapshot[k] for k in ("G", "D", "G_ema")}
        expected = {
            "z": z, "labels": labels, "d_images": images,
            "g_images": nets["G"](z, c, noise_mode="const", force_fp32=True),
            "g_ema_images": nets["G_ema"](z, c, noise_mode="const", force_fp32=True),
            "d_logits": nets["D"](images, c, force_fp32=True).flatten(),
        }
    return snapshot, expected


def randomize(module: torch.nn.Module, scale: float = 0.2, add: bool = False) -> None:
    """Random values where the init is constant (biases, noise strengths, w_avg: N(0, scale^2));
    with `add`, a perturbation of every tensor. Resampling filters and noise images are kept."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith(("resample_filter", "noise_const")) or (not add and name.endswith(("weight", "const"))):
                continue  # weights and the const input already start as N(0, 1)
            t.add_(torch.randn_like(t) * scale) if add else t.copy_(torch.randn_like(t) * scale)


def with_placeholder_source(snapshot: dict) -> bytes:
    """pickle.dumps(snapshot) as the reference writes it, each record's module_src a placeholder."""
    from torch_utils import persistence

    saved = {cls: cls._orig_module_src for cls in persistence._decorators}
    try:
        for cls in saved:
            cls._orig_module_src = PLACEHOLDER
        return pickle.dumps(snapshot)
    finally:
        for cls, src in saved.items():
            cls._orig_module_src = src


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="stylegan2-ada-pytorch checkout")
    parser.add_argument("--commit", default="", help="its commit (default: git rev-parse HEAD in the checkout)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--real-out", type=Path, default=None, help="also write pickles with the real source here")
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    sys.path.insert(0, str(args.reference.resolve()))
    args.out.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        snapshot, expected = build(args.reference, spec, seed)
        (args.out / f"{name}.pkl").write_bytes(with_placeholder_source(snapshot))
        meta = {"reference": "NVlabs/stylegan2-ada-pytorch", "commit": commit, "torch": torch.__version__,
                "numpy": np.__version__, "config": repr(spec), "made_by": "tools/make_import_fixtures.py"}
        tensors = {k: v.contiguous() for k, v in expected.items()}
        save_file(tensors, str(args.out / f"{name}.expected.safetensors"), meta)
        if args.real_out:
            args.real_out.mkdir(parents=True, exist_ok=True)
            (args.real_out / f"{name}.pkl").write_bytes(pickle.dumps(snapshot))
        print(f"{name}: {(args.out / f'{name}.pkl').stat().st_size} bytes")


if __name__ == "__main__":
    main()
