"""`distgan bench comm`: bytes each rank sends per generator step, counted from the real models
and the real phase list, and the step time and weak-scaling efficiency they imply on a given link.

Nothing is timed: the counts are exact for the config, the projection is arithmetic on stated
inputs (compute seconds per step, link bus bandwidth), so it runs on a laptop. Per phase that
trains network X with P_X parameters (fp32 gradients, 4 bytes each; bf16 autocast keeps fp32
gradients), on N ranks with NCCL's ring algorithms:

* DDP / ZeRO-0: one all-reduce of X's gradients, 2 (N-1)/N x 4 P_X bytes sent per rank. DDP's
  buckets overlap it with the backward of single-backward phases; the hand all-reduce of
  double-backward phases (R1, WGAN-GP) runs after the backward and cannot overlap;
* ZeRO-1/2: reduce-scatter of the gradients plus all-gather of the updated weights, the same
  2 (N-1)/N x 4 P_X bytes;
* FSDP: the above plus an all-gather of X's weights for the backward, and of the frozen
  network's weights for its forward (it runs sharded too): (N-1)/N x 4 P per extra gather.

Per generator step: every phase that the schedule runs in a window of steps, divided by its
length (lazy regularization phases count 1/interval), plus the broadcast of G's buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

from distgan.config import Config
from distgan.gan.phases import Schedule, build_phases
from distgan.models import build_models

WINDOW = 64  # generator steps averaged over (a multiple of every usual regularization interval)
LINKS = {  # NCCL bus bandwidth per GPU, bytes/s: conservative published figures, see docs/scaling.md
    "nvlink-8gpu": 350e9,  # H100 SXM NVLink 4 (900 GB/s bidirectional; nccl-tests all_reduce busbw ~350-450 GB/s)
    "ib-4x8gpu": 45e9,  # one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s; ~45 GB/s busbw across nodes)
}


@dataclass
class CommCount:
    params: dict[str, int]
    phases_per_step: dict[str, float]
    payload: dict[str, float]
    """Bytes per generator step reduced (the gradients of the trained networks), by mode."""
    overlappable_fraction: float
    """Share of the DDP payload whose all-reduce can overlap a backward (every phase's gradients;
    G's buffer broadcast after the step does not)."""


def count(cfg: Config) -> CommCount:
    G, D = build_models(cfg.model, cfg.data.resolution, cfg.data.channels, 0)
    params = {"G": sum(p.numel() for p in G.parameters()), "D": sum(p.numel() for p in D.parameters())}
    buffers_g = sum(b.numel() * b.element_size() for b in G.buffers())
    schedule = Schedule(build_phases(cfg))
    runs: dict[str, float] = {}
    reduce_bytes = overlap = fsdp_gathers = 0.0
    for step in range(WINDOW):
        for phase in schedule.due(step):
            runs[phase.name] = runs.get(phase.name, 0) + 1 / WINDOW
            grads = 4 * params[phase.net] / WINDOW
            reduce_bytes += grads
            # Every phase overlaps: single-backward ones through DDP's buckets, double-backward
            # ones (R1/R2, path length) through the hand-synced buckets of `grad_buckets.py`.
            overlap += grads
            other = "D" if phase.net == "G" else "G"
            fsdp_gathers += (4 * params[phase.net] + 4 * params[other]) / WINDOW  # backward + frozen forward
    payload = {"ddp": reduce_bytes + buffers_g, "zero2": reduce_bytes + buffers_g,
               "fsdp": reduce_bytes + fsdp_gathers / 2 + buffers_g}
    # In `fsdp`, gathers count half: a ring all-gather sends (N-1)/N of the tensor, an all-reduce 2 (N-1)/N.
    return CommCount(params, runs, payload, overlap / max(reduce_bytes, 1e-9))


def project(c: CommCount, compute_s: float, ranks: int, bus_bandwidth: float, mode: str = "ddp") -> dict[str, float]:
    """Step time on `ranks` GPUs given one GPU's compute time per step (weak scaling: the same
    per-GPU batch), with and without overlapping the overlappable all-reduces with the backward."""
    sent = 2 * (ranks - 1) / ranks * c.payload[mode]  # ring: bytes each rank sends
    # nccl-tests define bus bandwidth = (size / time) x 2 (N-1)/N, so time = bytes sent / busbw.
    comm_s = sent / bus_bandwidth
    hidden = min(comm_s * c.overlappable_fraction, compute_s / 2)  # at most the backward (~half the step)
    serial = compute_s + comm_s
    overlapped = compute_s + comm_s - hidden
    return {"bytes_sent_per_rank": sent, "comm_s": comm_s, "step_s_no_overlap": serial,
            "step_s_overlap": overlapped, "efficiency_no_overlap": compute_s / serial,
            "efficiency_overlap": compute_s / overlapped}


def comm_report(cfg: Config, compute_s: float) -> list[dict]:
    """One row per (link, mode): the counts and the projection."""
    c = count(cfg)
    rows = []
    for link, bandwidth in LINKS.items():
        ranks = 8 if link.startswith("nvlink") else 32
        for mode in ("ddp", "zero2", "fsdp"):
            rows.append({"benchmark": "comm", "arch": cfg.model.arch, "resolution": cfg.data.resolution,
                         "params_G": c.params["G"], "params_D": c.params["D"],
                         "phases_per_step": {k: round(v, 4) for k, v in c.phases_per_step.items()},
                         "payload_bytes_per_step": round(c.payload[mode]), "overlappable": round(c.overlappable_fraction, 3),
                         "link": link, "ranks": ranks, "mode": mode, "compute_s": compute_s,
                         **{k: round(v, 5) for k, v in project(c, compute_s, ranks, bandwidth, mode).items()}})
    return rows
