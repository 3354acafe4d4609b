"""`import_pickle`: a foreign network pickle -> an ordinary distgan export folder.

The pickle is read by `safe_pickle` (nothing in it runs), converted by the format's module
(`stylegan2_ada`: NVlabs stylegan2-ada-pytorch, StyleGAN3 refused naming why; `r3gan`: brownvc/R3GAN,
chosen by the class of the pickle's G), and written as a
`distgan export` (`distgan.export.folder`) that also carries the raw G and D:

    model.safetensors   G_ema (what `distgan sample` and `distgan.load_generator` draw from)
    G.safetensors       the raw generator   } so `train.init_from=DIR` fine-tunes all three
    D.safetensors       the discriminator   } networks, as from a distgan checkpoint
    config.json         the inferred distgan config, the source file and its sha256
    README.md           model card naming the source and its license
    samples.png         a grid from fixed latents

Before anything is written, the converted G_ema is loaded into a freshly built distgan network
and run, so an export that `distgan sample` could not read is never produced.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

import distgan
from distgan.checkpoint.files import sha256
from distgan.config import load_config
from distgan.errors import CheckpointError
from distgan.export.build import publish_export
from distgan.export.folder import (CONFIG_FILE, FORMAT, FORMAT_VERSION, GRID_FILE, RAW_WEIGHT_FILES,
                                   WEIGHTS_FILE)
from distgan.interop import r3gan
from distgan.interop.safe_pickle import PersistentRecord, load_records
from distgan.interop.stylegan2_ada import (NETWORKS, UnsupportedNetworkError, fill, flatten, infer_config,
                                           map_discriminator, map_generator)
from distgan.models import build_models
from distgan.sampling import grid_layout, load_generator

SOURCE_FORMAT = "stylegan2-ada-pytorch"
LICENSE_NOTE = (
    "The weights keep the license their publisher gave them: NVIDIA's official StyleGAN2-ADA networks are "
    "under the NVIDIA Source Code License-NC (non-commercial use only), and models trained with NVIDIA's code "
    "may carry the same terms. Images derive from the training data the pickle was trained on; check its terms too.")


def read_networks(pkl: str | Path) -> dict[str, Any]:
    """The pickle's top-level dict with G, D and G_ema as records; refuses other shapes."""
    pkl = Path(pkl)
    if not pkl.is_file():
        raise CheckpointError(f"{pkl} does not exist or is not a file")
    with open(pkl, "rb") as f:
        data = load_records(f)
    if not isinstance(data, dict) or not all(isinstance(data.get(k), PersistentRecord) for k in NETWORKS):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise UnsupportedNetworkError(f"{pkl} holds {keys}, not the G, D and G_ema networks of an NVlabs network "
                                      "pickle (network-snapshot-*.pkl)")
    return data


def convert_pickle(pkl: str | Path) -> tuple[dict[str, Any], int, dict[str, dict], dict[str, Any]]:
    """(config overrides, class count, distgan state dicts of G/D/G_ema, training_set_kwargs)."""
    data = read_networks(pkl)
    kwargs = data.get("training_set_kwargs")
    if r3gan.is_r3gan(data):  # dispatch on the pickle's classes: one converter per source format
        return (*r3gan.convert(data), dict(kwargs) if isinstance(kwargs, dict) else {})
    overrides, num_classes = infer_config(data["G"], data["D"])
    cfg = load_config(None, overrides)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, num_classes)
    states = {}
    for net in NETWORKS:
        ref, _ = flatten(data[net])
        if net == "D":
            states[net] = fill(D, map_discriminator(ref, cfg.data.resolution), net)
        else:
            states[net] = fill(G, map_generator(ref), net)
    kwargs = data.get("training_set_kwargs")
    return overrides, num_classes, states, dict(kwargs) if isinstance(kwargs, dict) else {}


def import_pickle(pkl: str | Path, out: str | Path, n: int = 16, seed: int = 0, force: bool = False) -> Path:
    """Write the export folder `out` from network pickle `pkl` (see the module docstring)."""
    pkl, out = Path(pkl), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise CheckpointError(f"{out} already exists and is not empty: choose another --out, or --force to replace it.")
    overrides, num_classes, states, set_kwargs = convert_pickle(pkl)
    cfg = load_config(None, {**overrides, "data.source": str(set_kwargs.get("path") or pkl),
                             "train.name": out.name, "model.noise_mode": "random"})
    kimg = _snapshot_kimg(pkl.name)
    arch = cfg.model.arch
    source, license_note = ((r3gan.SOURCE_FORMAT, r3gan.LICENSE_NOTE) if arch == "r3gan"
                            else (SOURCE_FORMAT, LICENSE_NOTE))
    meta = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "distgan_version": distgan.__version__,
        "generator": {"arch": arch, "resolution": cfg.data.resolution, "channels": cfg.data.channels,
                      "z_dim": cfg.model.z_dim, "num_classes": num_classes,
                      "class_names": [str(i) for i in range(num_classes)]},
        "step": 0, "d_step": 0, "nimg": int(kimg * 1000), "kimg": kimg, "world_size": 1,
        "source_checkpoint": str(pkl), "samples": {"file": GRID_FILE, "n": 0, "per_row": 0, "seed": seed},
        "metrics": {}, "data": {"source": cfg.data.source, "license": license_note, "license_id": "other"},
        "imported_from": {"format": source, "file": pkl.name, "sha256": sha256(pkl),
                          "training_set_kwargs": _plain(set_kwargs)},
        "config": cfg.to_dict(),
    }
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(states["G_ema"], str(tmp / WEIGHTS_FILE))
        for net, name in RAW_WEIGHT_FILES.items():
            save_file(states[net], str(tmp / name))
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
        G, _, _ = load_generator(tmp)  # the export reads back as distgan reads any export
        n, per_row = grid_layout(n, num_classes)
        meta["samples"].update(n=n, per_row=per_row)
        publish_export(tmp, out, G, n, per_row, seed, meta, import_card(meta, out.name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def import_card(meta: dict[str, Any], name: str) -> str:
    """README.md of an imported export: where it came from, its license, how to use it."""
    gen, src, model = meta["generator"], meta["imported_from"], meta["config"]["model"]
    classes = f"{gen['num_classes']} classes" if gen["num_classes"] else "unconditional"
    shape = (f"{model['blocks_per_stage']} residual blocks per stage" if gen["arch"] == "r3gan"
             else f"mapping {model['mapping_layers']} layers")
    return "\n".join([
        "---", "library_name: distgan", "license: other",
        f"tags: [distgan, gan, {gen['arch']}, image-generation{', class-conditional' if gen['num_classes'] else ''}]",
        "pipeline_tag: unconditional-image-generation", "---", "",
        f"# {name}", "",
        f"A {'R3GAN' if gen['arch'] == 'r3gan' else 'StyleGAN2'} network imported from the {src['format']} pickle "
        f"`{src['file']}` (sha256 `{src['sha256']}`) "
        f"with `distgan import`: {gen['resolution']}x{gen['resolution']}, {gen['channels']} channel(s), {classes}, "
        f"widths {model['widths']}, {shape}, z_dim {model['z_dim']}.", "",
        f"![samples from fixed latents (seed {meta['samples']['seed']})]({meta['samples']['file']})", "",
        "## License", "", meta["data"]["license"], "",
        "## Use", "",
        "`model.safetensors` is the EMA generator, `G.safetensors` and `D.safetensors` the raw generator and the "
        "discriminator. `config.json` holds the distgan config the networks were built with.", "",
        "```bash", f"distgan sample --ckpt {name} --n 16 --out grid.png",
        "distgan train --config CONFIG.yaml train.init_from=" + name + "   # CONFIG.yaml: the `model` section of "
        "config.json, your data", "```", ""])


def _snapshot_kimg(filename: str) -> float:
    """NVlabs names snapshots network-snapshot-<kimg>.pkl; 0 when the name says nothing."""
    match = re.search(r"snapshot-(\d+)", filename)
    return float(match.group(1)) if match else 0.0


def _plain(value: Any) -> Any:
    """JSON-safe copy (numbers, strings, lists, dicts; anything else as its repr)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value if value is None or isinstance(value, (bool, int, float, str)) else repr(value)


__all__ = ["import_pickle", "convert_pickle", "read_networks", "import_card", "SOURCE_FORMAT"]
