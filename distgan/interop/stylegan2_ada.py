"""NVlabs StyleGAN2-ADA networks (as `safe_pickle` records) -> distgan's `stylegan2` networks.

`convert(records)` reads the pickle's G, D and G_ema records, infers the distgan model config
from their structure (resolution, channels, z/w dims, widths per stage, G's mapping depth,
conditioning, D's class-map depth, minibatch-std group, conv clamp, low-precision stages), builds
distgan's networks from it and fills every one of their tensors from the reference's, by name:

    mapping.fc{i}.*              -> mapping.layers.{i}.*      (G and D; mapping.embed, w_avg as is)
    synthesis.b{res}.*           -> synthesis.blocks.{log2(res) - 2}.*   (const, conv0/1, torgb)
    b{res}.fromrgb/conv0/conv1/skip -> blocks.{log2(R) - log2(res)}.from_rgb/conv0/conv1/skip
    b4.conv / fc / out           -> epilogue.conv / fc / out

Both store the same raw tensors (equalized-lr weights ~ N(0, 1) / lr_multiplier, gains applied at
run time), so no value is rescaled; the 0-d `noise_strength` becomes shape (1,). A tensor of
distgan's that stays unfilled, or one of the reference's left over, stops the import naming it,
and so does every structural choice distgan's networks do not make (StyleGAN3, `orig` or
`resnet` G, `orig` or `skip` D, another resampling filter, activation or mapping lr multiplier).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from distgan.errors import CheckpointError
from distgan.interop.safe_pickle import PersistentRecord
from distgan.models.stylegan2 import MAPPING_LR
from distgan.models.stylegan2_layers import fir_filter

NETWORKS = ("G", "D", "G_ema")
STYLEGAN3_MARKS = ("SynthesisInput",)
"""Record classes only StyleGAN3 has (its alias-free synthesis starts from Fourier features)."""


class UnsupportedNetworkError(CheckpointError):
    """The pickle is safe to read but holds a network distgan cannot represent."""

    label = "import refused"


@dataclass
class Converted:
    overrides: dict[str, Any]
    """distgan config keys (`model.*`, `data.resolution`, `data.channels`) of the networks."""
    num_classes: int
    states: dict[str, dict[str, Tensor]]
    """`G`, `D`, `G_ema` -> distgan state dict."""


def flatten(record: PersistentRecord, prefix: str = "") -> tuple[dict[str, Tensor], dict[str, PersistentRecord]]:
    """(reference state-dict tensors by dotted name, records by dotted module path), as
    `nn.Module.state_dict()` / `named_modules()` would name them (non-persistent buffers left out)."""
    tensors: dict[str, Tensor] = {}
    records = {prefix.rstrip("."): record}
    skip = set(record.attr("_non_persistent_buffers_set") or ())
    for group in ("_parameters", "_buffers"):
        for name, value in (record.attr(group) or {}).items():
            if value is not None and name not in skip:
                if not isinstance(value, Tensor):
                    raise UnsupportedNetworkError(f"{prefix}{name} of {record.class_name} is not a tensor")
                tensors[prefix + name] = value
    for name, child in record.modules.items():
        if child is None:
            continue
        if not isinstance(child, PersistentRecord):
            raise UnsupportedNetworkError(f"{prefix}{name} is a {type(child).__name__}, not an NVlabs network record")
        sub_tensors, sub_records = flatten(child, f"{prefix}{name}.")
        tensors.update(sub_tensors)
        records.update(sub_records)
    return tensors, records


def _refuse(what: str) -> UnsupportedNetworkError:
    return UnsupportedNetworkError(f"{what}; distgan's stylegan2 is StyleGAN2 config F (skip G, resnet D, "
                                   "lrelu, [1,3,3,1] resampling), so this network cannot be represented.")


def infer_config(G: PersistentRecord, D: PersistentRecord) -> tuple[dict[str, Any], int]:
    """The distgan config keys of the pickle's networks, and the class count; refuses what
    distgan's stylegan2 cannot build."""
    _, g_mods = flatten(G)
    _, d_mods = flatten(D)
    classes = {r.class_name for r in (*g_mods.values(), *d_mods.values())}
    if classes & set(STYLEGAN3_MARKS) or G.class_name != "Generator" or "synthesis" not in G.modules:
        if classes & set(STYLEGAN3_MARKS):
            raise UnsupportedNetworkError(
                "this is a StyleGAN3 pickle (its synthesis network starts from Fourier features, SynthesisInput, "
                "and uses alias-free filtered layers); distgan has no StyleGAN3 generator, so it cannot be imported.")
        raise UnsupportedNetworkError(f"G is a {G.class_name} record without a synthesis network: not a StyleGAN2-ADA "
                                      "generator (only NVlabs stylegan2-ada-pytorch pickles are read).")
    resolution, channels = int(G.attr("img_resolution")), int(G.attr("img_channels"))
    c_dim = int(G.attr("c_dim") or 0)
    if int(D.attr("img_resolution")) != resolution or int(D.attr("c_dim") or 0) != c_dim:
        raise UnsupportedNetworkError("G and D of the pickle disagree on resolution or classes")
    stages = int(math.log2(resolution)) - 1
    g_blocks = [g_mods[f"synthesis.b{4 * 2**i}"] for i in range(stages)]
    for block in g_blocks:
        if block.attr("architecture") != "skip":
            raise _refuse(f"G's synthesis block {block.attr('resolution')} has architecture "
                          f"{block.attr('architecture')!r}, distgan's G is 'skip'")
    for name, rec in g_mods.items():
        if rec.class_name == "SynthesisLayer" and not rec.attr("use_noise", True):
            raise _refuse(f"G's {name} has no noise input (use_noise=False)")
    d_blocks = [d_mods[f"b{resolution // 2**i}"] for i in range(stages - 1)]
    for block in d_blocks:
        if block.attr("architecture") != "resnet":
            raise _refuse(f"D's block {block.attr('resolution')} has architecture {block.attr('architecture')!r}, "
                          "distgan's D is 'resnet'")
    epilogue = d_mods["b4"]
    mbstd = d_mods.get("b4.mbstd")
    if mbstd is None or int(mbstd.attr("num_channels", 1)) != 1:
        raise _refuse("D's minibatch-std layer is absent or has more than one channel")
    g_widths = [int(b.modules["conv1"].attr("_parameters")["weight"].shape[0]) for b in g_blocks]
    d_widths = [int(d_mods[f"b{4 * 2**i}.conv0"].attr("_parameters")["weight"].shape[0]) for i in range(1, stages)]
    d_widths = [int(epilogue.attr("in_channels"))] + d_widths
    if g_widths != d_widths:
        raise _refuse(f"G's widths per stage {g_widths} differ from D's {d_widths} (distgan shares model.widths)")
    g_map, d_map = _mapping_layers(g_mods, "mapping"), _mapping_layers(d_mods, "mapping")
    _check_layers(g_mods, "G")
    _check_layers(d_mods, "D")
    clamps = {_clamp(r) for r in (*g_mods.values(), *d_mods.values()) if "conv_clamp" in r.state}
    clamps.discard(None)  # D's skip convs never clamp
    if len(clamps) > 1:
        raise _refuse(f"G and D clamp convolutions at different values {sorted(clamps)}")
    fp16 = sum(bool(b.attr("use_fp16")) for b in g_blocks)
    overrides = {
        "model.arch": "stylegan2", "data.resolution": resolution, "data.channels": channels,
        "model.z_dim": int(G.attr("z_dim")), "model.w_dim": int(G.attr("w_dim")), "model.widths": g_widths,
        "model.g_width": g_widths[-1], "model.d_width": d_widths[-1], "model.mapping_layers": g_map,
        # An unconditional D has no class map: distgan's default (NVlabs' 8) then stays.
        **({"model.d_mapping_layers": d_map} if c_dim else {}),
        "model.conditional": bool(c_dim), "model.mbstd_group": int(mbstd.attr("group_size")),
        "model.conv_clamp": float(next(iter(clamps), 0.0)), "model.lowp_stages": fp16,
    }
    return overrides, c_dim


def _mapping_layers(mods: dict[str, PersistentRecord], prefix: str) -> int:
    return sum(1 for name in mods if name.startswith(f"{prefix}.fc") and name.count(".") == 1)


def _clamp(record: PersistentRecord) -> float | None:
    value = record.attr("conv_clamp")
    return None if value is None else float(value)


def _check_layers(mods: dict[str, PersistentRecord], net: str) -> None:
    """Activations lrelu (none where distgan has none), the [1,3,3,1] filter, mapping lr 0.01."""
    fir = fir_filter().view(4, 4)
    for name, rec in mods.items():
        filt = (rec.attr("_buffers") or {}).get("resample_filter")
        if filt is not None and (filt.shape != fir.shape or not torch.allclose(filt.float(), fir, atol=1e-7)):
            raise _refuse(f"{net}'s {name} resamples with the filter {filt.flatten().tolist()[:4]}..., not [1,3,3,1]")
        act = rec.attr("activation")
        linear_ok = name.endswith((".skip", ".out", ".affine", "embed")) or name.endswith("torgb")
        if act is not None and act != "lrelu" and not (act == "linear" and linear_ok):
            raise _refuse(f"{net}'s {name} uses activation {act!r}")
        if rec.class_name == "FullyConnectedLayer" and name.startswith("mapping.fc"):
            if not math.isclose(float(rec.attr("bias_gain")), MAPPING_LR, rel_tol=1e-6):
                raise _refuse(f"{net}'s {name} has lr multiplier {rec.attr('bias_gain')}, distgan's is {MAPPING_LR}")


def map_generator(ref: dict[str, Tensor]) -> dict[str, Tensor]:
    """Reference G state dict -> distgan names (see the module docstring)."""
    out = {}
    for name, value in ref.items():
        parts = name.split(".")
        if parts[0] == "mapping" and parts[1].startswith("fc"):
            parts[1:2] = ["layers", parts[1][2:]]
        elif parts[0] == "synthesis":
            parts[1:2] = ["blocks", str(int(math.log2(int(parts[1][1:]))) - 2)]
            if parts[-1] == "noise_strength":
                value = value.reshape(1)
        out[".".join(parts)] = value
    return out


def map_discriminator(ref: dict[str, Tensor], resolution: int) -> dict[str, Tensor]:
    """Reference D state dict -> distgan names (see the module docstring)."""
    out = {}
    top = int(math.log2(resolution))
    for name, value in ref.items():
        parts = name.split(".")
        if parts[0] == "mapping" and parts[1].startswith("fc"):
            parts[1:2] = ["layers", parts[1][2:]]
        elif parts[0] == "b4":
            parts[0] = "epilogue"
        elif parts[0].startswith("b"):
            parts[0:1] = ["blocks", str(top - int(math.log2(int(parts[0][1:]))))]
            parts = [("from_rgb" if p == "fromrgb" else p) for p in parts]
        out[".".join(parts)] = value
    return out


def fill(module: torch.nn.Module, mapped: dict[str, Tensor], net: str) -> dict[str, Tensor]:
    """distgan's state dict of `module` with every tensor taken from `mapped` (fp32 copies);
    UnsupportedNetworkError naming what is missing, left over or misshapen."""
    mapped = {k: v for k, v in mapped.items() if not k.endswith("resample_filter")}  # checked: [1,3,3,1]
    target = module.state_dict()
    missing = [k for k in target if k not in mapped]
    extra = [k for k in mapped if k not in target]
    if missing or extra:
        raise _refuse(f"{net}: distgan's tensors {missing[:4]} have no counterpart in the pickle and the pickle's "
                      f"{extra[:4]} none in distgan")
    for key, value in target.items():
        if mapped[key].shape != value.shape:
            raise _refuse(f"{net}: {key} has shape {tuple(mapped[key].shape)} in the pickle, distgan builds "
                          f"{tuple(value.shape)}")
    return {k: mapped[k].to(target[k].dtype).contiguous() for k in target}


__all__ = ["Converted", "UnsupportedNetworkError", "NETWORKS", "flatten", "infer_config", "map_generator",
           "map_discriminator", "fill"]
