"""Golden fixtures for distgan's `stylegan2` networks from NVlabs/stylegan2-ada-pytorch.

    .venv/bin/python tools/make_golden_fixtures.py --stylegan2-ada /tmp/sg2ada --only stylegan2_nets

For each configuration in `CONFIGS` this builds the reference's `training.networks.Generator` and
`Discriminator` at tiny widths on CPU as its train.py does (G 'skip', D 'resnet'; D's class map
keeps the reference's default depth of 8, which train.py never changes), gives every parameter and
buffer random values (biases, noise strengths, w_avg and noise_const matter), copies them into
distgan's networks by name with `distgan.interop.stylegan2_ada` (the importer's own mapping), and
writes `tests/fixtures/golden/stylegan2_nets/<name>.safetensors`:

- `G.*`, `D.*`: distgan's state dicts (so the test loads them without the reference);
- inputs `z`, `labels`, `d_images` (batch 4);
- the reference's fp32 outputs (`force_fp32=True`): `ws` and `ws_trunc` (mapping, psi 1 and psi
  `PSI` on the first `CUTOFF` rows), `g_images` and (up to 32 px) `g_images_trunc` (noise_mode
  'const'), `d_logits`;
- where the configuration has fp16 blocks (`num_fp16_res`, with conv_clamp 256 as NVlabs pairs
  them): the reference's own low-precision outputs `g_images_fp16`, `d_logits_fp16` (its blocks cast
  to fp16 themselves; this runs on CPU), and in the metadata their max error against its fp32 ones.

Metadata: the reference and commit (common.write_fixture), the distgan config overrides that build
the same networks (`overrides`), the truncation settings, and the reference's fp16 errors.
"""

from __future__ import annotations

from pathlib import Path

import torch

from distgan.config import load_config
from distgan.interop.stylegan2_ada import fill, map_discriminator, map_generator
from distgan.models import build_models
from tools.golden.common import parse_args, write_fixture
from tools.make_import_fixtures import randomize

REFERENCE = "NVlabs/stylegan2-ada-pytorch"
BATCH = 4
PSI, CUTOFF = 0.7, 4
TRUNCATED_IMAGES_UP_TO = 32
"""Truncated G images are stored up to this resolution (the fixtures stay small; `ws_trunc`, which
is all truncation changes, is stored for every configuration)."""
CONFIGS = {
    # name: (resolution, channels, c_dim, z_dim, w_dim, channel_max, G mapping layers, mbstd group,
    #        num_fp16_res, conv_clamp). channel_base = channel_max x resolution: every stage at channel_max.
    # Groups of 2 in a batch of 4 tell NVlabs' strided groups ({0,2}, {1,3}) from consecutive ones.
    "uncond16_rgb": (16, 3, 0, 16, 16, 8, 2, 2, 0, None),
    "cond32_rgb_fp16": (32, 3, 3, 8, 12, 8, 2, 2, 2, 256),
    "cond64_gray_fp16": (64, 1, 4, 8, 8, 8, 3, 4, 4, 256),
}

def overrides_for(spec: tuple) -> dict:
    """The distgan config keys that build the same networks (D's class map: distgan's default 8)."""
    res, ch, c_dim, z_dim, w_dim, cmax, maps, mbstd, fp16, clamp = spec
    stages = res.bit_length() - 2  # 4x4 .. res
    return {"model.arch": "stylegan2", "data.resolution": res, "data.channels": ch, "model.conditional": bool(c_dim),
            "model.z_dim": z_dim, "model.w_dim": w_dim, "model.widths": [cmax] * stages, "model.mapping_layers": maps,
            "model.mbstd_group": mbstd, "model.mbstd_layout": "strided", "model.lowp_stages": fp16,
            "model.conv_clamp": float(clamp or 0), "model.noise_mode": "const"}


def reference_networks(spec: tuple, seed: int):
    """The reference's G and D for `spec`, every tensor random, in eval mode."""
    import dnnlib
    from training import networks

    res, ch, c_dim, z_dim, w_dim, cmax, maps, mbstd, fp16, clamp = spec
    torch.manual_seed(seed)
    common = dict(c_dim=c_dim, img_resolution=res, img_channels=ch)
    G = networks.Generator(z_dim=z_dim, w_dim=w_dim, mapping_kwargs=dnnlib.EasyDict(num_layers=maps),
                           synthesis_kwargs=dnnlib.EasyDict(channel_base=cmax * res, channel_max=cmax,
                                                            num_fp16_res=fp16, conv_clamp=clamp), **common)
    D = networks.Discriminator(channel_base=cmax * res, channel_max=cmax, num_fp16_res=fp16, conv_clamp=clamp,
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=mbstd), **common)
    for net in (G, D):
        randomize(net.requires_grad_(False))
    return G.eval(), D.eval()


def make(spec: tuple, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(fixture tensors, extra metadata) for one configuration."""
    res, ch, c_dim, z_dim = spec[:4]
    G, D = reference_networks(spec, seed)
    overrides = overrides_for(spec)
    cfg = load_config(None, overrides)
    ours_G, ours_D = build_models(cfg.model, res, ch, c_dim)
    tensors = {f"G.{k}": v for k, v in fill(ours_G, map_generator(G.state_dict()), "G").items()}
    tensors.update({f"D.{k}": v for k, v in fill(ours_D, map_discriminator(D.state_dict(), res), "D").items()})

    g = torch.Generator().manual_seed(1000 + seed)
    z = torch.randn(BATCH, z_dim, generator=g)
    labels = torch.arange(BATCH) % max(c_dim, 1)
    c = torch.nn.functional.one_hot(labels, c_dim).float() if c_dim else torch.zeros(BATCH, 0)
    images = torch.randn(BATCH, ch, res, res, generator=g)
    tensors.update(z=z, labels=labels, d_images=images)
    meta = {"config": list(spec), "overrides": overrides, "psi": PSI, "cutoff": CUTOFF, "batch": BATCH}
    with torch.no_grad():
        tensors["ws"] = G.mapping(z, c)
        tensors["ws_trunc"] = G.mapping(z, c, truncation_psi=PSI, truncation_cutoff=CUTOFF)
        tensors["g_images"] = G(z, c, noise_mode="const", force_fp32=True)
        if res <= TRUNCATED_IMAGES_UP_TO:
            tensors["g_images_trunc"] = G(z, c, truncation_psi=PSI, truncation_cutoff=CUTOFF, noise_mode="const",
                                          force_fp32=True)
        tensors["d_logits"] = D(images, c, force_fp32=True).flatten()
        if spec[8]:  # num_fp16_res: the reference's own fp16 blocks, as it trains
            g16 = G(z, c, noise_mode="const").float()
            d16 = D(images, c).float().flatten()
            tensors.update(g_images_fp16=g16, d_logits_fp16=d16)
            meta["reference_fp16_error"] = {
                "g_images": (g16 - tensors["g_images"]).abs().max().item(),
                "d_logits": (d16 - tensors["d_logits"]).abs().max().item()}
    return tensors, meta


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        tensors, meta = make(spec, seed)
        path = Path(args.out) / f"{name}.safetensors"
        write_fixture(path, tensors, REFERENCE, args.commit, made_by="tools/golden/stylegan2_nets.py", **meta)
        print(f"{name}: {path.stat().st_size} bytes; reference fp16 error {meta.get('reference_fp16_error')}")


if __name__ == "__main__":
    main()
