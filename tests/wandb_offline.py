"""Read a W&B offline run (<run dir>/wandb/offline-run-*/run-*.wandb) without wandb.Api: the file is
a LevelDB-style log (7-byte header, 32 KiB blocks of chunks: crc32 u32, length u16, type u8, data)
of wandb_internal_pb2.Record messages. Returns the run's config, summary/history keys, group, tags.
A run still writing its file is read up to its last whole chunk (a test polls until the exit record)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, buf = HEADER, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer: padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding
            pos += left
            continue
        if pos + 7 + length > len(data):  # the last chunk still being written (a live run): stop there
            break
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, FIRST):
            buf = chunk
        else:
            buf += chunk
        if kind in (FULL, LAST):
            rec = pb.Record()
            rec.ParseFromString(buf)
            yield rec
            buf = b""


def read_run(run_dir: Path) -> dict:
    """{'config': {key: value}, 'history': {key: last value}, 'summary': {...}, 'group', 'tags', 'name',
    'exit_code' (None until the run has finished)}."""
    out = {"config": {}, "history": {}, "summary": {}, "group": None, "tags": [], "name": None, "exit_code": None}
    for path in Path(run_dir).glob("*.wandb"):
        for rec in records(path):
            kind = rec.WhichOneof("record_type")
            if kind == "run":
                out["group"] = rec.run.run_group or out["group"]
                out["tags"] = list(rec.run.tags) or out["tags"]
                out["name"] = rec.run.display_name or out["name"]
                for item in rec.run.config.update:
                    out["config"][item.key] = json.loads(item.value_json)
            elif kind == "config":
                for item in rec.config.update:
                    out["config"][item.key] = json.loads(item.value_json)
            elif kind == "exit":
                out["exit_code"] = int(rec.exit.exit_code)
            elif kind == "history":
                for item in rec.history.item:
                    key = item.key or "/".join(item.nested_key)
                    out["history"][key] = json.loads(item.value_json)
            elif kind == "summary":
                for item in rec.summary.update:
                    key = item.key or "/".join(item.nested_key)
                    out["summary"][key] = json.loads(item.value_json)
    return out
