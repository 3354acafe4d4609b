"""Train a GAN: the launcher entry point of `distgan train`, for launchers that start a file or a
module rather than a console script. With no arguments it trains configs/default.yaml's small
GAN on the built-in emoji dataset, on CPU or GPU, and writes sample grids to runs/default/.

    accelerate launch distgan/train.py [--config F] [section.key=value ...]
    accelerate launch -m distgan.train ...
    torchrun --standalone --nproc_per_node 2 -m distgan.train ...
    python -m distgan.train ...            (or python distgan/train.py ...)

Nothing imports this module: `distgan.train` is the Python API function (distgan/__init__.py),
and importing this file as `distgan.train` would rebind that name to the module.
"""

import sys

try:
    from distgan.cli import main
except ModuleNotFoundError as e:
    if e.name != "distgan":
        raise
    # Run as a file, Python looks for the package on sys.path only: it must be installed.
    sys.exit("distgan/train.py: the distgan package is not installed; run `pip install -e .` in the repository first")

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], prog_name="distgan")
