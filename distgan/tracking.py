"""Run tracking from the main process: `metrics.jsonl` in the run folder, and W&B.

`metrics.jsonl` mirrors every scalar row, so nothing depends on the W&B server.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distgan.config import Config


class Tracker:
    """Writes scalar rows and images; a no-op on non-main ranks."""

    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, run_id: str = ""):
        self.cfg, self.run_dir, self.is_main = cfg, Path(run_dir), is_main
        self.run_id = run_id
        if is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a") if is_main else None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if not self.is_main:
            return
        row = {"step": step, **{k: _clean(v) for k, v in scalars.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()

    def log_image(self, step: int, name: str, path: Path, caption: str = "") -> None:
        """Images are already saved as PNGs in the run folder; remote trackers upload them."""

    def finish(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _clean(value: Any) -> Any:
    value = float(value)
    return value if math.isfinite(value) else str(value)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
