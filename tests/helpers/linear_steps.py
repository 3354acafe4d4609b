"""Per-run options of rank_harness's DISTGAN_TEST_MULTI list for the gradient-scale tests
(tests/integration/test_gradient_scale.py).

An entry of that list may be a dict instead of a list of overrides:

  {"overrides": [...], "optimizer": "sgd", "mutant": NAME}

* `"optimizer": "sgd"` trains with plain SGD at the configured learning rates instead of Adam,
  and dumps the weights the run started from (`init-rank-R.safetensors` beside the final ones).
  Adam divides each step by the gradient's running RMS, so a uniform gradient scale (a missing
  1/accumulate, a sum where a mean belongs) barely moves its updates; SGD's update is
  lr x gradient, so the same error doubles it.
* `"mutant": NAME` plants one of `MUTANTS`, a known bug, for that run only: the negative control
  that shows a check would catch it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors.torch import save_file

from distgan.gan.objective import GANObjective
from distgan.trainer import TrainerHooks


class SGDSpec:
    """Builds plain SGD where a backend builds Adam (the `AdamSpec.build` interface). The learning
    rate is the configured one (lazy-R1 corrected, as Adam's would be)."""

    def __init__(self, lr: float):
        self.lr = lr

    def build(self, params, grad_scaler: bool = False) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=self.lr)


def train_with_sgd(backend) -> None:
    """Make `backend.setup` build SGD instead of Adam for G and D: the one swap these tests make.
    Every backend builds its optimizers from these specs, on the parameters it trains (FSDP's
    shards, DeepSpeed's engines), so the distributed machinery under test stays the real one."""
    setup = backend.setup
    backend.setup = lambda G, D, optim: setup(G, D, {net: SGDSpec(float(spec.lr)) for net, spec in optim.items()})


class InitialWeights(TrainerHooks):
    """Keeps G's and D's weights at the first step; writes them to DUMP/init-rank-R.safetensors
    at the end, so a test can tell the update (final - initial) from the weights."""

    def __init__(self, dump_dir: Path | None):
        self.dump_dir = dump_dir
        self.tensors: dict[str, torch.Tensor] = {}

    def step_start(self, trainer) -> None:
        if self.tensors:
            return
        for name in ("G", "D"):
            state = trainer.backend.module(name).state_dict()
            self.tensors.update({f"{name}.{k}": v.detach().float().cpu().clone() for k, v in state.items()})

    def fit_end(self, trainer, status: str) -> None:
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
            save_file(self.tensors, str(self.dump_dir / f"init-rank-{trainer.backend.rank}.safetensors"))


def _summed_micro_batches(accumulate_gradients: Callable) -> Callable:
    """A missing 1/accumulate: each micro-batch's loss is backpropagated at full weight, so the
    accumulated gradient is the sum over micro-batches instead of their mean."""

    def mutant(self, phase, h, real, real_c, scale):
        return accumulate_gradients(self, phase, h, real, real_c, 1.0)

    return mutant


MUTANTS: dict[str, tuple[type, str, Callable[[Callable], Callable]]] = {
    "summed-micro-batches": (GANObjective, "accumulate_gradients", _summed_micro_batches),
}
"""Known bugs a negative control can plant: name -> (owner, attribute, wrap(original))."""


@contextlib.contextmanager
def planted(name: str | None) -> Iterator[None]:
    """Mutant `name` in place for the duration (nothing when None)."""
    if not name:
        yield
        return
    owner, attribute, wrap = MUTANTS[name]
    original = getattr(owner, attribute)
    setattr(owner, attribute, wrap(original))
    try:
        yield
    finally:
        setattr(owner, attribute, original)


@contextlib.contextmanager
def run_options(spec: dict, backend, hooks: list, dump_dir: Path | None) -> Iterator[None]:
    """Apply one MULTI entry's options (see the module doc) around its run."""
    unknown = set(spec) - {"overrides", "optimizer", "mutant"}
    if unknown or spec.get("optimizer", "adam") not in ("adam", "sgd"):
        raise ValueError(f"unknown run options {sorted(unknown) or spec.get('optimizer')!r} in {spec}")
    if spec.get("optimizer") == "sgd":
        train_with_sgd(backend)
        hooks.append(InitialWeights(dump_dir))
    with planted(spec.get("mutant")):
        yield
