"""Golden fixtures for StyleGAN2-ADA's losses: NVlabs' `StyleGAN2Loss.accumulate_gradients` per phase.

Run through `tools/make_golden_fixtures.py --only losses_stylegan2` (the reference checkout on
PYTHONPATH). For an unconditional and a conditional configuration (16 px, widths 8, batch 4,
minibatch-std group 4 = the batch, so the group layout does not matter) this builds the
reference G and D on CPU, randomizes their constant-initialized tensors, and runs each phase the
way the reference training loop does (the trained network's `requires_grad` on, the other's off,
gain = the phase's interval): Gmain, Greg (path length), Dmain, Dreg (R1), and Dboth (R1 in the D
step). It records, per phase,
the loss value (what the reference reports as Loss/G/loss, Loss/G/reg, Loss/D/loss, Loss/D/reg,
batch means), the gradient of every parameter of the trained network after the backward, and
for Greg the updated pl_mean. Weights and gradients are written under distgan's names (the
mapping of `distgan/interop/stylegan2_ada.py`), so the test needs no reference.

Random draws are fixed inputs: z, fake labels and the path-length directions are recorded and
fed to both sides; G's noise inputs use the constant buffers (noise_mode='const'); augmentation
is off. Style mixing is off, except in `uncond_mix` (probability 0.9): its draws happen inside G's
forward (cutoff, coin, second z: torch's global RNG, in the same order on both sides), so each
phase starts from a recorded seed (`<phase>.seed`), and the path-length directions, drawn after
them, are captured as the reference draws them.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import pickle
import tempfile
from pathlib import Path

import torch

from tools.golden.common import parse_args, write_fixture

REFERENCE = "NVlabs/stylegan2-ada-pytorch"
BATCH, RES, Z_DIM, W_DIM, MAPPING, WIDTH, MBSTD = 4, 16, 8, 8, 2, 8, 4
LOSS = dict(r1_gamma=0.5, pl_weight=2.0, pl_decay=0.01, pl_batch_shrink=2)
INTERVALS = {"Gmain": 1, "Greg": 4, "Dmain": 1, "Dreg": 16, "Dboth": 1}  # the reference's gain per phase
"""Phases run, each from the same weights; `Dboth` is R1 inside the D step (reg_interval None),
distgan's `loss.r1_interval=1`."""
REPORTED = {"Gmain": ("Loss/G/loss",), "Greg": ("Loss/G/reg",), "Dmain": ("Loss/D/loss",), "Dreg": ("Loss/D/reg",),
            "Dboth": ("Loss/D/loss", "Loss/D/reg")}
"""The per-sample values whose batch means sum to each phase's loss."""
PL_MEAN_BEFORE = 0.3  # a non-zero running mean, so the penalty's target matters
CONFIGS = {"uncond": (0, 0.0), "cond": (3, 0.0), "uncond_mix": (0, 0.9)}  # name: (class count, style mixing)


def _randomize(module: torch.nn.Module, scale: float = 0.2) -> None:
    """Random values where the reference initializes constants (biases, noise strengths, w_avg)."""
    with torch.no_grad():
        for name, t in [*module.named_parameters(), *module.named_buffers()]:
            if not name.endswith(("resample_filter", "noise_const", "weight", "const")):
                t.copy_(torch.randn_like(t) * scale)


def _distgan_state(G, D) -> tuple[dict, dict[str, dict]]:
    """distgan's config overrides and G/D state dicts for the reference networks, through the
    importer (its restricted unpickler and name mapping) on an in-memory snapshot."""
    from distgan.interop.importer import convert_pickle

    snapshot = {k: copy.deepcopy(m).eval().requires_grad_(False) for k, m in (("G", G), ("D", D), ("G_ema", G))}
    with tempfile.TemporaryDirectory() as tmp:  # never kept: the pickle embeds the reference's source
        path = Path(tmp) / "snapshot.pkl"
        path.write_bytes(pickle.dumps(snapshot))
        overrides, _, states, _ = convert_pickle(path)
    return overrides, states


@contextlib.contextmanager
def _last_randn_like():
    """Every torch.randn_like result while inside (the reference draws its path-length directions
    with it, last in the Greg phase)."""
    drawn, original = [], torch.randn_like

    def recording(*args, **kwargs):
        drawn.append(original(*args, **kwargs))
        return drawn[-1]

    torch.randn_like = recording
    try:
        yield drawn
    finally:
        torch.randn_like = original


def _grads_by_distgan_name(module: torch.nn.Module, net: str) -> dict[str, torch.Tensor]:
    from distgan.interop.stylegan2_ada import map_discriminator, map_generator

    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}
    return map_generator(grads) if net == "G" else map_discriminator(grads, RES)


def make(name: str, num_classes: int, mixing: float, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    import dnnlib
    from torch_utils import training_stats
    from training import loss as ref_loss
    from training import networks

    torch.manual_seed(seed)
    common = dict(c_dim=num_classes, img_resolution=RES, img_channels=3)
    G = networks.Generator(z_dim=Z_DIM, w_dim=W_DIM, mapping_kwargs=dnnlib.EasyDict(num_layers=MAPPING),
                           synthesis_kwargs=dnnlib.EasyDict(channel_base=RES * WIDTH, channel_max=WIDTH,
                                                            num_fp16_res=0, conv_clamp=None), **common)
    D = networks.Discriminator(channel_base=RES * WIDTH, channel_max=WIDTH, num_fp16_res=0, conv_clamp=None,
                               mapping_kwargs=dnnlib.EasyDict(num_layers=MAPPING),
                               epilogue_kwargs=dnnlib.EasyDict(mbstd_group_size=MBSTD), **common)
    _randomize(G)
    _randomize(D)
    overrides, states = _distgan_state(G, D)
    G.train().requires_grad_(False)
    D.train().requires_grad_(False)
    G.synthesis.forward = functools.partial(G.synthesis.forward, noise_mode="const")
    loss = ref_loss.StyleGAN2Loss(device=torch.device("cpu"), G_mapping=G.mapping, G_synthesis=G.synthesis, D=D,
                                  augment_pipe=None, style_mixing_prob=mixing, **LOSS)
    reported: dict[str, torch.Tensor] = {}
    original_report = training_stats.report

    def capture(key, value):  # what the reference reports, kept for the fixture
        reported[key] = value.detach().clone() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
        return original_report(key, value)

    training_stats.report = capture
    g = torch.Generator().manual_seed(seed + 100)
    tensors: dict[str, torch.Tensor] = {f"G.{k}": v for k, v in states["G"].items()}
    tensors.update({f"D.{k}": v for k, v in states["D"].items()})
    real = torch.randn(BATCH, 3, RES, RES, generator=g).clamp(-1, 1)
    real_labels = torch.randint(0, max(num_classes, 1), (BATCH,), generator=g)
    tensors.update({"inputs.real": real, "inputs.real_labels": real_labels})
    one_hot = (lambda y: torch.nn.functional.one_hot(y, num_classes).float()) if num_classes else \
        (lambda y: torch.zeros(len(y), 0))
    loss.pl_mean.fill_(PL_MEAN_BEFORE)
    try:
        for phase, gain in INTERVALS.items():
            module, net = (G, "G") if phase.startswith("G") else (D, "D")
            z = torch.randn(BATCH, Z_DIM, generator=g)
            labels = torch.randint(0, max(num_classes, 1), (BATCH,), generator=g)
            tensors[f"{phase}.z"], tensors[f"{phase}.labels"] = z, labels
            module.requires_grad_(True)
            for p in module.parameters():
                p.grad = None
            reported.clear()
            phase_seed = 1000 * (seed + 1) + list(INTERVALS).index(phase)  # any fixed value, recorded
            tensors[f"{phase}.seed"] = torch.tensor(phase_seed)
            torch.manual_seed(phase_seed)  # style mixing's draws, then the path-length directions
            with _last_randn_like() as last:
                loss.accumulate_gradients(phase=phase, real_img=real, real_c=one_hot(real_labels), gen_z=z,
                                          gen_c=one_hot(labels), sync=True, gain=gain)
            module.requires_grad_(False)
            if phase == "Greg":
                tensors["Greg.pl_noise"] = last[-1].clone()  # the directions, before the 1/sqrt(pixels)
                tensors["Greg.pl_mean_after"] = loss.pl_mean.detach().clone()
            tensors[f"{phase}.loss"] = sum(reported[key].mean() for key in REPORTED[phase])
            tensors.update({f"{phase}.grad.{k}": v.clone() for k, v in _grads_by_distgan_name(module, net).items()})
    finally:
        training_stats.report = original_report
    meta = dict(config=name, num_classes=num_classes, overrides=overrides, loss=LOSS, gains=INTERVALS,
                pl_mean_before=PL_MEAN_BEFORE, style_mixing_prob=mixing, noise_mode="const", augment=None,
                made_by="tools/golden/losses_stylegan2.py")
    return tensors, meta


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    for seed, (name, (classes, mixing)) in enumerate(CONFIGS.items()):
        tensors, meta = make(name, classes, mixing, seed)
        path = args.out / f"{name}.safetensors"
        write_fixture(path, tensors, REFERENCE, args.commit, **meta)
        print(f"{path}: {path.stat().st_size} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
