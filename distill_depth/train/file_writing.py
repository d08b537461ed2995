"""Writing files that name their failure: a full disk or a quota stops a checkpoint or an export
with the file it was writing and the space left; manifests of sizes and sha256; safetensors weights."""

from __future__ import annotations

import errno
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import save_file, save_model
from torch import nn

from distill_depth.checkpoint_io import MANIFEST, first_line
from distill_depth.data.shard_reader import sha256_file

WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
"""How a failed write shows: torch.save reports a full disk as a RuntimeError, safetensors as its own error."""


class Writing:
    """The file being written now, so that a failure (a full disk, a quota) names it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp, self.path, self.error = tmp, tmp, None

    def at(self, path: Path) -> Path:
        self.path = path
        return path

    def fail(self, exc: BaseException) -> None:
        try:
            free_bytes = shutil.disk_usage(self.tmp.parent).free
            free = f"{free_bytes / 2**20:.0f} MiB free there"
        except OSError:
            free_bytes, free = None, "free space unknown"
        full = "the disk is full: " if disk_full(exc, free_bytes) else ""
        self.error = f"writing {self.path} failed ({full}{first_line(exc)}; {free})"


def disk_full(exc: BaseException, free_bytes: int | None) -> bool:
    """Did ``exc`` come from a full disk? ENOSPC anywhere in its chain, safetensors' "(os error 28)",
    or (torch.save only says "unexpected pos ...") less than 1 MiB left. The free space alone is not
    enough: a write larger than what is left fails with space to spare, and the other ranks'
    concurrent writes change it."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return True
        seen = seen.__cause__ or seen.__context__
    text = str(exc)
    return ("No space left on device" in text or "os error 28" in text
            or (free_bytes is not None and free_bytes < 2**20))


def file_record(path: Path) -> dict[str, Any]:
    """What a manifest records of one file: its size in bytes and its sha256."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(folder: Path, files: dict[str, dict[str, Any]]) -> str:
    """Write ``folder/manifest.json`` for ``files`` (relative name → :func:`file_record`); returns
    the manifest's own sha256."""
    text = json.dumps({"format": 1, "algorithm": "sha256", "files": dict(sorted(files.items()))}, indent=1)
    (folder / MANIFEST).write_text(text)
    return hashlib.sha256(text.encode()).hexdigest()


def save_weights(model: nn.Module, path: Path) -> None:
    """``model``'s weights as safetensors (``save_model``). Under a ZeRO-1/2 engine every parameter
    is a view into one flat buffer, which ``save_model`` refuses to write (shared storage that no
    single tensor covers): then the tensors are written from copies (the same file, no ties lost:
    the branches tie no weights)."""
    state = model.state_dict()
    views: dict[int, set[int]] = {}
    for tensor in state.values():
        views.setdefault(tensor.untyped_storage().data_ptr(), set()).add(tensor.data_ptr())
    if any(len(starts) > 1 for starts in views.values()):
        save_file({name: tensor.detach().clone().contiguous() for name, tensor in state.items()}, str(path))
    else:
        # safetensors refuses non-contiguous tensors (train.channels_last weights); older versions
        # do not force contiguity by default
        save_model(model, str(path), force_contiguous=True)
