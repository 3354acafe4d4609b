"""The training loop: one trainer for every backend, dataset, architecture and logger.

It walks the phase list of `gan.phases` once per generator step, and keeps the cadence of
logging, sampling, checkpointing and evaluation. It never asks which backend it drives.

Host syncs: statistics, the non-finite-loss flag and the grad norms stay on the device between
log steps and are read back together at a log step (one sync), so the step loop never waits
on the accelerator except where it must (fp16 overflow checks, preemption polls).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

import torch

from distgan.backends import Backend
from distgan.checkpoint import (Checkpointer, TrainState, check_resume_compatible, read_config, resolve_checkpoint,
                                set_rng_state)
from distgan.checkpoint_io import isolated_rng
from distgan.data.prefetch import Prefetcher
from distgan.config import Config
from distgan.preemption import PreemptionWatch, signals_blocked
from distgan.gan.ema import ema_beta, make_ema, update_ema
from distgan.gan.losses import lazy_reg_adam_params
from distgan.gan.objective import GANObjective
from distgan.gan.phases import Phase, build_phases
from distgan.samples import fixed_latents, generate, grid_layout, save_grid
from distgan.tracking import Tracker

log = logging.getLogger("distgan")

EXIT_PREEMPTED = 17
"""Exit code after a preemption checkpoint: "saved, please requeue me" (slurm/train.sh)."""


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or inf and `train.on_nonfinite=stop`."""


class StatMeter:
    """Sums of device scalars between log steps; read back with one host sync."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def add(self, prefix: str, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            name = f"{prefix}/{key}"
            self.sums[name] = self.sums[name] + value.float() if name in self.sums else value.detach().float().clone()
            self.counts[name] = self.counts.get(name, 0) + 1

    def means(self, backend: Backend) -> dict[str, float]:
        if not self.sums:
            return {}
        names = sorted(self.sums)
        stacked = torch.stack([self.sums[n] / self.counts[n] for n in names])
        values = backend.all_reduce_mean(stacked).tolist()  # collective + the one host sync
        self.sums.clear()
        self.counts.clear()
        return dict(zip(names, values))


class Trainer:
    """Builds everything from a Config and trains; `fit()` returns "done" or "preempted"."""

    def __init__(self, cfg: Config, backend: Backend, stream, G: torch.nn.Module, D: torch.nn.Module, tracker_cls=Tracker):
        self.cfg, self.backend, self.stream = cfg, backend, stream
        self.run_dir = cfg.run_dir
        self.num_classes = G.num_classes
        lazy = cfg.loss.r1_gamma > 0
        d_lr, d_betas = lazy_reg_adam_params(cfg.optim.d_lr, cfg.optim.d_betas, cfg.loss.r1_interval if lazy else 0)
        opt_G = torch.optim.Adam(G.parameters(), lr=cfg.optim.g_lr, betas=cfg.optim.g_betas)
        opt_D = torch.optim.Adam(D.parameters(), lr=d_lr, betas=d_betas)
        self.G_ema = make_ema(G).to(backend.device)
        backend.prepare(G, D, opt_G, opt_D)
        self.phases: list[Phase] = build_phases(cfg)
        self.objective = GANObjective(cfg.loss, backend, G.z_dim, self.num_classes, cfg.data.batch_size)
        self.checkpointer = Checkpointer(self.run_dir, backend, keep=cfg.train.keep_ckpts)
        self.state = TrainState(extra={"class_names": list(stream.info.class_names)})
        self.meter = StatMeter()
        self.preempt = PreemptionWatch(self.run_dir, backend, every=cfg.train.signal_check_every)
        self._resume_rng = None  # this rank's RNG state from the checkpoint, applied when fit() starts
        self._first_bad = torch.full((), -1, dtype=torch.long, device=backend.device)
        self._tracker_cls = tracker_cls
        self.tracker: Tracker | None = None
        self._data: Prefetcher | None = None
        self.images_per_step = cfg.data.batch_size * cfg.optim.accumulate * backend.world_size
        n_samples, self.sample_nrow = grid_layout(64, self.num_classes)  # one row per class when conditional
        self.sample_z, self.sample_c = fixed_latents(n_samples, G.z_dim, self.num_classes, cfg.train.seed, backend.device)
        self.evaluator = None
        self._saved_step = -1  # step of this process's last checkpoint (same on every rank)
        if cfg.eval.every_kimg > 0:
            from distgan.evaluation import TrainingEvaluator  # imports torchmetrics: only when evaluating

            # Checks weights and real-image count now, not after hours of training.
            self.evaluator = TrainingEvaluator(cfg, backend, stream.info.num_samples, G.z_dim, self.num_classes)

    # ------------------------------------------------------------------ resume
    def restore(self) -> Path | None:
        """Apply `train.resume`: auto (latest valid in the run folder), none, or a path."""
        mode, ckpt = self.cfg.train.resume, self.checkpointer
        if mode == "none":
            ckpt.refuse_existing()  # never train from scratch on top of another run's checkpoints
            return None
        path = ckpt.find_valid() if mode == "auto" else resolve_checkpoint(mode)
        if path is None:
            return None
        saved_cfg = read_config(path)
        check_resume_compatible(saved_cfg, self.cfg.to_dict())  # before loading: a config error, not a shape error
        restored = ckpt.load(path, self.G_ema)
        if mode != "auto":
            ckpt.supersede_after(restored.state.step, keep=path)
        self.state, self._resume_rng = restored.state, restored.rng
        if restored.data_state and saved_cfg.get("data", {}).get("source") == self.cfg.data.source:
            self.stream.load_state_dict(restored.data_state)
        elif restored.data_state:
            log.warning("data.source changed since the checkpoint: the data stream starts from its beginning.")
        log.info("Resumed from %s at step %d (%.1f kimg)", path, self.state.step, self.state.nimg / 1000)
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> str:
        cfg, b, st = self.cfg, self.backend, self.state
        self.tracker = self._tracker_cls(cfg, self.run_dir, b.is_main, run_id=st.wandb_id)
        st.wandb_id = self.tracker.run_id
        data = self._data = Prefetcher(self.stream)
        if self._resume_rng is not None:
            # Applied here, after the setup above, so the next step draws exactly the random
            # numbers it would have drawn in an uninterrupted run.
            set_rng_state(self._resume_rng)
            self._resume_rng = None
        if b.is_main:
            (self.run_dir / "DONE").unlink(missing_ok=True)  # a resumed run with more steps is not done yet
        bar = _progress(cfg, b.is_main, st.step)
        last_time, last_nimg, last_step = time.perf_counter(), st.nimg, st.step
        status = "done"
        try:
            while st.step < cfg.train.steps:
                self._iteration(data)
                st.step += 1
                bar.update(1)
                if st.step % cfg.train.log_every == 0 or st.step == cfg.train.steps:
                    now = time.perf_counter()
                    row = self._log_row(now - last_time, st.nimg - last_nimg, st.step - last_step)
                    last_time, last_nimg, last_step = now, st.nimg, st.step
                    bar.set_postfix_str(_postfix(row), refresh=False)
                if st.step % cfg.train.sample_every == 0 or st.step == cfg.train.steps:
                    self.write_samples()
                preempted = self.preempt.requested(st.step)  # collective: all ranks agree
                if st.step % cfg.train.ckpt_every == 0 or st.step == cfg.train.steps or preempted:
                    self.check_finite()
                    self.save()
                leaving = preempted and st.step < cfg.train.steps  # no time for an evaluation then
                # A generator step shows D d_steps batches: that many images since the last check.
                per_step = self.images_per_step * cfg.optim.d_steps
                if self.evaluator and not leaving and self.evaluator.due(st.nimg, per_step, st.step == cfg.train.steps):
                    with isolated_rng(), signals_blocked():  # must not change what training draws next
                        last_time += self.evaluate()  # collective; its time is kept out of img/s
                if preempted and st.step < cfg.train.steps:
                    status = "preempted"
                    log.warning("Preemption requested: checkpoint saved at step %d; exiting with code %d.", st.step, EXIT_PREEMPTED)
                    break
        finally:
            self._data.close()
            bar.close()
            self.tracker.finish()
            if status != "preempted":
                # After a preemption the handlers stay until exit: the launcher follows a rank's
                # exit with SIGTERM to the others, which must not kill them while they shut down.
                self.preempt.close()
        if status == "done" and b.is_main:
            (self.run_dir / "DONE").write_text(f"{st.step}\n")
        return status

    def _iteration(self, data) -> None:
        """One generator step: the phase list once, each phase with its micro-batches."""
        cfg, st = self.cfg, self.state
        accum = cfg.optim.accumulate
        batches: list = []
        for index, phase in enumerate(self.phases):
            if phase.name == "Dmain":
                batches = [self._next_batch(data) for _ in range(accum)]
                st.nimg += self.images_per_step
                st.d_step += 1
            elif phase.name == "Dreg" and not phase.due(st.d_step - 1):
                continue  # lazy regularization: only every `interval`-th D step, on that step's batch
            self._run_phase(index, phase, batches if phase.net == "D" else [(None, None)] * accum)
        # BatchNorm running stats drift apart per rank; rank 0's win before the EMA copies them.
        self.backend.broadcast_buffers("G")
        beta = ema_beta(self.images_per_step, cfg.optim.ema_halflife_kimg, cfg.optim.ema_rampup, st.nimg)
        update_ema(self.G_ema, self.backend.module("G"), beta)

    def _next_batch(self, data):
        images, labels = next(data)
        device = self.backend.device
        labels = labels.to(device, non_blocking=True) if self.num_classes else None
        return images.to(device, non_blocking=True), labels

    def _run_phase(self, index: int, phase: Phase, batches: list) -> None:
        b, cfg = self.backend, self.cfg
        scale = 1.0 / len(batches)
        stats: dict[str, torch.Tensor] = {}
        with b.phase(phase.net):
            for i, (real, labels) in enumerate(batches):
                # Micro-steps before the last skip DDP's all-reduce; manual-sync phases reduce once anyway.
                quiet = i < len(batches) - 1 and not phase.manual_sync
                with b.no_sync(phase.net) if quiet else contextlib.nullcontext():
                    stats = self.objective.accumulate_gradients(phase, real, labels, scale)
            bad = ~torch.isfinite(stats["loss"])
            if cfg.train.on_nonfinite == "skip" and b.all_reduce_max(bad.float()).item() > 0:
                # Every rank skips together (the flag was all-reduced), so weights stay identical.
                b.zero_grad(phase.net)
                self.meter.add("train", {"nonfinite_skips": torch.ones((), device=b.device)})
                log.warning("Non-finite %s loss at step %d: update skipped (train.on_nonfinite=skip).", phase.name, self.state.step + 1)
                return
            code = self.state.step * len(self.phases) + index  # decoded by check_finite
            self._first_bad = torch.where(bad & (self._first_bad < 0), code, self._first_bad)
            # The gradient norm costs a pass over all gradients: measured on log steps only
            # (it is logged as the value at that step), unless clipping needs it anyway.
            measure = (self.state.step + 1) % cfg.train.log_every == 0 or self.state.step + 1 == cfg.train.steps
            norm, skipped = b.step(phase.net, cfg.optim.grad_clip, phase.manual_sync, measure)
        self.meter.add(phase.name, stats)
        if norm is not None and measure:
            self.meter.add(phase.net, {"grad_norm": norm})

    # ------------------------------------------------------------------ cadence
    def check_finite(self) -> None:
        """Raise (on every rank) if any rank saw a non-finite loss since the start."""
        first = self._first_bad.clone()
        first = torch.where(first < 0, torch.iinfo(torch.long).max, first)
        first = self.backend.all_reduce_min(first).item()
        if first == torch.iinfo(torch.long).max:
            return
        step, phase = divmod(first, len(self.phases))
        good = self.checkpointer.latest_name()
        kept = f"the last good checkpoint {self.checkpointer.root / good} is intact" if good else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Loss became NaN/inf at step {step + 1}, phase {self.phases[phase].name}; training stopped and {kept}. "
            "Lower optim.g_lr/optim.d_lr, enable optim.grad_clip or loss.r1_gamma, or set train.on_nonfinite=skip.")

    def _log_row(self, seconds: float, images: int, steps: int) -> dict[str, float]:
        row = self.meter.means(self.backend)
        self.check_finite()
        st = self.state
        row.update({
            "kimg": st.nimg / 1000,
            "img_per_s": images / max(seconds, 1e-9),
            "sec_per_kimg": seconds / max(images / 1000, 1e-9),
            "sec_per_step": seconds / max(steps, 1),
            "lr/G": self.backend.optimizer("G").param_groups[0]["lr"],
            "lr/D": self.backend.optimizer("D").param_groups[0]["lr"],
            "data/skipped": float(self.stream.stats().get("skipped", 0)),
        })
        if self.backend.device.type == "cuda":
            row["mem/peak_gb"] = torch.cuda.max_memory_allocated(self.backend.device) / 2**30
            row["mem/reserved_gb"] = torch.cuda.memory_reserved(self.backend.device) / 2**30
        self.tracker.log(st.step, row)
        return row

    def write_samples(self) -> None:
        """Grids from the fixed latents: EMA G and raw G (main process; not a collective)."""
        if not self.backend.is_main:
            return
        for name, net in (("ema", self.G_ema), ("raw", self.backend.module("G"))):
            with self.backend.autocast():
                images = generate(net, self.sample_z, self.sample_c)
            path = save_grid(images, self.run_dir / "samples" / f"{name}-{self.state.step:09d}.png", nrow=self.sample_nrow)
            rows = self.state.extra.get("class_names") if self.num_classes else None
            caption = f"{name} G, step {self.state.step}" + (f"; rows: {', '.join(rows)}" if rows else "")
            self.tracker.log_image(self.state.step, f"samples/{name}", path, caption=caption)

    def evaluate(self) -> float:
        """FID/KID of the EMA generator, logged; a new best is kept as `checkpoints/best`.
        A collective (every rank calls it). Returns the seconds it took."""
        start, st = time.perf_counter(), self.state
        row = self.evaluator.run(self.G_ema, st.nimg)
        self.tracker.log(st.step, row)
        # The decision uses TrainState.extra (identical on all ranks, restored on resume), so
        # every rank agrees on whether the collective save below happens.
        if self.evaluator.improved(row, st.extra):
            if self._saved_step != st.step:  # save_best keeps an existing checkpoint of this step
                self.check_finite()
                self.save()
            self.checkpointer.save_best(row["eval/fid"], metric="fid", step=st.step)
            self.tracker.summary({"best/fid": row["eval/fid"], "best/step": st.step, "best/kimg": st.nimg / 1000})
        return time.perf_counter() - start

    def save(self) -> Path:
        self._saved_step = self.state.step
        # The position after the last batch the loop consumed (the prefetcher reads ahead).
        data_state = self._data.state if self._data is not None else self.stream.state_dict()
        return self.checkpointer.save(self.state, self.G_ema, self.cfg.to_dict(), data_state)


def _progress(cfg: Config, is_main: bool, initial: int):
    from tqdm.auto import tqdm

    disable = not (is_main and cfg.train.progress) or os.environ.get("DISTGAN_NO_PROGRESS") == "1"
    return tqdm(total=cfg.train.steps, initial=initial, disable=disable, unit="step", dynamic_ncols=True, desc="train")


def _postfix(row: dict[str, float]) -> str:
    parts = [f"kimg {row['kimg']:.1f}", f"{row['img_per_s']:.0f} img/s"]
    for key in ("Dmain/loss", "Gmain/loss"):
        if key in row:
            parts.append(f"{key.split('/')[0][0]} {row[key]:.3f}")
    return ", ".join(parts)

