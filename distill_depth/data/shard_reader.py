"""Finding, checking and reading shard tars (no torch): the I/O half of the streams.

A shard set is read as one sequence of samples (shards in some order, samples in tar order);
readers take *pieces* ``(shard index, first sample, stop sample)`` of that sequence, so a rank or
worker opens only the shards its slice touches and skips the rest of a shard without reading it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import braceexpand

REQUIRED_ENTRIES = ("rgb.jpg", "prev.jpg", "next.jpg", "json")
"""Entries every sample has; ``depth.png`` too, except on samples whose json says ``"labelled": false``."""
_VERIFIED: set[tuple[str, int, int]] = set()  # (path, size, mtime) whose sha256 matched


class ShardError(ValueError):
    """A shard or manifest is missing, empty, truncated or corrupt; the message names the shard."""


@dataclass
class ShardSet:
    """Resolved shards: ``urls`` in manifest/pattern order; ``counts`` samples per shard if known."""

    urls: list[str]
    num_samples: int | None
    manifest: dict | None
    counts: list[int] | None = None

    def sample_counts(self) -> list[int]:
        """Samples per shard (from the manifest, or by scanning the tar headers once)."""
        if self.counts is None:
            self.counts = [count_samples(url) for url in self.urls]
            self.num_samples = sum(self.counts)
        return self.counts


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (the checksum manifest.json records)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_manifest(path: Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ShardError(f"{path}: manifest.json not found (is this a make-shards output folder?)") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ShardError(f"{path}: unreadable manifest ({error})") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise ShardError(f"{path}: manifest has no 'shards' list")
    return manifest


def _check_shard(url: str, record: dict, manifest_path: Path) -> None:
    """Size and sha256 of ``url`` against its manifest record (once per process and file version)."""
    stat = os.stat(url)
    if (url, stat.st_size, stat.st_mtime_ns) in _VERIFIED:
        return
    if "bytes" in record and stat.st_size != record["bytes"]:
        raise ShardError(f"{url}: {stat.st_size} bytes, {manifest_path} says {record['bytes']} "
                         "(truncated or replaced shard)")
    if sha256_file(url) != record.get("sha256"):
        raise ShardError(f"{url}: sha256 does not match {manifest_path} (corrupt or replaced shard)")
    _VERIFIED.add((url, stat.st_size, stat.st_mtime_ns))


def resolve_shards(spec: str, verify: bool = True) -> ShardSet:
    """A folder with ``manifest.json`` | a brace pattern ``"a-{000..003}.tar"`` | a single ``.tar``.

    When a manifest lists the shards (the folder's, or the one beside a pattern's tars) every
    shard's size and sha256 are checked against it (once per process and file version); a
    mismatch names the shard. Without a manifest, counts come from the tar headers.
    """
    spec = str(spec)
    if os.path.isdir(spec):
        manifest_path = Path(spec) / "manifest.json"
        manifest = _load_manifest(manifest_path)
        urls, counts = [], []
        for record in manifest["shards"]:
            url = str(Path(spec) / record["name"])
            if not os.path.isfile(url):
                raise ShardError(f"{url}: shard listed in {manifest_path} is missing")
            if verify:
                _check_shard(url, record, manifest_path)
            urls.append(url)
            counts.append(int(record["num_samples"]))
        if not urls:
            raise ShardError(f"{manifest_path}: lists no shards")
        return ShardSet(urls, sum(counts), manifest, counts)
    urls = list(braceexpand.braceexpand(spec)) if "{" in spec else [spec]
    for url in urls:
        if not os.path.isfile(url):
            raise ShardError(f"{url}: shard not found (from spec {spec!r})")
    # a pattern inside a make-shards folder can still use that folder's counts
    manifest_path = Path(urls[0]).parent / "manifest.json"
    if manifest_path.is_file():
        manifest = _load_manifest(manifest_path)
        by_name = {r["name"]: r for r in manifest["shards"]}
        if all(Path(u).name in by_name for u in urls):
            if verify:
                for url in urls:
                    _check_shard(url, by_name[Path(url).name], manifest_path)
            counts = [int(by_name[Path(u).name]["num_samples"]) for u in urls]
            return ShardSet(urls, sum(counts), manifest, counts)
    return ShardSet(urls, None, None, None)


def _key_and_entry(name: str) -> tuple[str, str]:
    base = os.path.basename(name)
    key, _, entry = base.partition(".")
    return os.path.join(os.path.dirname(name), key), entry


def _open_tar(url: str) -> tarfile.TarFile:
    try:
        if os.path.getsize(url) == 0:
            raise ShardError(f"{url}: empty shard (0 bytes)")
        return tarfile.open(url, mode="r:")
    except FileNotFoundError:
        raise ShardError(f"{url}: shard not found") from None
    except tarfile.TarError as error:
        raise ShardError(f"{url}: not a readable tar ({error})") from None


def count_samples(url: str) -> int:
    """Samples in a tar, from its headers; a truncated or empty tar raises :class:`ShardError`."""
    size = os.path.getsize(url) if os.path.isfile(url) else -1
    with _open_tar(url) as tar:
        keys, end = [], 0
        try:
            for member in tar:
                if member.isfile():
                    key, _ = _key_and_entry(member.name)
                    if not keys or keys[-1] != key:
                        keys.append(key)
                    end = max(end, member.offset_data + member.size)
        except tarfile.TarError as error:
            raise ShardError(f"{url}: corrupt tar ({error})") from None
    if end > size or (keys and size < end + 1024):  # data or the end-of-archive blocks cut off
        raise ShardError(f"{url}: truncated shard ({size} bytes, its entries need more)")
    if not keys:
        raise ShardError(f"{url}: shard holds no samples")
    return len(keys)


def read_pieces(urls: list[str], pieces: list[tuple[int, int, int]],
                wanted: Callable[[int], bool] | None = None) -> Iterator[tuple[int, dict]]:
    """Raw samples ``{"__key__", "__url__", entry: bytes}`` of ``pieces`` in order.

    Yields ``(position, sample)`` where position counts samples over all pieces; a sample whose
    position fails ``wanted`` is skipped without reading its bytes (it yields ``(position, None)``).
    """
    position = 0
    for shard, start, stop in pieces:
        url = urls[shard]
        index, current, members = -1, None, []

        def finish(key: str, members: list[tarfile.TarInfo], tar: tarfile.TarFile) -> dict | None:
            nonlocal position
            take = wanted is None or wanted(position)
            position += 1
            if not take:
                return None
            sample = {"__key__": os.path.basename(key), "__url__": url}
            for member in members:
                sample[_key_and_entry(member.name)[1]] = tar.extractfile(member).read()
            missing = [e for e in REQUIRED_ENTRIES if e not in sample]
            if "depth.png" not in sample and "json" in sample and decode_json(sample["json"]).get("labelled", True):
                missing.append("depth.png")
            if missing:
                raise ShardError(f"{url}: sample {sample['__key__']} lacks {missing} (incomplete or truncated shard)")
            return sample

        with _open_tar(url) as tar:
            try:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, _ = _key_and_entry(member.name)
                    if key != current:
                        if current is not None and start <= index < stop:
                            yield position, finish(current, members, tar)
                        index, current, members = index + 1, key, []
                        if index >= stop:
                            break
                    members.append(member)
                else:
                    if current is not None and start <= index < stop:
                        yield position, finish(current, members, tar)
                    index += 1
            except tarfile.TarError as error:
                raise ShardError(f"{url}: corrupt or truncated tar ({error})") from None
        if index < stop:
            raise ShardError(f"{url}: has {max(index, 0)} samples, expected at least {stop} (truncated shard)")


def sequence_pieces(counts: list[int], order: list[int], start: int, stop: int) -> list[tuple[int, int, int]]:
    """Pieces covering positions ``[start, stop)`` of the shards concatenated in ``order``."""
    pieces, offset = [], 0
    for shard in order:
        lo, hi = max(start, offset), min(stop, offset + counts[shard])
        if lo < hi:
            pieces.append((shard, lo - offset, hi - offset))
        offset += counts[shard]
    return pieces


def decode_json(data: bytes) -> dict:
    return json.loads(data)
