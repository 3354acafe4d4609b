"""Golden fixtures for R3GAN's losses: brownvc/R3GAN `R3GAN/Trainer.py` AdversarialTraining per phase.

Run through `tools/make_golden_fixtures.py --only losses_r3gan` (the reference checkout on
PYTHONPATH). For an unconditional and a conditional configuration (16 px, tiny widths, batch 4)
this builds the reference G and D on CPU (`tools/golden/r3gan_nets.py` builds and randomizes them
as R3GAN's train.py configures them), and runs the reference's loss (`training/loss.py`
R3GANLoss) for each phase as its training loop does: D first (relativistic pairing on its own real
batch, R1 + R2 with gamma/2, one backward), then G on a separate real batch (R3GAN's loop draws
one per phase); the trained network's `requires_grad` on, the other's off, gain 1 (one process,
no accumulation). It records, per phase, the loss value (the batch mean of what the reference
reports as Loss/D/loss + gamma/2 (r1 + r2), and Loss/G/loss) and the gradient of every parameter
of the trained network. Weights and gradients are written under distgan's names (through
`distgan.interop.r3gan.map_state`), so the test needs no reference. Fakes take the reals'
labels (the reference passes the real batch's labels to G); augmentation is off.
"""

from __future__ import annotations

import torch

from tools.golden.common import parse_args, write_fixture
from tools.golden.r3gan_nets import build_reference

REFERENCE = "brownvc/R3GAN"
BATCH, GAMMA = 4, 0.5
CONFIGS = {
    "uncond": dict(resolution=16, widths=[8, 8, 4], blocks=2, expansion=2, group_size=4, z_dim=8, c_dim=0),
    "cond": dict(resolution=16, widths=[8, 8, 4], blocks=1, expansion=2, group_size=4, z_dim=8, c_dim=3),
}
PHASES = {"D": "Dmain", "G": "Gmain"}  # the reference's phases, in its order -> fixture keys (distgan's names)


def make(name: str, spec: dict, seed: int) -> tuple[dict[str, torch.Tensor], dict]:
    from torch_utils import training_stats
    from training import loss as ref_loss

    from distgan.interop.r3gan import infer_config, map_state

    G, D = build_reference(spec, seed)
    overrides, classes = infer_config(G.state_dict(), D.state_dict())
    G.train().requires_grad_(False)
    D.train().requires_grad_(False)
    loss = ref_loss.R3GANLoss(G, D, augment_pipe=None)
    reported: dict[str, torch.Tensor] = {}
    original_report = training_stats.report

    def capture(key, value):  # what the reference reports, kept for the fixture
        reported[key] = value.detach().clone()
        return original_report(key, value)

    tensors = {f"G.{k}": v for k, v in map_state(G.state_dict(), "G").items()}
    tensors.update({f"D.{k}": v for k, v in map_state(D.state_dict(), "D").items()})
    g = torch.Generator().manual_seed(seed + 100)
    training_stats.report = capture
    try:
        for phase, key in PHASES.items():
            module = D if phase == "D" else G
            real = torch.randn(BATCH, 3, spec["resolution"], spec["resolution"], generator=g).clamp(-1, 1)
            labels = torch.randint(0, max(spec["c_dim"], 1), (BATCH,), generator=g)
            z = torch.randn(BATCH, spec["z_dim"], generator=g)
            c = torch.nn.functional.one_hot(labels, spec["c_dim"]).float() if spec["c_dim"] else None
            tensors.update({f"{key}.real": real, f"{key}.labels": labels, f"{key}.z": z})
            module.requires_grad_(True)
            for p in module.parameters():
                p.grad = None
            reported.clear()
            loss.accumulate_gradients(phase=phase, real_img=real, real_c=c, gen_z=z, gamma=GAMMA, gain=1.0)
            module.requires_grad_(False)
            value = reported["Loss/G/loss"] if phase == "G" else \
                reported["Loss/D/loss"] + GAMMA / 2 * (reported["Loss/r1_penalty"] + reported["Loss/r2_penalty"])
            tensors[f"{key}.loss"] = value.mean()
            grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}
            tensors.update({f"{key}.grad.{k}": v.clone() for k, v in map_state(grads, phase).items()})
    finally:
        training_stats.report = original_report
    meta = dict(config=name, spec=spec, num_classes=classes, overrides=overrides, gamma=GAMMA, augment=None,
                made_by="tools/golden/losses_r3gan.py")
    return tensors, meta


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    for seed, (name, spec) in enumerate(CONFIGS.items()):
        tensors, meta = make(name, spec, seed)
        path = args.out / f"{name}.safetensors"
        write_fixture(path, tensors, REFERENCE, args.commit, **meta)
        print(f"{path}: {path.stat().st_size} bytes, {len(tensors)} tensors")


if __name__ == "__main__":
    main()
