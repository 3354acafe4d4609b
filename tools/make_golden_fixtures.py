"""Make the golden test fixtures: distgan against the reference implementations, number for number.

    git clone https://github.com/NVlabs/stylegan2-ada-pytorch /tmp/sg2ada
    git clone https://github.com/brownvc/R3GAN /tmp/r3gan
    .venv/bin/python tools/make_golden_fixtures.py --stylegan2-ada /tmp/sg2ada --r3gan /tmp/r3gan [--only PART]

Each part (`tools/golden/<part>.py`) builds the reference's own modules at tiny widths on CPU
(their custom ops fall back to their pure-PyTorch paths there), copies the weights into distgan's
networks by name, runs fixed inputs through both, and writes small fixture files under
`tests/fixtures/golden/<part>/`: weights, inputs and the reference's outputs (and, for losses, the
reference's gradients), with metadata naming the reference repository, its commit, and the torch
and numpy versions. The tests in `tests/unit/test_golden_*.py` compare distgan to these files
without the references present. The references are fetched by you, never vendored or shipped.

Both references have top-level packages of the same names (`dnnlib`, `torch_utils`, `training`),
so each part runs in its own Python process with only its reference on `sys.path`.
Nothing here is imported by distgan or its tests.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# part -> which reference it needs
PARTS = {
    "stylegan2_nets": "stylegan2_ada",
    "r3gan_nets": "r3gan",
    "augment": "stylegan2_ada",
    "losses_stylegan2": "stylegan2_ada",
    "losses_r3gan": "r3gan",
}


def commit_of(checkout: Path) -> str:
    """The checkout's commit (git rev-parse HEAD), or "" when it is not a git work tree."""
    out = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stylegan2-ada", type=Path, help="checkout of NVlabs/stylegan2-ada-pytorch")
    parser.add_argument("--r3gan", type=Path, help="checkout of brownvc/R3GAN")
    parser.add_argument("--stylegan2-ada-commit", default="", help="its commit, when the checkout is not a git tree")
    parser.add_argument("--r3gan-commit", default="", help="its commit, when the checkout is not a git tree")
    parser.add_argument("--only", choices=sorted(PARTS), action="append", help="make only these parts")
    args = parser.parse_args()
    refs = {"stylegan2_ada": (args.stylegan2_ada, args.stylegan2_ada_commit),
            "r3gan": (args.r3gan, args.r3gan_commit)}
    for part in args.only or PARTS:
        checkout, commit = refs[PARTS[part]]
        if checkout is None:
            print(f"skip {part}: no --{PARTS[part].replace('_', '-')} checkout given")
            continue
        commit = commit or commit_of(checkout)
        if not commit:
            sys.exit(f"{checkout} is not a git checkout: pass --{PARTS[part].replace('_', '-')}-commit")
        out = ROOT / "tests" / "fixtures" / "golden" / part
        out.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(checkout.resolve()), str(ROOT)]))
        cmd = [sys.executable, "-m", f"tools.golden.{part}", "--reference", str(checkout.resolve()),
               "--commit", commit, "--out", str(out)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, cwd=ROOT, check=True)


if __name__ == "__main__":
    main()
