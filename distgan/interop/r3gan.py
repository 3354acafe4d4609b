"""brownvc/R3GAN networks -> distgan's `r3gan` networks, by name.

R3GAN's `training/networks.py` wraps `R3GAN.Networks.Generator`/`Discriminator` as `.Model`; its
state-dict names map onto distgan's as (i: stage, lowest resolution first in G, highest in D;
j: layer inside the stage):

    G  Model.MainLayers.0.Layers.0.Basis / .LinearLayer.weight  -> basis / modulate.weight
       Model.MainLayers.i.Layers.0.LinearLayer.Layer.weight      -> stages.i.0.proj.weight (i > 0)
       Model.MainLayers.0.Layers.j.<block>                       -> stages.0.{j-1}.<block> (no upsampler)
       Model.MainLayers.i.Layers.j.<block>                       -> stages.i.j.<block>
       Model.AggregationLayer.Layer.weight                       -> to_image.weight
    D  Model.ExtractionLayer.Layer.weight                        -> from_image.weight
       Model.MainLayers.i.Layers.j.<block>                       -> stages.i.j.<block>
       Model.MainLayers.i.Layers.B.LinearLayer.Layer.weight      -> stages.i.B.proj.weight
       Model.MainLayers.-1.Layers.B.Basis.weight / .LinearLayer.weight -> stages.-1.B.basis / .linear
    <block>: LinearLayer1/2/3.Layer.weight -> widen/grouped/narrow.weight, NonLinearity1/2.Bias -> act1/2.bias
    Model.EmbeddingLayer.weight (a bias-free Linear on one-hot labels) -> embed.weight, transposed

The resamplers' `Kernel` buffers hold no learned value: each is checked to be R3GAN's default
[1,2,1] interpolation filter (what distgan's resampling computes) and dropped. `infer_config`
reads distgan's model config from the tensors' shapes, `convert` maps a snapshot pickle's G, D
and G_ema (`safe_pickle` records) for `distgan import`. What distgan cannot represent (blocks or
group sizes that differ per stage, G's class embedding not z_dim wide, D's not its 4x4 width,
another resampling filter) is refused naming the tensor.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor

from distgan.config import load_config
from distgan.interop.safe_pickle import PersistentRecord
from distgan.interop.stylegan2_ada import NETWORKS, UnsupportedNetworkError, flatten
from distgan.models import build_models

BLOCK_PARTS = {"LinearLayer1.Layer.weight": "widen.weight", "LinearLayer2.Layer.weight": "grouped.weight",
               "LinearLayer3.Layer.weight": "narrow.weight", "NonLinearity1.Bias": "act1.bias",
               "NonLinearity2.Bias": "act2.bias"}
"""One residual block's tensors: R3GAN name -> distgan name."""

_LAYER = re.compile(r"Model\.MainLayers\.(\d+)\.Layers\.(\d+)\.(.+)")
SOURCE_FORMAT = "brownvc/R3GAN"
LICENSE_NOTE = (
    "The weights keep the license their publisher gave them: brownvc/R3GAN's code derives from NVIDIA's "
    "StyleGAN code under the NVIDIA Source Code License-NC (non-commercial use only), and its published networks "
    "and models trained with it may carry the same terms. Images derive from the training data the pickle was "
    "trained on; check its terms too.")
GENERATOR_CLASS = "training.networks.Generator"
DISCRIMINATOR_CLASS = "training.networks.Discriminator"


def _refuse(what: str) -> UnsupportedNetworkError:
    return UnsupportedNetworkError(f"{what}; distgan's r3gan cannot represent this R3GAN network.")


def interpolation_kernel() -> Tensor:
    """R3GAN's `CreateLowpassKernel([1, 2, 1], Inplace=False)`: [1,3,3,1] (x) [1,3,3,1] / 64."""
    taps = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(taps, taps)
    return kernel / kernel.sum()


def _stage_count(ref: dict[str, Tensor]) -> int:
    stages = {int(m.group(1)) for k in ref if (m := _LAYER.fullmatch(k))}
    if not stages or stages != set(range(max(stages) + 1)):
        raise _refuse(f"the network's stages are {sorted(stages)}, not 0..N-1 (Model.MainLayers.*)")
    return len(stages)


def map_state(ref: dict[str, Tensor], net: str) -> dict[str, Tensor]:
    """distgan's state dict (by name, values as given) of R3GAN network `ref` (its state-dict
    tensors, `Model.` prefix included); `net` is "G" or "D" (G_ema maps as G)."""
    generator = net != "D"
    last = _stage_count(ref) - 1
    out: dict[str, Tensor] = {}
    for key, value in ref.items():
        match = _LAYER.fullmatch(key)
        if match is None:
            simple = {"Model.AggregationLayer.Layer.weight": "to_image.weight",
                      "Model.ExtractionLayer.Layer.weight": "from_image.weight"}
            if key == "Model.EmbeddingLayer.weight":
                out["embed.weight"] = value.t()
            elif key in simple:
                out[simple[key]] = value
            else:
                raise _refuse(f"{net}'s tensor {key} has no counterpart in distgan")
            continue
        stage, layer, rest = int(match.group(1)), int(match.group(2)), match.group(3)
        if rest.endswith("Resampler.Kernel"):
            if value.shape != (4, 4) or not torch.allclose(value.float(), interpolation_kernel(), atol=1e-7):
                raise _refuse(f"{net}'s {key} is not R3GAN's default [1,2,1] interpolation filter")
            continue
        if rest in BLOCK_PARTS:
            index = layer - 1 if generator and stage == 0 else layer  # G's stage 0 has no upsampler
            out[f"stages.{stage}.{index}.{BLOCK_PARTS[rest]}"] = value
        elif generator and stage == 0 and layer == 0 and rest in ("Basis", "LinearLayer.weight"):
            out["basis" if rest == "Basis" else "modulate.weight"] = value
        elif rest == "LinearLayer.Layer.weight" and (layer == 0 if generator else stage < last):
            out[f"stages.{stage}.{layer}.proj.weight"] = value
        elif not generator and stage == last and rest in ("Basis.weight", "LinearLayer.weight"):
            out[f"stages.{stage}.{layer}.{'basis' if rest == 'Basis.weight' else 'linear'}.weight"] = value
        else:
            raise _refuse(f"{net}'s tensor {key} has no counterpart in distgan")
    return out


def _blocks(mapped: dict[str, Tensor], stage: int) -> list[int]:
    return sorted({int(k.split(".")[2]) for k in mapped if k.startswith(f"stages.{stage}.") and ".widen." in k})


def infer_config(g: dict[str, Tensor], d: dict[str, Tensor]) -> tuple[dict[str, Any], int]:
    """distgan config keys (`model.*`, `data.resolution`, `data.channels`) and the class count of
    R3GAN networks G and D (state-dict tensors); refuses what distgan's r3gan cannot build."""
    gm, dm = map_state(g, "G"), map_state(d, "D")
    stages = _stage_count(g)
    if _stage_count(d) != stages:
        raise _refuse(f"G has {stages} stages and D {_stage_count(d)}")
    widths = [int(gm[f"stages.{i}.{_blocks(gm, i)[0]}.widen.weight"].shape[1]) for i in range(stages)]
    d_widths = [int(dm[f"stages.{i}.0.widen.weight"].shape[1]) for i in range(stages)]
    if d_widths != widths[::-1]:
        raise _refuse(f"D's widths {d_widths} are not G's {widths} reversed (distgan shares model.widths)")
    blocks = {len(_blocks(m, i)) for m in (gm, dm) for i in range(stages)}
    wides = {(int(v.shape[0]) // int(v.shape[1])) for k, v in {**gm, **dm}.items() if k.endswith("widen.weight")}
    groups = {int(v.shape[1]) for k, v in {**gm, **dm}.items() if k.endswith("grouped.weight")}
    for what, values in (("residual blocks per stage", blocks), ("expansion factors", wides),
                         ("group sizes of the grouped convs", groups)):
        if len(values) != 1:
            raise _refuse(f"the stages have different {what} {sorted(values)} (distgan: one value for all)")
    z_in = int(gm["modulate.weight"].shape[1])
    embed = gm.get("embed.weight")
    num_classes = int(embed.shape[0]) if embed is not None else 0
    z_dim = z_in - (int(embed.shape[1]) if embed is not None else 0)
    if embed is not None and embed.shape[1] != z_dim:
        raise _refuse(f"G embeds classes to {embed.shape[1]} dims, distgan's to z_dim ({z_dim})")
    d_embed = dm.get("embed.weight")
    if (d_embed is None) != (embed is None) or (d_embed is not None and d_embed.shape != (num_classes, widths[0])):
        raise _refuse(f"D's class embedding {None if d_embed is None else tuple(d_embed.shape)} is not "
                      f"({num_classes}, {widths[0]}) (distgan's D projects on its 4x4 width)")
    overrides = {
        "model.arch": "r3gan", "data.resolution": 4 * 2 ** (stages - 1),
        "data.channels": int(gm["to_image.weight"].shape[0]),
        "model.z_dim": z_dim, "model.widths": widths, "model.g_width": widths[-1], "model.d_width": widths[-1],
        "model.blocks_per_stage": blocks.pop(), "model.expansion": wides.pop(), "model.group_size": groups.pop(),
        "model.conditional": bool(num_classes),
    }
    return overrides, num_classes


def bf16_stages(G: PersistentRecord) -> int:
    """How many of the pickled G's stages run in bf16 (its `FP16Stages`: each stage's `DataType`)."""
    _, records = flatten(G)
    dtypes = [r.attr("DataType") for name, r in records.items() if re.fullmatch(r"Model\.MainLayers\.\d+", name)]
    return sum(dtype == torch.bfloat16 for dtype in dtypes)


def is_r3gan(data: Any) -> bool:
    """Whether a pickle's top level (as `safe_pickle` reads it) holds R3GAN networks."""
    return isinstance(data, dict) and isinstance(data.get("G"), PersistentRecord) and \
        data["G"].class_name == GENERATOR_CLASS


def convert(data: dict[str, Any]) -> tuple[dict[str, Any], int, dict[str, dict[str, Tensor]]]:
    """(config overrides, class count, distgan state dicts of G, D, G_ema) of an R3GAN snapshot
    pickle read by `safe_pickle` (its networks as `ModuleRecord`s)."""
    for net, cls in (("G", GENERATOR_CLASS), ("D", DISCRIMINATOR_CLASS), ("G_ema", GENERATOR_CLASS)):
        record = data.get(net)
        if not isinstance(record, PersistentRecord) or record.class_name != cls:
            found = record.class_name if isinstance(record, PersistentRecord) else type(record).__name__
            raise UnsupportedNetworkError(f"the pickle's {net} is {found}, not R3GAN's {cls}")
    refs = {net: flatten(data[net])[0] for net in NETWORKS}
    overrides, num_classes = infer_config(refs["G"], refs["D"])
    G = data["G"]
    if (G.attr("img_resolution"), G.attr("c_dim")) != (overrides["data.resolution"], num_classes):
        raise _refuse(f"G says resolution {G.attr('img_resolution')} and {G.attr('c_dim')} classes, its tensors "
                      f"{overrides['data.resolution']} and {num_classes}")
    lowp = bf16_stages(G)
    if lowp:  # a pickle with no bf16 stage trained in fp32: any count serves, the default is kept
        overrides["model.lowp_stages"] = lowp
    return overrides, num_classes, {net: fill(overrides, num_classes, map_state(refs[net], net), net)
                                    for net in NETWORKS}


def fill(overrides: dict[str, Any], num_classes: int, mapped: dict[str, Tensor], net: str) -> dict[str, Tensor]:
    """distgan's state dict of `net` built from `overrides`, every tensor taken from `mapped`;
    anything missing, left over or misshapen refused naming it."""
    cfg = load_config(None, overrides)
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, num_classes)
    module = D if net == "D" else G
    try:
        module.load_state_dict(mapped)
    except RuntimeError as e:
        raise _refuse(f"{net} does not fit distgan's r3gan: {e}") from None
    return {k: v.contiguous() for k, v in module.state_dict().items()}


__all__ = ["map_state", "infer_config", "convert", "fill", "is_r3gan", "SOURCE_FORMAT", "LICENSE_NOTE",
           "bf16_stages", "interpolation_kernel"]
