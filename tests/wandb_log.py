"""Read back an offline W&B run's binary log (`run-*.wandb`) in tests.

wandb 0.31 ships no public reader for offline runs, and searching the raw file is flaky: the log is
LevelDB's record format, so every 32 KiB block starts with a 7-byte chunk header (CRC, length, type)
that can split a key in two or sit right after a value (a CRC byte such as `E` once extended a float).
This reader removes the framing, checks every chunk's length and type, and parses each record with
wandb's own protobuf schema. `run.finish()` can return before wandb's service has flushed the log's
last 4 KiB pages (seen once in twelve runs here), so `read_records` waits for the run's exit record.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path

_FILE_HEADER = b":W&B"
_FILE_HEADER_SIZE = 7  # ":W&B", 2-byte magic, 1-byte version
_BLOCK_SIZE = 32 * 1024
_CHUNK_HEADER_SIZE = 7  # crc32 (4), length (2, little endian), type (1)
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def record_payloads(path: Path) -> Iterator[bytes]:
    """Every record's bytes in order, with the block and chunk framing removed, as the file is now."""
    data = Path(path).read_bytes()
    if not data.startswith(_FILE_HEADER):
        raise ValueError(f"{path}: not a W&B run log (starts with {data[:4]!r})")
    offset, pending = _FILE_HEADER_SIZE, None
    while offset + _CHUNK_HEADER_SIZE <= len(data):
        left_in_block = _BLOCK_SIZE - offset % _BLOCK_SIZE
        if left_in_block < _CHUNK_HEADER_SIZE:  # the writer pads a block's tail with zeros
            offset += left_in_block
            continue
        length, kind = struct.unpack_from("<HB", data, offset + 4)
        if length == 0 and kind == 0:  # zero padding at the end of a block or the file
            offset += left_in_block
            continue
        body = data[offset + _CHUNK_HEADER_SIZE: offset + _CHUNK_HEADER_SIZE + length]
        if len(body) != length or length > left_in_block - _CHUNK_HEADER_SIZE:
            raise ValueError(f"{path}: chunk at byte {offset} claims {length} bytes, the block has fewer")
        offset += _CHUNK_HEADER_SIZE + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind in (_MIDDLE, _LAST) and pending is not None:
            pending += body
            if kind == _LAST:
                yield pending
                pending = None
        else:
            raise ValueError(f"{path}: chunk at byte {offset} has type {kind} out of order")


def read_records(path: Path, timeout_s: float = 60.0) -> list:
    """Every record of a finished run as wandb's `Record` protobuf, waiting up to `timeout_s` for the
    service to write the exit record (the last one of a run)."""
    from wandb.proto import wandb_internal_pb2

    deadline = time.monotonic() + timeout_s
    while True:
        records = []
        try:
            for payload in record_payloads(path):
                record = wandb_internal_pb2.Record()
                record.ParseFromString(payload)
                records.append(record)
        except ValueError:  # a chunk still being written
            if time.monotonic() > deadline:
                raise
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path}: no exit record after {timeout_s} s (last: {records[-1:]})")
        time.sleep(0.2)


def log_content(path: Path) -> bytes:
    """All records' bytes joined: what a substring search of the log should read."""
    return b"".join(record.SerializeToString() for record in read_records(path))


def final_summary(path: Path) -> dict:
    """The run's summary, key -> value, from its summary records (later updates win)."""
    summary: dict = {}
    for record in read_records(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                key = "/".join(item.nested_key) if item.nested_key else item.key
                summary[key] = json.loads(item.value_json)
            for item in record.summary.remove:
                summary.pop("/".join(item.nested_key) if item.nested_key else item.key, None)
    return summary
