"""Training and evaluation streams over shards, split by (data_rank, data_world) and worker.

Splitting is ours, not webdataset's env-based ``split_by_node``: the topology hands each cell a
``data_rank``/``data_world``, so the ranks of one cell read the same stream. Each epoch the
shards are shuffled with ``(seed, epoch)``, concatenated into one sequence, and every
(rank, worker) *slot* takes a contiguous, equal slice of it; a slot opens only the shards its
slice touches. Every rank yields exactly ``batches_per_epoch`` full batches (open_clip's
``with_epoch`` scheme: a slot that runs out starts its slice again, reshuffled).
Workers send uint8 images (4× less to copy between processes); the float conversion to
``[0, 1]`` happens in the consuming process.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from collections.abc import Callable, Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.autodecode import Decoder, DecodingError, handle_extension

from distill_depth.data.kitti import DEPTH_PNG_SCALE
from distill_depth.data.labels import in_label_subset
from distill_depth.data.shard_reader import (
    ShardError,
    ShardSet,
    decode_json,
    read_pieces,
    resolve_shards,
    sequence_pieces,
)
from distill_depth.types import Batch

try:  # imported here, not per call: forked DataLoader workers inherit it (the import takes seconds)
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_jpeg as _tv_decode_jpeg
except Exception:  # noqa: BLE001 - a torchvision that does not match torch fails in many ways
    _tv_decode_jpeg = None

__all__ = ["ShardError", "ShardSet", "TrainStream", "eval_batches", "resolve_shards"]

IMAGE_ENTRIES = {"rgb.jpg": "image", "prev.jpg": "prev", "next.jpg": "next", "stereo.jpg": "stereo"}


# ---------------------------------------------------------------------------------------------
# decoding


def decode_depth_png(data: bytes) -> torch.Tensor:
    """uint16 metres×256 PNG → ``(1, H, W)`` float32 metres (generic decoders keep only 8 bits)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    if array.dtype != np.uint16 and array.dtype != np.int32:
        raise ValueError(f"depth PNG is {array.dtype}, expected 16-bit")
    return torch.from_numpy(array.astype(np.float32) / DEPTH_PNG_SCALE)[None]


def decode_jpeg(data: bytes) -> torch.Tensor:
    """JPEG → ``(3, H, W)`` uint8 (libjpeg-turbo through torchvision, PIL as fallback)."""
    if _tv_decode_jpeg is not None:
        try:
            return _tv_decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
        except RuntimeError:
            pass  # let PIL decode it or raise a readable error
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1).contiguous()


def decode_regions_png(data: bytes) -> torch.Tensor:
    """8-bit region bitmask PNG → ``(1, H, W)`` uint8 (bits in ``distill_depth.data.regions``)."""
    with Image.open(io.BytesIO(data)) as image:
        array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"regions PNG is {array.dtype} with {array.ndim} dims, expected 8-bit grayscale")
    return torch.from_numpy(array.copy())[None]


def _build_decoder() -> Decoder:
    # 16-bit depth first, so no generic image handler ever sees (and truncates) it
    handlers = [
        handle_extension("depth.png gt.png", decode_depth_png),
        handle_extension("regions.png", decode_regions_png),
        handle_extension("jpg", decode_jpeg),
        handle_extension("json", decode_json),
    ]
    return Decoder(handlers, pre=[], post=[])


class _SampleDecoder:
    """Raw sample → tensors; ``use_stereo``: True requires stereo.jpg, False drops it, None keeps it.

    Samples outside the label subset (``labelled_fraction``/``label_seed``, see
    :mod:`distill_depth.data.labels`) lose their ``depth.png`` before decoding.
    """

    def __init__(self, use_stereo: bool | None, labelled_fraction: float = 1.0, label_seed: int = 0) -> None:
        self.decoder = _build_decoder()
        self.use_stereo = use_stereo
        self.labelled_fraction, self.label_seed = labelled_fraction, label_seed

    def __call__(self, raw: dict) -> dict:
        if self.use_stereo and "stereo.jpg" not in raw:
            raise ShardError(f"{raw['__url__']}: sample {raw['__key__']} has no stereo.jpg (a stereo "
                             "data.u_sources mode needs shards made with make-shards --stereo)")
        if self.use_stereo is False:
            raw.pop("stereo.jpg", None)
        if not in_label_subset(raw["__key__"], self.labelled_fraction, self.label_seed):
            raw.pop("depth.png", None)
        try:
            sample = self.decoder(raw)
        except DecodingError as error:
            cause = error.__cause__
            raise ShardError(f"{raw['__url__']}: sample {raw['__key__']}: cannot decode entry "
                             f"{error.k!r} ({type(cause).__name__}: {cause})") from None
        if self.use_stereo and "stereo_T" not in sample["json"]:
            raise ShardError(f"{raw['__url__']}: sample {raw['__key__']}: json has no stereo_T")
        return sample


def collate(samples: list[dict]) -> dict:
    """Stack decoded samples; images stay uint8 until :func:`to_batch`."""
    keys = [s["__key__"] for s in samples]
    shapes = {tuple(s["rgb.jpg"].shape) for s in samples}
    if len(shapes) > 1:
        raise ShardError(f"samples {keys} have different image sizes {sorted(shapes)}: make shards with "
                         "--height/--width to train on mixed native resolutions")
    out = {"keys": keys}
    for entry, name in IMAGE_ENTRIES.items():
        if entry in samples[0]:
            out[name] = torch.stack([s[entry] for s in samples])
    no_depth = torch.zeros(1, *out["image"].shape[-2:])
    out["labelled"] = torch.tensor(["depth.png" in s for s in samples])
    out["sparse_depth"] = torch.stack([s.get("depth.png", no_depth) for s in samples])
    if any("gt.png" in s for s in samples):
        # gt.png may be larger than the images (Cityscapes --gt-full-res): a missing one is zeros of its size
        zeros = torch.zeros_like(next(s["gt.png"] for s in samples if "gt.png" in s))
        out["gt_depth"] = torch.stack([s.get("gt.png", zeros) for s in samples])
    if any("regions.png" in s for s in samples):  # a sample without labels is in no region
        blank = torch.zeros(out["sparse_depth"].shape[1:], dtype=torch.uint8)
        out["regions"] = torch.stack([s.get("regions.png", blank) for s in samples])
    out["K"] = torch.tensor([s["json"]["K"] for s in samples], dtype=torch.float32)
    if "stereo" in out:
        out["stereo_T"] = torch.tensor([s["json"]["stereo_T"] for s in samples], dtype=torch.float32)
    return out


def to_batch(raw: dict) -> Batch:
    """Collated uint8 tensors → :class:`Batch` with float images in [0, 1]."""
    as_float = lambda t: t.float().div_(255.0)  # noqa: E731
    sources = {name: as_float(raw[name]) for name in ("prev", "next", "stereo") if name in raw}
    return Batch(
        image=as_float(raw["image"]),
        sources=sources,
        sparse_depth=raw["sparse_depth"],
        K=raw["K"],
        keys=raw["keys"],
        gt_depth=raw.get("gt_depth"),
        stereo_T=raw.get("stereo_T"),
        labelled=raw.get("labelled"),
        regions=raw.get("regions"),
    )


def _buffer_shuffle(samples: Iterator, size: int, rng: random.Random) -> Iterator:
    """Reservoir-style shuffle that flushes at the end (so one pass stays one pass)."""
    buffer: list = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = rng.randrange(len(buffer))
        buffer[index], sample = sample, buffer[index]
        yield sample
    rng.shuffle(buffer)
    yield from buffer


def _slice_bounds(total: int, slots: int, slot: int) -> tuple[int, int]:
    """Contiguous equal slice ``slot`` of ``total`` positions (sizes differ by at most one)."""
    if total < slots:  # degenerate: more slots than samples; slots share samples
        slot, slots = slot % total, total
    return slot * total // slots, (slot + 1) * total // slots


# ---------------------------------------------------------------------------------------------
# training


class _TrainEpoch(IterableDataset):
    """One epoch of one data rank; each DataLoader worker yields its slot's batches."""

    def __init__(self, stream: TrainStream, epoch: int, start_batch: int) -> None:
        self.stream, self.epoch, self.start_batch = stream, epoch, start_batch

    def __iter__(self) -> Iterator[dict]:
        s = self.stream
        info = get_worker_info()
        workers = s.num_workers_effective
        physical = info.id if info is not None else 0
        # the DataLoader always asks worker 0 first: rotate roles so a resumed epoch keeps order
        logical = (physical + self.start_batch) % workers
        first_global = self.start_batch + (logical - self.start_batch) % workers
        skip = first_global // workers
        slot = s.data_rank * workers + logical
        lo, hi = _slice_bounds(s.num_samples, s.data_world * workers, slot)
        order = list(range(len(s.shards.urls)))
        random.Random(f"shards-{s.seed}-{self.epoch}").shuffle(order)
        pieces = sequence_pieces(s.counts, order, lo, hi)
        decode = _SampleDecoder(s.use_stereo, s.labelled_fraction, s.label_seed)

        def raw_samples() -> Iterator[dict]:
            for pass_index in itertools.count():
                rng = random.Random(f"samples-{s.seed}-{self.epoch}-{slot}-{pass_index}")
                positions = (sample for _, sample in read_pieces(s.shards.urls, pieces))
                yield from _buffer_shuffle(positions, s.shuffle_buffer, rng)

        batch: list[dict] = []
        needed = s.worker_batches * s.batch_size
        skipped = skip * s.batch_size
        for taken, raw in enumerate(raw_samples()):
            if taken >= needed:
                return
            if taken < skipped:
                continue  # resume: no decoding for batches already trained on
            batch.append(decode(raw))
            if len(batch) == s.batch_size:
                yield collate(batch)
                batch = []


class TrainStream:
    """Training batches for one data rank; every rank gets ``batches_per_epoch`` full batches.

    Deterministic for ``(seed, epoch, data_rank, data_world, num_workers)``: ranks of a cell
    that share ``data_rank`` read identical streams.
    """

    def __init__(self, spec: str, batch_size: int, data_rank: int, data_world: int, *, num_workers: int = 1,
                 seed: int = 0, samples_per_epoch: int | None = None, use_stereo: bool = False,
                 shuffle_buffer: int = 64, labelled_fraction: float = 1.0, label_seed: int = 0) -> None:
        if not 0 <= data_rank < data_world:
            raise ValueError(f"data_rank {data_rank} outside data_world {data_world}")
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be >= 1")
        self.shards = resolve_shards(spec)
        if use_stereo and self.shards.manifest is not None and not self.shards.manifest.get("stereo", False):
            raise ShardError(f"{spec}: a stereo data.u_sources mode (stereo, temporal+stereo) needs shards "
                             "made with make-shards --stereo (the manifest says stereo: false)")
        self.counts = self.shards.sample_counts()
        self.num_samples = sum(self.counts)
        self.batch_size, self.data_rank, self.data_world = batch_size, data_rank, data_world
        self.num_workers, self.seed, self.use_stereo = num_workers, seed, use_stereo
        self.shuffle_buffer = max(1, shuffle_buffer)
        self.labelled_fraction, self.label_seed = labelled_fraction, label_seed
        self.num_workers_effective = max(1, num_workers)
        per_epoch = samples_per_epoch or self.num_samples
        rank_batches = math.ceil(per_epoch / (batch_size * data_world))
        self.worker_batches = math.ceil(rank_batches / self.num_workers_effective)
        self.batches_per_epoch = self.worker_batches * self.num_workers_effective
        """Identical on every data rank (rounded up to a multiple of the worker count)."""

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[Batch]:
        """The batches of ``epoch`` from index ``start_batch`` on (resume skips without decoding)."""
        if not 0 <= start_batch <= self.batches_per_epoch:
            raise ValueError(f"start_batch {start_batch} outside 0..{self.batches_per_epoch}")
        if start_batch == self.batches_per_epoch:
            return
        dataset = _TrainEpoch(self, epoch, start_batch)
        yield from _iterate(dataset, self.num_workers)


def _iterate(dataset: IterableDataset, num_workers: int) -> Iterator[Batch]:
    if num_workers <= 0:
        for raw in dataset:
            yield to_batch(raw)
        return
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers, prefetch_factor=4)
    for raw in loader:
        yield to_batch(raw)


# ---------------------------------------------------------------------------------------------
# evaluation


class _EvalRank(IterableDataset):
    """Rank ``rank``'s contiguous slice in manifest order; worker w yields batches j ≡ w (mod W)."""

    def __init__(self, shards: ShardSet, batch_size: int, rank: int, world: int, workers: int) -> None:
        self.shards, self.batch_size, self.workers = shards, batch_size, max(1, workers)
        counts = shards.sample_counts()
        total = sum(counts)
        lo, hi = rank * total // world, (rank + 1) * total // world
        self.pieces = sequence_pieces(counts, list(range(len(counts))), lo, hi)

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        mine: Callable[[int], bool] = lambda p: (p // self.batch_size) % self.workers == worker  # noqa: E731
        decode = _SampleDecoder(use_stereo=None)
        batch: list[dict] = []
        for _, raw in read_pieces(self.shards.urls, self.pieces, wanted=mine):
            if raw is None:
                continue
            batch.append(decode(raw))
            if len(batch) == self.batch_size:
                yield collate(batch)
                batch = []
        if batch:
            yield collate(batch)


def eval_batches(spec: str, batch_size: int, rank: int, world: int, *, num_workers: int = 0) -> Iterator[Batch]:
    """Every sample exactly once across ranks and workers, in manifest order; last batch may be short."""
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside world {world}")
    dataset = _EvalRank(resolve_shards(spec), batch_size, rank, world, num_workers)
    yield from _iterate(dataset, num_workers)
