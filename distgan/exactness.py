"""What is bit-exact between two runs from the same seed (and across a resume), and what is not.

Kept as data so that a test holds it to the training step distgan really runs
(tests/unit/test_deterministic.py records the aten ops of a step) and to launch/README.md, which
prints the same lists. `train.deterministic=true` (`distgan.device.apply_numerics`) turns on
`torch.use_deterministic_algorithms`, cuDNN's deterministic mode and a fixed cuBLAS workspace;
the step then swaps the two ops that have no deterministic CUDA backward for equivalents that do
(`distgan.gan.sampler.gather_sample`, `distgan.models.r3gan.upsample2x_bilinear`).
"""

from __future__ import annotations

RAISES_ON_CUDA_WHEN_DETERMINISTIC: tuple[str, ...] = (
    "grid_sampler_2d_backward", "grid_sampler_3d_backward",
    "upsample_linear1d_backward", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward",
    "upsample_trilinear3d_backward",
    "avg_pool3d_backward", "adaptive_avg_pool2d_backward", "_adaptive_avg_pool2d_backward",
    "adaptive_avg_pool3d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
    "adaptive_max_pool3d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
    "max_unpool2d", "max_unpool3d",
    "reflection_pad1d_backward", "reflection_pad2d_backward", "reflection_pad3d_backward",
    "nll_loss_forward", "nll_loss2d_forward", "_ctc_loss_backward", "_embedding_bag_backward",
    "put_", "histc", "bincount", "median", "cumsum", "scatter_reduce",
)
"""aten ops that raise "... does not have a deterministic implementation" on CUDA under
`torch.use_deterministic_algorithms(True)` (torch 2.13's docstring of that function; a few only for
some arguments: bincount with weights, median with indices, scatter_reduce with prod, cumsum in
floating point). No op of a deterministic training step may be one of them."""

NOT_EXACT_ON_CUDA_WITHOUT_DETERMINISTIC: tuple[tuple[str, str], ...] = (
    ("grid_sampler_2d_backward", "bgc augmentation's geometric warp (atomic adds into the input "
                                 "gradient); deterministic mode samples with gather instead"),
    ("upsample_bilinear2d_backward", "r3gan's 2x upsampling (atomic adds); deterministic mode uses "
                                     "shifted adds instead"),
    ("index_put", "DiffAugment translation's backward (indexing accumulates into the gradient); "
                  "deterministic mode accumulates in a fixed order"),
    ("convolution_backward", "every convolution's weight gradient: with dist.cudnn_benchmark the "
                             "autotuner may pick another algorithm (with another summation order) "
                             "in each run; deterministic mode turns it off and cuDNN deterministic on"),
    ("scatter_add", "the backward of gather (the deterministic warp): atomic adds unless "
                    "deterministic mode is on, which it always is where the warp uses gather"),
)
"""(aten op in distgan's step, where and why): on CUDA these may change the last bits of a result
from run to run unless `train.deterministic=true`. Matmuls are exact run to run on one GPU type and
library version once cuBLAS has its fixed workspace (also set by deterministic mode)."""

EXACT_ALWAYS: tuple[tuple[str, str], ...] = (
    ("CPU", "every CPU kernel of the step is deterministic for a given machine and thread count, "
            "with or without train.deterministic"),
    ("data order", "shard order, shuffling and the split over ranks follow from train.seed and the "
                   "data position saved in every checkpoint"),
    ("RNG streams", "latents, augmentation draws and noise come from seeded generators whose "
                    "state every rank saves in every checkpoint"),
)
"""What is bit-exact between runs and across a resume on any device, deterministic mode or not."""


__all__ = ["EXACT_ALWAYS", "NOT_EXACT_ON_CUDA_WITHOUT_DETERMINISTIC", "RAISES_ON_CUDA_WHEN_DETERMINISTIC"]
