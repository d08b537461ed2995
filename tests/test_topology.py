"""Topology: placement of ranks (pure) and the partner exchange over real gloo processes."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from distill_depth.topology import ExchangeError, Topology, TopologyError, plan_layout
from distill_depth.types import PartnerPrediction
from tests.gloo_procs import run_gloo


def test_single_process_is_colocated() -> None:
    layout = plan_layout(1)
    assert layout.mode == "colocated" and layout.n_cells == 1 and layout.ratio == 1
    assert layout.roles(0) == ("S", "U")
    assert layout.data_slice(0, 4) == (0, 4)
    assert layout.cell_batch_size(4) == 4


def test_ratio_one_pairs_neighbours() -> None:
    layout = plan_layout(4)
    assert layout.mode == "split" and layout.ratio == 1 and layout.n_cells == 2
    assert layout.group_ranks == {"S": (0, 2), "U": (1, 3)}
    assert [c.ranks for c in layout.cells] == [(0, 1), (2, 3)]
    assert [layout.roles(r) for r in range(4)] == [("S",), ("U",), ("S",), ("U",)]
    assert [layout.cell_of(r).index for r in range(4)] == [0, 0, 1, 1]
    assert [layout.data_slice(r, 3) for r in range(4)] == [(0, 3), (0, 3), (0, 3), (0, 3)]


def test_ratio_two_gives_s_the_union_of_u_slices() -> None:
    layout = plan_layout(6, sup_ranks=2)
    assert layout.ratio == 2 and layout.n_cells == 2
    assert [c.ranks for c in layout.cells] == [(0, 1, 2), (3, 4, 5)]
    assert layout.group_ranks == {"S": (0, 3), "U": (1, 2, 4, 5)}
    assert layout.cell_batch_size(4) == 8
    assert [layout.data_slice(r, 4) for r in range(6)] == [(0, 8), (0, 4), (4, 8), (0, 8), (0, 4), (4, 8)]
    # Groups never mix and cover the world.
    assert set(layout.group_ranks["S"]).isdisjoint(layout.group_ranks["U"])
    assert sorted(layout.group_ranks["S"] + layout.group_ranks["U"]) == list(range(6))


def test_default_split_of_an_odd_world_is_load_balanced() -> None:
    layout = plan_layout(3)
    assert layout.ratio == 2 and layout.group_ranks == {"S": (0,), "U": (1, 2)}


def test_colocated_on_many_ranks_and_single_branch() -> None:
    layout = plan_layout(3, mode="colocated")
    assert layout.group_ranks == {"S": (0, 1, 2), "U": (0, 1, 2)}
    assert [layout.cell_of(r).index for r in range(3)] == [0, 1, 2]
    only_s = plan_layout(2, branches=("S",))
    assert only_s.mode == "colocated" and only_s.roles(1) == ("S",)


@pytest.mark.parametrize("world, sup", [(4, 3), (5, 2), (1, None), (4, 0)])
def test_impossible_splits_are_refused(world: int, sup: int | None) -> None:
    with pytest.raises(TopologyError):
        plan_layout(world, mode="split", sup_ranks=sup)


def test_colocated_exchange_hands_over_directly() -> None:
    topo = Topology(plan_layout(1), 0)
    s, u = _prediction(["a", "b"], 1.0), _prediction(["a", "b"], 2.0)
    partners = topo.exchange({"S": s, "U": u})
    assert partners["S"] is u and partners["U"] is s


def _prediction(keys: list[str], value: float) -> PartnerPrediction:
    b = len(keys)
    depth = torch.full((b, 1, 4, 6), value) + torch.arange(b, dtype=torch.float32).view(b, 1, 1, 1)
    return PartnerPrediction(depth, depth / 100.0, depth > value + 0.5, keys)


def _worker(rank: int, world: int, store: str, queue) -> None:  # pragma: no cover (runs in a subprocess)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        layout = plan_layout(world)
        topo = Topology(layout, rank)
        keys = [f"cell{topo.cell.index}_{i}" for i in range(2 * layout.ratio)]
        lo, hi = layout.data_slice(rank, 2)
        (branch,) = topo.roles
        (partner,) = topo.exchange({branch: _prediction(keys[lo:hi], 10.0 * rank)}).values()
        result = {"keys": partner.keys, "depth": partner.depth, "valid": partner.valid, "wait": topo.timing.wait_s}
        # Second round: rank 1 claims other samples; both ends of that pair must notice.
        wrong = [k + "x" for k in keys[lo:hi]] if rank == 1 else keys[lo:hi]
        try:
            topo.exchange({branch: _prediction(wrong, 10.0 * rank)})
            result["error"] = None
        except ExchangeError as exc:
            result["error"] = str(exc)
        queue.put((rank, result))
    finally:
        dist.destroy_process_group()


def test_exchange_ratio_two_over_gloo(tmp_path) -> None:
    """3 real gloo processes, 1 S + 2 U: S gets the U ranks' tensors in slice order, each U rank its
    slice of S's; a key mismatch raises on both ends of the pair and nowhere else."""
    results = run_gloo(_worker, 3, tmp_path / "store", timeout=120)
    s, u1, u2 = results[0], results[1], results[2]
    assert s["keys"] == ["cell0_0", "cell0_1", "cell0_2", "cell0_3"]
    from_u = [_prediction(["a", "b"], 10.0), _prediction(["c", "d"], 20.0)]
    assert torch.equal(s["depth"], torch.cat([p.depth for p in from_u]))
    assert torch.equal(s["valid"], torch.cat([p.valid for p in from_u]))
    full_s = _prediction(["k"] * 4, 0.0).depth
    assert u1["keys"] == ["cell0_0", "cell0_1"] and torch.equal(u1["depth"], full_s[0:2])
    assert u2["keys"] == ["cell0_2", "cell0_3"] and torch.equal(u2["depth"], full_s[2:4])
    assert s["wait"] >= 0.0
    assert "cell0_0" in s["error"] and u1["error"] is not None and u2["error"] is None
