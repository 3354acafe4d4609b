"""The training loop: one trainer for every backend, dataset, architecture and logger.

Each generator step walks the phases the schedule says are due (`gan.phases`); for each, the
backend's phase handle runs the micro-batches through the objective and steps the optimizer.
Around the steps the trainer keeps the cadence of logging, sampling, checkpointing and
evaluation. It never asks which backend, phase or architecture it drives.

Host syncs: the loop never reads a device value back except where it must. Statistics and losses
stay on the device between log steps and are read back together at a log step (one sync, which
also checks them for NaN/inf); grad norms are computed on log steps only; the preemption poll is
a collective every `train.signal_check_every` steps, and only with more than one process.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Sequence

import torch

from distgan.backends import Backend
from distgan.checkpoint import (BestRecord, Checkpointer, RngStreams, RunFacts, Scope, TrainState, check_resume_compatible,
                                isolated_rng, read_checkpoint, resolve_checkpoint)
from distgan.config import Config
from distgan.data.normalize import normalize_images
from distgan.data.prefetch import DataStream, Prefetcher
from distgan.errors import ConfigError, NonFiniteLossError
from distgan.gan.ada import AdaptiveAugment
from distgan.gan.ema import EMA
from distgan.gan.hyperparams import Hyperparameters
from distgan.gan.objective import GANObjective, NoiseSource
from distgan.gan.phases import REAL_FRESH, REAL_NONE, Phase, Schedule, build_phases
from distgan.health import SPREAD_KEY, HealthMonitor, HealthThresholds, sample_spread
from distgan.metrics.evaluation import TrainingEvaluator
from distgan.preemption import EXIT_PREEMPTED, Preempted, PreemptionWatch
from distgan.progress import TrainingProgress
from distgan.sampling import fixed_latents, generate, grid_layout, save_grid
from distgan.tracking import Tracker

log = logging.getLogger("distgan")


class TrainerHooks:
    """Callbacks into the loop, for tools and tests; every method is optional."""

    def step_start(self, trainer: "Trainer") -> None:
        """Before generator step `trainer.state.step` (0-based) starts."""

    def batch(self, trainer: "Trainer", images: torch.Tensor, labels: torch.Tensor | None) -> None:
        """A real batch the loop is about to train on."""

    def checkpoint_written(self, folder: Path) -> None:
        """Every part of a checkpoint is in `folder`; its manifest and rename come next."""

    def fit_end(self, trainer: "Trainer", status: str) -> None:
        """`fit` is returning `status` ("done" or "preempted"; not called when it raises)."""


class StatMeter:
    """Device statistics of the steps since the last log step (kept as they are, no per-step
    reduction), averaged over the window and the ranks with one collective and one host sync. Losses are kept with their (step, phase), so a
    NaN/inf is found (and named) in the same read-back."""

    def __init__(self) -> None:
        self.values: dict[str, list[torch.Tensor]] = {}
        self.losses: list[torch.Tensor] = []
        self.loss_where: list[tuple[int, str]] = []

    def add(self, prefix: str, stats: dict[str, torch.Tensor]) -> None:
        for key, value in stats.items():
            self.values.setdefault(f"{prefix}/{key}", []).append(value)

    def add_loss(self, step: int, phase: str, loss: torch.Tensor) -> None:
        self.losses.append(loss)
        self.loss_where.append((step, phase))

    def first_nonfinite(self, backend: Backend) -> tuple[int, str] | None:
        """(step, phase) of the first NaN/inf loss on any rank since the last check (a collective)."""
        none = len(self.losses)
        first = torch.tensor(none, device=backend.device)
        if self.losses:
            bad = ~torch.isfinite(torch.stack(self.losses).float())
            # Index of the first bad loss (or `none`): argmax finds the first True.
            first = torch.where(bad.any(), bad.int().argmax(), first)
        # Ranks hold the same phases in the same order: the smallest index is the earliest.
        index = int(backend.all_reduce_min(first).item())
        where = self.loss_where[index] if index < none else None
        self.losses.clear()
        self.loss_where.clear()
        return where

    def means(self, backend: Backend) -> dict[str, float]:
        if not self.values:
            return {}
        names = sorted(self.values)
        # Per-sample values (D outputs) and scalars alike: the mean over every value of the window,
        # which for equal batches is the mean of the per-step means.
        stacked = torch.stack([torch.cat([v.reshape(-1) for v in self.values[n]]).float().mean() for n in names])
        values = backend.all_reduce_mean(stacked).tolist()  # collective + the one host sync
        self.values.clear()
        return dict(zip(names, values))


class Trainer:
    """Trains G and D from a Config on a prepared backend; `fit()` returns "done" or "preempted".

    `stream`, `noise`, `tracker_cls` and `hooks` are the injectable parts (tests pass their own).
    """

    def __init__(self, cfg: Config, backend: Backend, stream: DataStream, G: torch.nn.Module, D: torch.nn.Module, *,
                 noise: NoiseSource | None = None, tracker_cls=Tracker, hooks: Sequence[TrainerHooks] = ()):
        self.cfg, self.backend, self.stream = cfg, backend, stream
        self.run_dir = cfg.run_dir
        self.hooks = list(hooks)
        self.num_classes = G.num_classes
        self.schedule = Schedule(build_phases(cfg))
        # The EMA copy is taken before the backend casts or shards G: it stays in full precision.
        self.hyper = Hyperparameters(cfg, self.schedule)
        initial = self.hyper.at(0)
        self.ema = EMA(G, initial["ema_halflife_kimg"], cfg.optim.ema_rampup or None)  # 0: no ramp-up
        self.ema.module.to(backend.device)
        if cfg.loss.pl_weight > 0 and not getattr(G, "w_dim", 0):
            raise ConfigError(f"loss.pl_weight={cfg.loss.pl_weight}: path-length regularization needs a generator with a "
                              f"mapping network (model.arch=stylegan2); model.arch={cfg.model.arch} has none. "
                              "Set loss.pl_weight=0.")
        backend.setup(G, D, {net: self.hyper.adam(initial, net) for net in ("G", "D")})
        self.accumulate = cfg.optim.accumulate
        self.images_per_step = cfg.data.batch_size * self.accumulate * backend.world_size
        """Real images of one D step over all ranks (each `fresh` phase draws this many)."""
        loss = cfg.loss
        self.ada = AdaptiveAugment(backend, loss.augment_p.at(0), loss.ada_target, loss.ada_kimg, loss.ada_interval,
                                   loss.augment_p_max, self.images_per_step) if loss.ada else None
        self.objective = GANObjective(loss, G.z_dim, self.num_classes, cfg.data.batch_size, backend.device, noise,
                                      ada=self.ada, class_counts=getattr(stream.info, "class_counts", None))
        self._no_real = [(None, None)] * self.accumulate
        self._skip_nonfinite = cfg.train.on_nonfinite == "skip"

        # What a checkpoint holds: every object saves and loads itself.
        self.state = TrainState()
        self.facts = RunFacts(class_names=tuple(stream.info.class_names))
        self.best = BestRecord("fid")
        self.data = Prefetcher(stream, cfg.data.source, device=backend.device)
        self.rng = RngStreams()
        self.checkpointer = Checkpointer(self.run_dir, backend, keep=cfg.train.keep_ckpts,
                                         on_parts_written=self._checkpoint_written)
        for name, obj, scope in (
                ("G", backend.module("G"), Scope.WEIGHTS), ("D", backend.module("D"), Scope.WEIGHTS),
                ("G_ema", self.ema.module, Scope.WEIGHTS), ("optimizers", backend.optimizer_state, Scope.COLLECTIVE),
                ("train", self.state, Scope.SHARED), ("run", self.facts, Scope.SHARED), ("best", self.best, Scope.SHARED),
                ("backend", backend, Scope.SHARED), ("objective", self.objective, Scope.SHARED),
                ("data", self.data, Scope.PER_RANK), ("rng", self.rng, Scope.PER_RANK)):
            self.checkpointer.register(name, obj, scope)
        if self.ada is not None:
            self.checkpointer.register("ada", self.ada, Scope.PER_RANK)

        self.meter = StatMeter()
        # Host arithmetic on the rows the main process logs: no collective, other ranks skip it.
        self.health = (HealthMonitor(cfg.loss.objective, cfg.loss.gp_weight, HealthThresholds(window=cfg.train.health_window))
                       if cfg.train.health_checks and backend.is_main else None)
        self.preempt = PreemptionWatch(self.run_dir, backend, every=cfg.train.signal_check_every)
        self._tracker_cls = tracker_cls
        self.tracker: Tracker | None = None
        self._fp16_skips = 0
        self._bar: TrainingProgress | None = None
        self._window = (0.0, 0, 0)
        self.train_seconds = 0.0
        """Training time of this launch, evaluations excluded (logged as `minutes`)."""
        self.out_of_time = False
        """`train.max_minutes` is spent (agreed by all ranks at a log step): the step is final."""
        n_samples, self.sample_nrow = grid_layout(64, self.num_classes)  # one row per class when conditional
        self.sample_z, self.sample_c = fixed_latents(n_samples, G.z_dim, self.num_classes, cfg.train.seed, backend.device)
        self._saved_step = -1  # step of this process's last checkpoint (same on every rank)
        self.evaluator = None
        if cfg.eval.every_kimg > 0:
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
        # Before loading: a config error, not a shape error.
        check_resume_compatible(read_checkpoint(path).config, self.cfg.to_dict())
        ckpt.load(path)
        if mode != "auto":
            ckpt.supersede_after(self.state.step, keep=path)
        log.info("Resumed from %s at step %d (%.1f kimg)", path, self.state.step, self.state.nimg / 1000)
        return path

    # ------------------------------------------------------------------ the loop
    def fit(self) -> str:
        """Train to `train.steps`, or until the ranks agree to stop for a preemption (with a
        checkpoint saved). Returns "done" or "preempted"."""
        self.start()
        status = "done"
        try:
            if not self.evaluate_owed():
                status = "preempted"
            while status == "done" and self.state.step < self.cfg.train.steps and not self.out_of_time:
                if not self.advance():
                    status = "preempted"
                    break
        except BaseException:
            self.finish("failed")
            raise
        self.finish(status)
        return status

    def start(self) -> None:
        """Open the tracker, start fetching data, apply a resumed RNG state."""
        b = self.backend
        self.tracker = self._tracker_cls(self.cfg, self.run_dir, b.is_main, run_id=self.facts.tracker_id)
        self.facts.tracker_id = self.tracker.run_id
        self.data.start()
        # Applied here, after the set-up above, so the next step draws exactly the random numbers
        # it would have drawn in an uninterrupted run.
        self.rng.apply_loaded()
        self.apply_hyperparameters()  # the values at the (possibly resumed) kimg
        if b.is_main:
            (self.run_dir / "DONE").unlink(missing_ok=True)  # a resumed run with more steps is not done yet
        self._bar = TrainingProgress(self.cfg, b.is_main, self.state.step)
        self._window = (time.perf_counter(), self.state.nimg, self.state.step)  # since the last log row

    def advance(self) -> bool:
        """One generator step, then whatever falls due after it: the log row, sample grids, the
        preemption poll, a checkpoint, an evaluation. False when the run must stop for a preemption
        (its checkpoint is saved)."""
        cfg, st = self.cfg, self.state
        for hook in self.hooks:
            hook.step_start(self)
        nimg_before = st.nimg
        self.train_step(measure=self._log_due(st.step + 1))
        st.step += 1
        self._bar.update(1)
        if self._log_due(st.step):
            now = time.perf_counter()
            start, nimg, step = self._window
            self.train_seconds += now - start
            row = self._log_row(now - start, st.nimg - nimg, st.step - step)
            self._window = (now, st.nimg, st.step)
            self._bar.log_step(st.step, self.train_seconds, row)  # total: the earlier of steps and max_minutes
            if cfg.train.max_minutes > 0:  # every rank must stop at the same step: rank clocks differ
                over = torch.tensor(float(self.train_seconds >= cfg.train.max_minutes * 60), device=self.backend.device)
                self.out_of_time = self.backend.all_reduce_max(over).item() > 0
        final = st.step == cfg.train.steps or self.out_of_time
        if st.step % cfg.train.sample_every == 0 or final:
            self.write_samples()  # main process only, short: the others wait for it in the poll below
        preempted = self.preempt.requested(st.step)  # collective: all ranks agree
        eval_due = self.evaluator is not None and self.evaluator.due(st.nimg, st.nimg - nimg_before, final)
        # A final step with nothing left to evaluate is as quick to finish as to leave.
        leaving = preempted and (eval_due or not final)
        if st.step % cfg.train.ckpt_every == 0 or final or preempted:
            st.eval_owed = eval_due and leaving  # no time for it now: the resumed run evaluates first
            self.save()
        if leaving:
            log.warning("Preemption requested: checkpoint saved at step %d; exiting with code %d.", st.step, EXIT_PREEMPTED)
            return False
        return not eval_due or self._evaluate_or_leave()

    def _evaluate_or_leave(self, owed: bool = False) -> bool:
        """Evaluate (a collective; in its own RNG, so training draws the same next; its time kept
        out of img/s). False when all ranks gave it up for a preemption: the step's checkpoint then
        owes it, and the resumed run runs it first. No signal block around it: it polls the flag,
        and its loader workers are protected on their own."""
        try:
            with isolated_rng():
                seconds = self.evaluate()
        except Preempted:  # raised on every rank at the same poll
            self.preempt.gave_up(self.state.step, "the evaluation")
            if not owed:  # (an owed one: the checkpoint resumed from still owes it)
                self.state.eval_owed = True
                self.save()  # again if this step was saved before the evaluation: now it owes it
            log.warning("Preemption requested: checkpoint saved at step %d; exiting with code %d.", self.state.step,
                        EXIT_PREEMPTED)
            return False
        start, nimg, step = self._window
        self._window = (start + seconds, nimg, step)
        return True

    def evaluate_owed(self) -> bool:
        """First thing after a resume: the evaluation a preemption took from the checkpoint's step.
        False when a preemption stops it again."""
        st = self.state
        owed, st.eval_owed = st.eval_owed and self.evaluator is not None, False  # what checkpoints say from now on
        if not owed:
            return True
        log.info("Running the evaluation of step %d that a preemption interrupted.", st.step)
        if not self._evaluate_or_leave(owed=True):
            st.eval_owed = True
            return False
        if st.step >= self.cfg.train.steps and self._saved_step != st.step:
            self.save()  # no later checkpoint will say that it was done
        return True

    def finish(self, status: str) -> None:
        """Stop the data thread, the progress bar and the tracker; mark a completed run DONE."""
        self.data.close()
        self._bar.close()
        self.tracker.finish()
        if status == "preempted" and self.backend.world_size > 1:
            # Leave together: `srun --kill-on-bad-exit` kills every node once one node's launcher
            # exits, which would cut the main process's tracker flush short. The checkpoint is safe
            # by now (its save ended in a collective after the rename). Bounded by dist.timeout_s.
            self.backend.barrier()
        if status != "preempted":
            # After a preemption the handlers stay until exit: the launcher follows a rank's
            # exit with SIGTERM to the others, which must not kill them while they shut down.
            self.preempt.close()
        if status == "failed":
            return
        if status == "done" and self.backend.is_main:
            (self.run_dir / "DONE").write_text(f"{self.state.step}\n")
        for hook in self.hooks:
            hook.fit_end(self, status)

    def train_step(self, measure: bool = False) -> None:
        """One generator step: the due phases, each with its micro-batches. `measure` asks the
        handles for gradient norms (a pass over all gradients: on log steps only)."""
        st = self.state
        nimg_before = st.nimg  # the EMA ramp-up counts the images seen before this step (NVlabs)
        d_steps_before = st.d_step
        if self.hyper.varies:
            self.apply_hyperparameters()
        batches = self._no_real
        for phase in self.schedule.due(st.step):
            if phase.draws_reals:
                batches = [self._next_batch() for _ in range(self.accumulate)]
            if phase.real == REAL_FRESH:  # images shown to D (a G phase's own reals are not)
                st.nimg += self.images_per_step
                st.d_step += 1
            self._run_phase(phase, self._no_real if phase.real == REAL_NONE else batches, measure)
        if self.ada is not None:  # after all phases (NVlabs): a lazy R1 phase's reals count towards this adjustment
            self.ada.d_steps_done(d_steps_before, st.d_step)
        # BatchNorm running stats drift apart per rank; rank 0's win before the EMA copies them.
        self.backend.broadcast_buffers("G")
        self.ema.update(self.backend.module("G"), st.nimg - nimg_before, nimg_before)  # all d_steps' images

    def apply_hyperparameters(self) -> dict[str, float]:
        """Set the scheduled settings to their values at the images seen so far."""
        values = self.hyper.at(self.state.nimg)
        for net in ("G", "D"):
            self.backend.set_adam(net, self.hyper.adam(values, net))
        self.objective.set_hyperparameters(values["r1_gamma"], values["r2_gamma"], values["augment_p"])
        self.ema.halflife_kimg = values["ema_halflife_kimg"]
        return values

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        images, labels = next(self.data)
        device = self.backend.device
        if images.device != device:  # a no-op `.to` still costs ~15 us of argument parsing
            images = images.to(device, non_blocking=True)  # uint8 from pinned memory: a quarter of the bytes
        images = normalize_images(images)  # -> float32 [-1, 1], on the device, after the copy
        labels = labels.to(device, non_blocking=True) if self.num_classes else None
        for hook in self.hooks:
            hook.batch(self, images, labels)
        return images, labels

    def _run_phase(self, phase: Phase, batches: list, measure: bool) -> None:
        h = self.backend.phase_handle(phase)
        scale, last = 1.0 / len(batches), len(batches) - 1
        micro = []  # every micro-batch's statistics: the logged means cover the whole batch
        with h:
            for i, (real, labels) in enumerate(batches):
                with h.micro_batch(last=i == last):
                    micro.append(self.objective.accumulate_gradients(phase, h, real, labels, scale))
            self.objective.end_phase(phase, h)
            loss = micro[0]["loss"] if len(micro) == 1 else torch.stack([m["loss"] for m in micro]).sum()
            if self._skip_nonfinite and self._nonfinite_on_any_rank(loss):
                # Every rank skips together (the flag was all-reduced), so weights stay identical.
                h.discard()
                self.meter.add("train", {"nonfinite_skips": torch.ones((), device=self.backend.device)})
                log.warning("Non-finite %s loss at step %d: update skipped (train.on_nonfinite=skip).", phase.name,
                            self.state.step + 1)
                return
            report = h.step(measure)
        for stats in micro:
            self.meter.add(phase.name, stats)
        self.meter.add_loss(self.state.step, phase.name, loss)
        if report.grad_norm is not None and measure:
            self.meter.add(phase.net, {"grad_norm": report.grad_norm})
        self._fp16_skips += report.skipped

    def _nonfinite_on_any_rank(self, loss: torch.Tensor) -> bool:
        bad = (~torch.isfinite(loss)).float()
        return self.backend.all_reduce_max(bad).item() > 0  # a host sync per phase, in skip mode only

    # ------------------------------------------------------------------ cadence
    def _log_due(self, step: int) -> bool:
        return step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps

    def check_finite(self) -> None:
        """Raise (on every rank) if any rank saw a non-finite loss since the last check."""
        where = self.meter.first_nonfinite(self.backend)
        if where is None:
            return
        good = self.checkpointer.latest_name()
        kept = f"the last good checkpoint {self.checkpointer.root / good} is intact" if good else "no checkpoint was written"
        raise NonFiniteLossError(
            f"Loss became NaN/inf at step {where[0] + 1}, phase {where[1]}; training stopped and {kept}. "
            "Lower optim.g_lr/optim.d_lr, enable optim.grad_clip or loss.r1_gamma, or set train.on_nonfinite=skip.")

    def _log_row(self, seconds: float, images: int, steps: int) -> dict[str, float]:
        row = self.meter.means(self.backend)
        self.check_finite()
        b, st = self.backend, self.state
        row.update({
            "kimg": st.nimg / 1000,
            "img_per_s": images / max(seconds, 1e-9),
            "sec_per_kimg": seconds / max(images / 1000, 1e-9),
            "sec_per_step": seconds / max(steps, 1),
            "minutes": self.train_seconds / 60,
            "lr/G": b.optimizer("G").param_groups[0]["lr"],
            "lr/D": b.optimizer("D").param_groups[0]["lr"],
            "data/skipped": float(self.stream.stats().get("skipped", 0)),
            **self.hyper.logged(self.hyper.at(st.nimg)),
        })
        if self.ada is not None:  # the current p and the r_t it answered (a host sync, on log steps only)
            row.update({key: float(value) for key, value in self.ada.logged().items()})
        if b.mixed_precision == "fp16":
            row["train/fp16_skipped_steps"] = float(self._fp16_skips)  # loss-scale overflows in this window
            self._fp16_skips = 0
        if b.device.type == "cuda":
            row["mem/peak_gb"] = torch.cuda.max_memory_allocated(b.device) / 2**30
            row["mem/reserved_gb"] = torch.cuda.memory_reserved(b.device) / 2**30
        if self.health is not None:
            self._check_health(row)
        self.tracker.log(st.step, row)
        return row

    def _check_health(self, row: dict) -> None:
        """Add the sample spread (raw G on the fixed sample latents) to the row, then report each
        health warning that starts here: in the log, in the row (`warning/<name>`) and as a W&B alert."""
        with self.backend.autocast():
            row[SPREAD_KEY] = sample_spread(generate(self.backend.module("G"), self.sample_z, self.sample_c))
        for warning in self.health.check(self.state.step, row):
            log.warning("Training health: %s", warning.message)
            row[f"warning/{warning.name}"] = warning.message
            self.tracker.alert(warning.name.replace("_", " "), warning.message)

    def write_samples(self) -> None:
        """Grids from the fixed latents: EMA G and raw G (main process; not a collective)."""
        if not self.backend.is_main:
            return
        for name, net in (("ema", self.ema.module), ("raw", self.backend.module("G"))):
            with self.backend.autocast():
                images = generate(net, self.sample_z, self.sample_c)
            path = save_grid(images, self.run_dir / "samples" / f"{name}-{self.state.step:09d}.png", nrow=self.sample_nrow)
            rows = self.facts.class_names if self.num_classes else ()
            caption = f"{name} G, step {self.state.step}" + (f"; rows: {', '.join(rows)}" if rows else "")
            self.tracker.log_image(self.state.step, f"samples/{name}", path, caption=caption)

    def evaluate(self) -> float:
        """FID/KID of the EMA generator, logged; a new best is kept as `checkpoints/best`.
        A collective (every rank calls it). Returns the seconds it took; raises `Preempted` (on
        every rank) when a preemption arrives during it."""
        start, st = time.perf_counter(), self.state
        # Polls the preemption flag with the other ranks every few batches: raises Preempted on all.
        row = self.evaluator.run(self.ema.module, st.nimg, interrupt=self.preempt.pending)
        row["minutes"] = (self.train_seconds + start - self._window[0]) / 60  # training time so far
        self.tracker.log(st.step, row)
        # Every rank offers the same (all-reduced) FID to its BestRecord, so all agree on whether
        # the collective save below happens.
        if self.best.offer(float(row["eval/fid"]), st.step):
            if self._saved_step != st.step:
                self.save()
            self.checkpointer.keep_best(self.best)
            self.tracker.summary({"best/fid": self.best.value, "best/step": st.step, "best/kimg": st.nimg / 1000})
        return time.perf_counter() - start

    def save(self) -> Path:
        """Checkpoint the registered state (a collective); refuses to save NaN/inf weights."""
        self.check_finite()
        self._saved_step = self.state.step
        return self.checkpointer.save(self.state.step, self.cfg.to_dict())

    def _checkpoint_written(self, folder: Path) -> None:
        for hook in self.hooks:
            hook.checkpoint_written(folder)
