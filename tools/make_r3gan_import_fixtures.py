"""Make the `distgan import` test fixtures for R3GAN pickles from a local checkout of brownvc/R3GAN.

    git clone https://github.com/brownvc/R3GAN /tmp/r3gan
    PYTHONPATH=/tmp/r3gan:. .venv/bin/python tools/make_r3gan_import_fixtures.py --reference /tmp/r3gan

For the conditional 32 px configuration of `tools.golden.r3gan_nets.CONFIGS` (the unconditional
one is held to the reference by the golden tests; one pickle keeps the fixtures small) this
builds the reference G and D at tiny widths on CPU with its presets' bf16 stages (`FP16Stages`),
every parameter random, G_ema a perturbed copy of G (so a swapped mapping shows), and writes:

- `tests/fixtures/r3gan_import/<name>.pkl`: the snapshot exactly as R3GAN's training loop pickles
  it (`training/training_loop.py`: `pickle.dump(dict(G, D, G_ema, training_set_kwargs, cur_nimg,
  D_opt_state, G_opt_state))`, each network deep-copied, eval, no grad, on CPU). R3GAN's networks
  are plain `nn.Module`s, not `torch_utils.persistence` classes: the pickle names their classes
  (`training.networks.Generator`, `R3GAN.Networks.*`, torch.nn layers) and holds their `__dict__`s
  and tensors, but no source code, so nothing of NVIDIA's or R3GAN's code is in the file.
- `<name>.expected.safetensors`: fixed z, labels and images and the reference's fp32 outputs
  (every stage in fp32): G and G_ema images, D's logits. Metadata: reference, commit, versions.

Nothing here is imported by distgan or its tests.
"""

from __future__ import annotations

import argparse
import copy
import pickle
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "r3gan_import"
NAMES = ("cond32",)
BATCH = 2  # of the expected outputs


def snapshot(spec: dict, seed: int) -> tuple[dict, dict[str, torch.Tensor]]:
    """(the snapshot dict as R3GAN pickles it, expected fp32 outputs) for one configuration."""
    from tools.golden.r3gan_nets import build_reference, inputs, preset_bf16_stages, set_bf16_stages

    lowp = preset_bf16_stages(len(spec["widths"]))
    G, D = build_reference(spec, seed, bf16_stages=lowp)
    G_ema = copy.deepcopy(G)
    with torch.no_grad():
        for p in G_ema.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    opts = {}
    for name, net in (("D", D), ("G", G)):  # one Adam step each, so the optimizer states hold tensors
        params = [p.requires_grad_(True) for p in net.parameters()]
        opt = torch.optim.Adam(params, lr=1e-4, betas=(0.0, 0.99), eps=1e-8)
        for p in params:
            p.grad = torch.randn_like(p) * 1e-3
        opt.step()
        opts[f"{name}_opt_state"] = copy.deepcopy(opt.state_dict())
        net.requires_grad_(False)
    set_kwargs = dict(class_name="training.dataset.ImageFolderDataset", path="/data/tiny.zip",
                      use_labels=bool(spec["c_dim"]), max_size=100, xflip=False, resolution=spec["resolution"])
    data = dict(G=G, D=D, G_ema=G_ema, training_set_kwargs=set_kwargs, cur_nimg=12000, **opts)
    for key, value in data.items():  # as training_loop.py, snapshot step
        if isinstance(value, torch.nn.Module):
            data[key] = copy.deepcopy(value).eval().requires_grad_(False).cpu()
    x = {k: v[:BATCH] for k, v in inputs(spec, seed + 1).items()}
    set_bf16_stages(G, D, 0)
    set_bf16_stages(G_ema, D, 0)
    c = x["c"] if spec["c_dim"] else None
    with torch.no_grad():
        expected = {"z": x["z"], "labels": x["labels"], "d_images": x["d_images"],
                    "g_images": G(x["z"], c), "g_ema_images": G_ema(x["z"], c), "d_logits": D(x["d_images"], c)}
    return data, expected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", required=True, type=Path, help="brownvc/R3GAN checkout")
    parser.add_argument("--commit", default="", help="its commit (default: git rev-parse HEAD in the checkout)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    commit = args.commit or subprocess.run(["git", "-C", str(args.reference), "rev-parse", "HEAD"],
                                           capture_output=True, text=True).stdout.strip() or "unknown"
    sys.path[:0] = [str(args.reference.resolve()), str(ROOT)]
    from tools.golden.common import write_fixture
    from tools.golden.r3gan_nets import CONFIGS

    args.out.mkdir(parents=True, exist_ok=True)
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        if name not in NAMES:
            continue
        data, expected = snapshot(spec, seed)
        (args.out / f"{name}.pkl").write_bytes(pickle.dumps(data))
        write_fixture(args.out / f"{name}.expected.safetensors", expected, "brownvc/R3GAN", commit, config=spec,
                      made_by="tools/make_r3gan_import_fixtures.py")
        print(f"{name}: {(args.out / f'{name}.pkl').stat().st_size} bytes")


if __name__ == "__main__":
    main()
