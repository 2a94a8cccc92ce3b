"""Reading an offline W&B run back: the records of a run-<id>.wandb file (wandb ≥ 0.19 ships no
Python reader for them).

The file is W&B's LevelDB-style log: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: full / first / middle / last)
and its bytes; a record split over blocks is its chunks joined. A record is a protobuf
wandb_internal_pb2.Record.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, version = HEADER.unpack_from(data)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B run file"
    out, pending, pos = [], b"", HEADER.size
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # the rest of a block too short for a chunk header is padding
            pos += left_in_block
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pos += CHUNK.size
        payload, pos = data[pos : pos + length], pos + length
        if kind == 0:  # zero padding at the end of the file
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def read_run(run_dir: Path) -> dict:
    """{"id", "history": [{key: value}], "config": {key: value}} of one offline-run-* directory."""
    (file,) = run_dir.glob("run-*.wandb")
    history, config = [], {}
    for record in records(file):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                            for item in record.history.item})
        elif kind in ("run", "config"):  # the config given at init, then its updates
            items = record.run.config.update if kind == "run" else record.config.update
            config.update({item.key: json.loads(item.value_json) for item in items})
    return {"id": file.stem.removeprefix("run-"), "history": history, "config": config}
