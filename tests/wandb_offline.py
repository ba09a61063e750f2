"""Read back what an offline W&B run wrote, for tests: no mock, the real transaction log.

wandb 0.31 keeps no Python reader for its `.wandb` files (the datastore moved into the Go
core) and writes no wandb-summary.json offline, so this parses the file itself. The format is
LevelDB's log format: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB
blocks of records, each with a 7-byte header (crc32c, length, type FULL/FIRST/MIDDLE/LAST);
each record's payload is a serialized `wandb_internal_pb2.Record`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> list:
    """Every protobuf Record in a run-*.wandb file, in order."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B transaction log"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        pos += HEADER
        chunk = data[pos : pos + length]
        pos += length
        if kind == FULL:
            records.append(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            records.append(pending + chunk)
    parsed = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        parsed.append(record)
    return parsed


@dataclass
class OfflineRun:
    """What one offline run directory (RUN/wandb/offline-run-*) holds."""

    path: Path
    run_id: str = ""
    project: str = ""
    name: str = ""
    group: str = ""
    tags: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    history: list = field(default_factory=list)  # one dict per wandb.log call, JSON-decoded

    def tables(self, key: str) -> list[dict]:
        """The logged tables under `key`, each as {"columns": [...], "data": [[...], ...]}."""
        out = []
        for row in self.history:
            if f"{key}/path" in row:
                out.append(json.loads((self.path / "files" / row[f"{key}/path"]).read_text()))
        return out


def read_offline_runs(wandb_dir: Path) -> list[OfflineRun]:
    """All offline runs under a `wandb/` directory, oldest first."""
    runs = []
    for run_dir in sorted(Path(wandb_dir).glob("offline-run-*")):
        (log,) = run_dir.glob("run-*.wandb")
        run = OfflineRun(path=run_dir)
        for record in read_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.run_id, run.project, run.name = record.run.run_id, record.run.project, record.run.display_name
                run.group = record.run.run_group
                run.tags = list(record.run.tags)
                for item in record.run.config.update:
                    run.config[item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    run.config[item.key] = json.loads(item.value_json)
            elif kind == "history":
                run.history.append(
                    {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                     for item in record.history.item}
                )
        runs.append(run)
    return runs
