"""Golden fixtures of R3GAN's networks (brownvc/R3GAN `training/networks.py` around `R3GAN/Networks.py`).

    .venv/bin/python tools/make_golden_fixtures.py --r3gan /tmp/r3gan --only r3gan_nets

For each configuration in `CONFIGS` (tiny widths; conditional and not; 16 and 32 px) this builds
the reference G and D on CPU (its bias_act and upfirdn2d ops fall back to their PyTorch paths),
gives every parameter a random value (the zero-initialized last conv of each residual branch and
the biases too, so that every tensor shows in the output; the resamplers' `Kernel` buffers are
fixed filters, not weights, and stay R3GAN's), and writes `<name>.safetensors` holding:

- `G.<name>` / `D.<name>`: the reference state dicts, under the reference's own names (the test
  maps them into distgan through `distgan.interop.r3gan.map_state`, as `distgan import` does);
- `z`, `c` (one-hot labels, or (N, 0)), `labels`, `d_images`: fixed inputs;
- `g_images`, `d_logits`, `d_logits_fake` (D on `g_images`): the reference's fp32 outputs (no
  stage in bf16);
- `g_images_bf16`, `d_logits_bf16`: the same with the reference's `FP16Stages` as its presets set
  them (the `bf16_stages` highest-resolution stages of G and D in bf16, the others in fp32).

Metadata: the reference and commit, torch/numpy versions, and the configuration.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import torch

from tools.golden.common import parse_args, write_fixture

REFERENCE = "brownvc/R3GAN"
BATCH = 4
CONFIGS = {
    "uncond16": dict(resolution=16, widths=[8, 8, 4], blocks=2, expansion=2, group_size=4, z_dim=8, c_dim=0),
    "cond32": dict(resolution=32, widths=[16, 8, 8, 4], blocks=1, expansion=3, group_size=4, z_dim=6, c_dim=3),
}
"""name -> configuration; `widths` from 4x4 up, as distgan's model.widths (R3GAN's G WidthPerStage)."""


def preset_bf16_stages(stages: int) -> int:
    """How many stages R3GAN's presets run in bf16: 3 of 4 (CIFAR10, ImageNet-32), 4 of 5 (FFHQ-64,
    ImageNet-64), 4 of 7 (FFHQ-256); i.e. min(4, stages - 1)."""
    return min(4, stages - 1)


def ensure_pkg_resources() -> None:
    """R3GAN's torch_utils imports `pkg_resources.parse_version` (setuptools, absent from the venv):
    give it `packaging.version.parse` under that name, in this process only."""
    if "pkg_resources" not in sys.modules and importlib.util.find_spec("pkg_resources") is None:
        from packaging.version import parse

        sys.modules["pkg_resources"] = types.SimpleNamespace(parse_version=parse)  # type: ignore[assignment]


def reference_kwargs(spec: dict, bf16_stages: int = 0) -> tuple[dict, dict]:
    """(G_kwargs, D_kwargs) as R3GAN's train.py builds them for a preset, from `spec`."""
    widths, n = spec["widths"], len(spec["widths"])
    cardinality = [w * spec["expansion"] // spec["group_size"] for w in widths]
    fp16 = [-1 - i for i in range(bf16_stages)]
    common = dict(c_dim=spec["c_dim"], img_resolution=spec["resolution"], ExpansionFactor=spec["expansion"])
    g = dict(NoiseDimension=spec["z_dim"], WidthPerStage=widths, CardinalityPerStage=cardinality,
             BlocksPerStage=[spec["blocks"]] * n, FP16Stages=fp16, **common)
    d = dict(WidthPerStage=widths[::-1], CardinalityPerStage=cardinality[::-1], BlocksPerStage=[spec["blocks"]] * n,
             FP16Stages=[x + len(fp16) for x in fp16], **common)
    if spec["c_dim"]:  # as train.py's conditional presets
        g["ConditionEmbeddingDimension"], d["ConditionEmbeddingDimension"] = spec["z_dim"], widths[0]
    return g, d


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random, scaled by 1/sqrt(fan in) so activations stay O(1); buffers kept."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith(".Basis") and p.dim() == 3:  # G's 4x4 basis: N(0, 1) as its init
                scale = 1.0
            elif p.dim() == 1:  # biases
                scale = 0.2
            else:
                scale = 1.0 / p[0].numel() ** 0.5
            p.copy_(torch.randn(p.shape, generator=gen) * scale)


def build_reference(spec: dict, seed: int, bf16_stages: int = 0) -> tuple[torch.nn.Module, torch.nn.Module]:
    """R3GAN's training.networks G and D for `spec`, every parameter random (from `seed`)."""
    ensure_pkg_resources()
    from training import networks

    g_kwargs, d_kwargs = reference_kwargs(spec, bf16_stages)
    G = networks.Generator(**g_kwargs).eval().requires_grad_(False)
    D = networks.Discriminator(**d_kwargs).eval().requires_grad_(False)
    randomize(G, seed)
    randomize(D, seed + 1000)
    return G, D


def set_bf16_stages(G: torch.nn.Module, D: torch.nn.Module, count: int) -> None:
    """What R3GAN's wrappers do with FP16Stages: the `count` highest-resolution stages in bf16."""
    for nets, stages in ((G.Model.MainLayers, range(-count, 0)), (D.Model.MainLayers, range(count))):
        for i, stage in enumerate(nets):
            stage.DataType = torch.float32
        for i in stages:
            nets[i].DataType = torch.bfloat16


def inputs(spec: dict, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    res, c_dim = spec["resolution"], spec["c_dim"]
    labels = torch.arange(BATCH) % max(c_dim, 1)
    c = torch.nn.functional.one_hot(labels, c_dim).float() if c_dim else torch.zeros(BATCH, 0)
    return {"z": torch.randn(BATCH, spec["z_dim"], generator=gen), "labels": labels, "c": c,
            "d_images": torch.randn(BATCH, 3, res, res, generator=gen)}


def outputs(G: torch.nn.Module, D: torch.nn.Module, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    c = x["c"] if x["c"].shape[1] else None
    with torch.no_grad():
        g_images = G(x["z"], c).float()
        return {"g_images": g_images, "d_logits": D(x["d_images"], c).float(), "d_logits_fake": D(g_images, c).float()}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        G, D = build_reference(spec, seed)
        x = inputs(spec, seed + 1)
        expected = outputs(G, D, x)
        lowp = preset_bf16_stages(len(spec["widths"]))
        set_bf16_stages(G, D, lowp)
        bf16 = outputs(G, D, x)
        tensors = {**x, **expected, "g_images_bf16": bf16["g_images"], "d_logits_bf16": bf16["d_logits"]}
        tensors.update({f"G.{k}": v for k, v in G.state_dict().items()})
        tensors.update({f"D.{k}": v for k, v in D.state_dict().items()})
        path = args.out / f"{name}.safetensors"
        write_fixture(path, tensors, REFERENCE, args.commit, config=spec, bf16_stages=lowp,
                      made_by="tools/golden/r3gan_nets.py")
        print(f"{name}: {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
