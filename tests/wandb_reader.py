"""Read back what an offline W&B run wrote, for tests (no server, no `wandb.Api`).

wandb 0.31 keeps no history/summary JSON for offline runs; the only record is the
`run-<id>.wandb` log (see /work/shared/reference/STACK-NOTES.md, "wandb 0.31 offline"):

* a 7-byte file header: b":W&B", uint16 LE magic 0xBEE1, one version byte;
* then 32 KiB blocks of chunks, each with a 7-byte header: crc32 (uint32 LE), length
  (uint16 LE), type (1 full, 2 first, 3 middle, 4 last), where
  crc = crc32(data, crc32(bytes([type]))); a block tail shorter than 7 bytes is padding;
* the joined chunks of each record are a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a valid `.wandb` log (bad header, checksum or chunk order)."""


def iter_payloads(path: str | Path) -> list[bytes]:
    """Raw record payloads, checksums verified, in write order."""
    data = Path(path).read_bytes()
    if len(data) < HEADER or data[:4] != b":W&B" or struct.unpack("<H", data[4:6])[0] != 0xBEE1:
        raise WandbFileError(f"{path}: not a W&B log (header {data[:7]!r})")
    records, pending, pos = [], None, HEADER
    while pos < len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < HEADER:  # padding at the end of a block
            pos += left_in_block
            continue
        if pos + HEADER > len(data):
            break
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if crc == 0 and length == 0 and kind == 0:  # zero fill after the last record
            pos += left_in_block
            continue
        chunk = data[pos + HEADER:pos + HEADER + length]
        if len(chunk) < length:
            break  # a record still being written; everything before it is valid
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: checksum mismatch at byte {pos}")
        pos += HEADER + length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = bytearray(chunk)
        elif kind in (MIDDLE, LAST):
            if pending is None:
                raise WandbFileError(f"{path}: continuation chunk without a first chunk at byte {pos}")
            pending += chunk
            if kind == LAST:
                records.append(bytes(pending))
                pending = None
        else:
            raise WandbFileError(f"{path}: unknown chunk type {kind} at byte {pos}")
    return records


@dataclass
class WandbRun:
    """What one `.wandb` file says: run facts, config, and history rows."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    entity: str = ""
    group: str = ""
    tags: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)
    """define_metric records: {"name" or "glob_name", "step_metric"}."""
    alerts: list[dict[str, str]] = field(default_factory=list)
    """`run.alert` records: {"title", "text", "level"}."""
    record_types: dict[str, int] = field(default_factory=dict)

    def column(self, key: str) -> list[Any]:
        """Values of `key` in the order logged (rows without it are skipped)."""
        return [row[key] for row in self.history if key in row]

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        return [row for row in self.history if key in row]

    def images(self, key: str) -> list[dict[str, Any]]:
        """The image values logged under `key` ({"_type": "image-file", "path": ..., ...})."""
        return [row[key] for row in self.history if isinstance(row.get(key), dict) and row[key].get("_type") == "image-file"]


def _key(item) -> str:
    return "/".join(item.nested_key) if item.nested_key else item.key


def _items_to_dict(items) -> dict[str, Any]:
    """History/summary items -> one dict. Media values arrive split into nested keys
    (["samples/ema", "_type"] -> "image-file"); they are put back together as dicts."""
    out: dict[str, Any] = {}
    for item in items:
        path = list(item.nested_key) or [item.key]
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = json.loads(item.value_json)
    return out


def _merge_config(config: dict, items) -> None:
    for item in items:
        value = json.loads(item.value_json)
        # Config values are stored as {"value": ..., "desc": ...} in the run record.
        config[_key(item)] = value["value"] if isinstance(value, dict) and set(value) <= {"value", "desc"} and "value" in value else value


def read_run(path: str | Path) -> WandbRun:
    """Parse one `run-<id>.wandb` file into a WandbRun."""
    from wandb.proto import wandb_internal_pb2 as pb

    run = WandbRun(Path(path))
    for payload in iter_payloads(path):
        rec = pb.Record()
        rec.ParseFromString(payload)
        kind = rec.WhichOneof("record_type") or "?"
        run.record_types[kind] = run.record_types.get(kind, 0) + 1
        if kind == "run":
            r = rec.run
            run.run_id, run.project, run.entity = r.run_id, r.project, r.entity
            run.name, run.group, run.tags = r.display_name, r.run_group, list(r.tags)
            _merge_config(run.config, r.config.update)
        elif kind == "config":
            _merge_config(run.config, rec.config.update)
        elif kind == "history":
            run.history.append(_items_to_dict(rec.history.item))
        elif kind == "summary":
            run.summary.update(_items_to_dict(rec.summary.update))
        elif kind == "metric":
            m = rec.metric
            run.metrics.append({"name": m.name, "glob_name": m.glob_name, "step_metric": m.step_metric})
        elif kind == "alert":
            run.alerts.append({"title": rec.alert.title, "text": rec.alert.text, "level": rec.alert.level})
    return run


def find_runs(run_dir: str | Path) -> list[Path]:
    """Every offline `.wandb` file under a distgan run folder, oldest first."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"), key=lambda p: p.parent.name)
