"""Ranks → branch roles, cells and process groups; the exchange of predictions between partners.

Placement (``plan_layout``):
  * colocated: every rank runs every trained branch; each rank is its own cell; the branches'
    gradients are averaged over the whole world; the exchange is a direct hand-over.
  * split: the world is cut into contiguous cells of ``1 + r`` ranks, the first an S rank and
    the other ``r`` U ranks (partners stay on one node when a node holds whole cells). The S
    group is every cell's first rank, the U group the rest. The data stream is split by cell:
    every rank of a cell reads the same batches of ``r · batch_size`` samples; U rank ``j`` of
    the cell trains on slice ``j`` and the S rank on the union.

The topology knows ranks and tensors, never models or losses.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.distributed as dist

from distill_depth.types import PartnerPrediction

Role = Literal["S", "U"]


class TopologyError(ValueError):
    """A world size / ``topology.*`` combination that cannot be laid out."""


class ExchangeError(RuntimeError):
    """The partner's tensors belong to other samples than ours (the streams diverged)."""


@dataclass(frozen=True)
class Cell:
    index: int
    sup_rank: int | None
    """The S rank (``None`` in colocated mode, where the one rank runs everything)."""
    unsup_ranks: tuple[int, ...]
    """U ranks in slice order (U rank ``j`` trains on slice ``j`` of the cell's batch)."""

    @property
    def ranks(self) -> tuple[int, ...]:
        return ((self.sup_rank,) if self.sup_rank is not None else ()) + self.unsup_ranks


@dataclass(frozen=True)
class Layout:
    """A pure description of the placement; the same on every rank."""

    world: int
    mode: Literal["colocated", "split"]
    branches: tuple[str, ...]
    cells: tuple[Cell, ...]
    group_ranks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """Ranks over which each branch's gradients are averaged."""

    @property
    def ratio(self) -> int:
        """r: U ranks per S rank (1 when colocated)."""
        return len(self.cells[0].unsup_ranks) if self.mode == "split" else 1

    @property
    def n_cells(self) -> int:
        return len(self.cells)

    def roles(self, rank: int) -> tuple[str, ...]:
        return tuple(b for b in self.branches if rank in self.group_ranks[b])

    def cell_of(self, rank: int) -> Cell:
        for cell in self.cells:
            if rank in cell.ranks or (self.mode == "colocated" and cell.index == rank):
                return cell
        raise TopologyError(f"rank {rank} is in no cell of a world of {self.world}")

    def data_slice(self, rank: int, batch_size: int) -> tuple[int, int]:
        """The ``[start, stop)`` part of the cell's batch this rank trains on."""
        if self.mode == "colocated":
            return 0, batch_size
        cell = self.cell_of(rank)
        if rank == cell.sup_rank:
            return 0, batch_size * len(cell.unsup_ranks)
        j = cell.unsup_ranks.index(rank)
        return j * batch_size, (j + 1) * batch_size

    def cell_batch_size(self, batch_size: int) -> int:
        """Samples every rank of a cell reads per micro-step (``r · batch_size``)."""
        return batch_size * self.ratio


def plan_layout(
    world: int, mode: str = "auto", sup_ranks: int | None = None, branches: tuple[str, ...] = ("S", "U")
) -> Layout:
    """Lay ``world`` ranks out into cells and groups (see the module docstring)."""
    if world < 1:
        raise TopologyError(f"world size must be >= 1, got {world}")
    branches = tuple(branches)
    if mode not in ("auto", "colocated", "split"):
        raise TopologyError(f"topology.mode: {mode!r} is not one of auto, colocated, split")
    # One branch trains alone (S-only / U-only baselines): nothing to split.
    if mode == "auto":
        mode = "colocated" if world == 1 or len(branches) == 1 else "split"
    if mode == "colocated":
        everyone = tuple(range(world))
        cells = tuple(Cell(i, None, (i,)) for i in range(world))
        return Layout(world, "colocated", branches, cells, {b: everyone for b in branches})
    if len(branches) != 2:
        raise TopologyError(f"topology.mode=split needs both branches, got branches={list(branches)}")
    if world < 2:
        raise TopologyError("topology.mode=split needs at least 2 ranks (use colocated on 1 process)")
    n_sup = world // 2 if sup_ranks is None else sup_ranks
    n_unsup = world - n_sup
    if n_sup < 1 or n_unsup < 1 or n_unsup % n_sup != 0:
        raise TopologyError(
            f"topology.sup_ranks={n_sup} on a world of {world}: needs 1 <= S ranks and the "
            f"{n_unsup} U ranks to be a multiple of the S ranks"
        )
    r = n_unsup // n_sup
    cells = []
    for c in range(n_sup):
        first = c * (1 + r)
        cells.append(Cell(c, first, tuple(range(first + 1, first + 1 + r))))
    groups = {
        "S": tuple(cell.sup_rank for cell in cells),
        "U": tuple(u for cell in cells for u in cell.unsup_ranks),
    }
    return Layout(world, "split", branches, tuple(cells), groups)


def key_hash(keys: list[str]) -> torch.Tensor:
    """``(B,)`` int64 stable hashes of sample keys (travel with the tensors to check pairing)."""
    values = [int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "little") >> 1 for k in keys]
    return torch.tensor(values, dtype=torch.int64)


@dataclass
class ExchangeTiming:
    exchange_s: float = 0.0
    """Whole exchange: packing, posting, waiting, unpacking."""
    wait_s: float = 0.0
    """Part of ``exchange_s`` spent blocked on the partner's tensors."""


class Topology:
    """This rank's view of a ``Layout``: roles, groups, data split and the partner exchange.

    Construction creates every process group on every rank in the same order (torch requires
    it): one group per branch, then one group per cell (the point-to-point ops of a cell run in
    its own communicator, so NCCL never needs the whole world for a pair's first exchange).
    """

    def __init__(self, layout: Layout, rank: int, device: torch.device | str = "cpu") -> None:
        self.layout = layout
        self.rank = rank
        self.device = torch.device(device)
        self.roles = layout.roles(rank)
        self.cell = layout.cell_of(rank)
        self.groups: dict[str, dist.ProcessGroup | None] = {}
        self.cell_group: dist.ProcessGroup | None = None
        self.timing = ExchangeTiming()
        distributed = dist.is_available() and dist.is_initialized() and layout.world > 1
        if distributed:
            for branch in layout.branches:
                ranks = list(layout.group_ranks[branch])
                group = dist.new_group(ranks) if len(ranks) < layout.world else dist.group.WORLD
                if rank in ranks:
                    self.groups[branch] = group
            if layout.mode == "split":
                for cell in layout.cells:
                    group = dist.new_group(list(cell.ranks))
                    if cell is self.cell:
                        self.cell_group = group
        else:
            self.groups = {b: None for b in self.roles}

    # --- data --------------------------------------------------------------------------------
    @property
    def data_rank(self) -> int:
        return self.cell.index

    @property
    def data_world(self) -> int:
        return self.layout.n_cells

    def group_rank(self, branch: str) -> int:
        """Index of this rank inside ``branch``'s group."""
        return self.layout.group_ranks[branch].index(self.rank)

    def group_size(self, branch: str) -> int:
        return len(self.layout.group_ranks[branch])

    def is_group_leader(self, branch: str) -> bool:
        """The group's first rank: it saves and reports its branch."""
        return self.layout.group_ranks[branch][0] == self.rank

    # --- exchange ----------------------------------------------------------------------------
    def exchange(self, own: dict[str, PartnerPrediction]) -> dict[str, PartnerPrediction | None]:
        """Trade detached predictions with the partner(s); returns ``{branch: partner's prediction}``.

        ``own`` maps each branch this rank runs to its ``Prediction.for_partner()``. Colocated:
        the other local branch's copy is handed over directly. Split: the S rank sends slice
        ``j`` of its prediction to U rank ``j`` and receives the U ranks' predictions in slice
        order; the sample keys' hashes travel along and a mismatch raises ``ExchangeError``.
        """
        start = time.perf_counter()
        if self.layout.mode == "colocated" or len(self.layout.branches) < 2:
            result = {b: own.get(_other(b)) for b in own}
            self.timing = ExchangeTiming(time.perf_counter() - start, 0.0)
            return result
        (branch,) = own
        mine = own[branch]
        if branch == "S":
            parts = [mine.slice(j * self._u_size(mine), (j + 1) * self._u_size(mine)) for j in range(self.layout.ratio)]
            peers = list(self.cell.unsup_ranks)
        else:
            parts = [mine]
            peers = [self.cell.sup_rank]
        sends = [_pack(p, self.device) for p in parts]
        recvs = [(torch.empty_like(packed), torch.empty_like(hashes)) for packed, hashes in sends]
        ops = []
        for peer, (packed, hashes), (r_packed, r_hashes) in zip(peers, sends, recvs):
            ops += [
                dist.P2POp(dist.isend, packed, peer, group=self.cell_group),
                dist.P2POp(dist.isend, hashes, peer, group=self.cell_group),
                dist.P2POp(dist.irecv, r_packed, peer, group=self.cell_group),
                dist.P2POp(dist.irecv, r_hashes, peer, group=self.cell_group),
            ]
        wait_start = time.perf_counter()
        for request in dist.batch_isend_irecv(ops):
            request.wait()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        wait = time.perf_counter() - wait_start
        received = []
        for peer, part, (r_packed, r_hashes) in zip(peers, parts, recvs):
            expected = key_hash(part.keys).to(r_hashes.device)
            if not torch.equal(expected, r_hashes):
                raise ExchangeError(
                    f"rank {self.rank} ({branch}) got predictions of other samples from rank {peer}: "
                    f"our keys {part.keys} do not match the partner's (check that partners read the same stream)"
                )
            received.append(_unpack(r_packed, part.keys))
        self.timing = ExchangeTiming(time.perf_counter() - start, wait)
        return {branch: PartnerPrediction.cat(received)}

    def _u_size(self, pred: PartnerPrediction) -> int:
        size = pred.depth.shape[0]
        if size % self.layout.ratio:
            raise TopologyError(f"S batch of {size} cannot be cut into {self.layout.ratio} U slices")
        return size // self.layout.ratio


def _other(branch: str) -> str:
    return "U" if branch == "S" else "S"


def _pack(pred: PartnerPrediction, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(B, 3, H, W)`` fp32 tensor (depth, confidence, valid) and ``(B,)`` key hashes."""
    packed = torch.cat([pred.depth.float(), pred.confidence.float(), pred.valid.float()], dim=1).contiguous()
    return packed.to(device), key_hash(pred.keys).to(device)


def _unpack(packed: torch.Tensor, keys: list[str]) -> PartnerPrediction:
    return PartnerPrediction(packed[:, 0:1], packed[:, 1:2], packed[:, 2:3] > 0.5, list(keys))
