"""Per-branch random streams: independent of each other, of the process's own RNG, and resumable."""

from __future__ import annotations

import pytest
import torch

from distill_depth.train.rng import BranchStreams, stream_seed

CPU = torch.device("cpu")


def _draws(streams: BranchStreams, name: str, n: int = 4) -> torch.Tensor:
    with streams.use(name):
        return torch.rand(n)


def test_a_branch_stream_ignores_the_other_branch_and_the_process_rng() -> None:
    """S's draws are the same whether U draws in between (colocated) or not (S alone or on its own
    rank), and whatever the global generator did; the global generator is left untouched."""
    alone = BranchStreams(0, {"S": 0}, CPU)
    together = BranchStreams(0, {"S": 0, "U": 0}, CPU)
    torch.manual_seed(123)
    expected_global = torch.rand(3)
    torch.manual_seed(123)
    s_alone = [_draws(alone, "S") for _ in range(3)]
    s_together = []
    for _ in range(3):
        s_together.append(_draws(together, "S"))
        _draws(together, "U", n=7)
    assert torch.equal(torch.rand(3), expected_global)
    for a, b in zip(s_alone, s_together):
        assert torch.equal(a, b)
    assert not torch.equal(s_alone[0], s_alone[1])  # the stream advances
    assert not torch.equal(_draws(BranchStreams(0, {"U": 0}, CPU), "U"), s_alone[0])


def test_replicas_and_seeds_get_different_streams() -> None:
    seeds = {stream_seed(s, b, r) for s in (0, 1) for b in ("S", "U") for r in (0, 1)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    first = _draws(BranchStreams(0, {"U": 0}, CPU), "U")
    assert not torch.equal(first, _draws(BranchStreams(0, {"U": 1}, CPU), "U"))
    assert torch.equal(first, _draws(BranchStreams(0, {"U": 0}, CPU), "U"))


def test_state_dict_resumes_the_stream() -> None:
    streams = BranchStreams(0, {"S": 0, "U": 0}, CPU)
    _draws(streams, "S")
    saved = streams.state_dict()
    expected = {n: _draws(streams, n) for n in ("S", "U")}
    restored = BranchStreams(0, {"S": 0, "U": 0}, CPU)
    restored.load_state_dict(saved)
    for name, values in expected.items():
        assert torch.equal(_draws(restored, name), values), name
    with pytest.raises(KeyError, match=r"\['U'\]"):
        BranchStreams(0, {"S": 0, "U": 0}, CPU).load_state_dict({"S": saved["S"]})
