"""Reads an offline W&B run file (``run-<id>.wandb``) back, for tests.

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB blocks
of records, each with a 7-byte header (crc32, length, type) and a protobuf ``Record``.
"""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def raw_records(path: Path):
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            buf = chunk
        elif kind == MIDDLE:
            buf += chunk
        elif kind == LAST:
            yield buf + chunk


def read_run(path: Path, timeout: float = 60.0) -> dict:
    """History rows, summary, tags, config, group and name of an offline run. W&B's writer process
    may still be flushing after ``finish()`` returns on a loaded machine, so the file is read again
    until it holds the run's ``exit`` record (or ``timeout`` seconds pass: then what is there)."""
    deadline = time.monotonic() + timeout
    while True:
        out = _read(path)
        if out["exited"] or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def _read(path: Path) -> dict:
    from wandb.proto import wandb_internal_pb2

    out = {"history": [], "summary": {}, "tags": [], "config": {}, "group": None, "name": None, "exited": False}
    for data in raw_records(path):
        rec = wandb_internal_pb2.Record()
        rec.ParseFromString(data)
        kind = rec.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.history.item})
        elif kind == "summary":
            out["summary"].update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in rec.summary.update})
        elif kind == "run":
            out["tags"] += list(rec.run.tags)
            out["group"], out["name"] = rec.run.run_group or out["group"], rec.run.display_name or out["name"]
            for item in rec.run.config.update:
                out["config"][item.key] = json.loads(item.value_json)
        elif kind == "exit":
            out["exited"] = True
        elif kind == "config":
            for item in rec.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return out
