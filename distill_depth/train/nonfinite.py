"""Non-finite steps: skipped per branch, agreed by the branch's ranks, fatal after too many in a row.

At each step boundary every rank of a branch says whether its loss (or one of its terms) or its
gradient was non-finite in any micro-step; one all-reduce inside the branch's group makes the
verdict common, so the branch's replicas stay identical. A bad step skips the branch's optimiser
update (the fp16 grad scaler backs off its scale instead) and puts back the buffers (BatchNorm
statistics) its forward passes moved; the step counter and the learning-rate schedule go on.
``{branch}/skipped_steps`` in the scalar log counts the skipped steps since the previous log row.
A step whose gradient is exactly zero on every rank (nothing to learn from) is skipped too, but is
not bad: ``{branch}/no_gradient_share`` logs its share (see ``train/step.py``).

After ``train.max_bad_steps`` bad steps in a row the run writes a checkpoint — its weights,
buffers and optimiser state are the last good ones, since bad steps changed none of them; its data
position is past the bad batches — and stops (exit 1) with one line naming the branch and the
loss term that went non-finite first (``gradient`` when every term was finite but a gradient was
not).

Branches under a DeepSpeed engine (``train.deepspeed``) are not guarded here: the engine steps
inside the micro-step loop and handles fp16 overflow itself.

Fault injection, for tests and drills only (never set it in a real run):
``DISTILL_DEPTH_FAULT_NONFINITE=BRANCH/TERM@FIRST[-[LAST]][:rRANK]`` makes loss term TERM of branch
BRANCH NaN, and with it the branch's loss and gradients, at steps FIRST..LAST (1-based, as logged;
``FIRST`` alone: that step only; ``FIRST-``: every step from FIRST on), on global rank RANK only
when given. TERM ``loss``: the total loss (and gradients) only, every term's value left as is.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distill_depth.config import ConfigError

FAULT_ENV = "DISTILL_DEPTH_FAULT_NONFINITE"
_FAULT_SYNTAX = re.compile(r"(S|U)/(\w+)@(\d+)(-(\d*))?(:r(\d+))?")


@dataclass(frozen=True)
class InjectedFault:
    """A NaN injected into one loss term (see the module docstring)."""

    branch: str
    term: str
    first: int
    last: int | None
    rank: int | None

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> InjectedFault | None:
        text = (os.environ if environ is None else environ).get(FAULT_ENV, "").strip()
        if not text:
            return None
        match = _FAULT_SYNTAX.fullmatch(text)
        if match is None:
            raise ConfigError(f"{FAULT_ENV}={text!r}: expected BRANCH/TERM@FIRST[-[LAST]][:rRANK], e.g. S/sup_nll@3-5")
        branch, term, first, dash, last, _, rank = match.groups()
        end = int(first) if dash is None else (int(last) if last else None)
        return cls(branch, term, int(first), end, None if rank is None else int(rank))

    def applies(self, branch: str, step: int, rank: int) -> bool:
        return (branch == self.branch and step >= self.first and (self.last is None or step <= self.last)
                and (self.rank is None or rank == self.rank))

    def apply(self, branch: str, step: int, rank: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``loss`` and ``terms`` with the fault in, when it applies to this branch, step and rank."""
        if not self.applies(branch, step, rank):
            return loss, terms
        if self.term != "loss" and self.term not in terms:
            raise ConfigError(f"{FAULT_ENV}: branch {branch} has no loss term {self.term!r} "
                              f"(its terms: loss, {', '.join(terms)})")
        terms = dict(terms)
        if self.term in terms:
            terms[self.term] = torch.full_like(terms[self.term], math.nan)
        return loss * math.nan, terms


def first_nonfinite(values: dict[str, float]) -> str | None:
    """The first of ``values`` (``loss`` and the loss terms by name, in the order the branch
    computes them) that is not finite, a term before the total ``loss``; None when all are finite."""
    order = [name for name in values if name != "loss"] + ["loss"] * ("loss" in values)
    return next((name for name in order if not math.isfinite(values[name])), None)


def grad_norm(model: nn.Module) -> torch.Tensor:
    """The 2-norm over every gradient of ``model``, as ``clip_grad_norm_`` computes it (0 when none
    has one; inf or nan when one is not finite)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


def snapshot_buffers(model: nn.Module) -> list[torch.Tensor]:
    """Copies of ``model``'s buffers (BatchNorm statistics: a few thousand numbers), taken before a
    step's forward passes so that a skipped step leaves them as the last good step did."""
    return [buffer.detach().clone() for buffer in model.buffers()]


def restore_buffers(model: nn.Module, saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for buffer, value in zip(model.buffers(), saved):
            buffer.copy_(value)


class BadSteps:
    """Per local branch: what went non-finite in the step under way, and the bad steps in a row."""

    def __init__(self, branches: list[str], limit: int) -> None:
        self.limit = limit
        self.pending: dict[str, str | None] = {n: None for n in branches}
        """The step under way: the first non-finite term this rank saw (None: none)."""
        self.in_a_row = {n: 0 for n in branches}
        self.window = {n: 0 for n in branches}
        """Skipped steps since the last scalar log."""
        self.streak: dict[str, tuple[int, str | None]] = {}
        """Branch → (first step, first non-finite term seen here) of its current run of bad steps."""

    def see(self, branch: str, values: dict[str, float]) -> None:
        """A micro-step's loss and loss terms: remember the first non-finite one (branches not
        guarded here, e.g. under a DeepSpeed engine, are ignored)."""
        if branch in self.pending and self.pending[branch] is None:
            self.pending[branch] = first_nonfinite(values)

    def local_verdict(self, branch: str, norm: float) -> bool:
        """This rank's verdict on the step under way, given its gradient's :func:`grad_norm`: a
        term or a gradient went non-finite."""
        if self.pending[branch] is None and not math.isfinite(norm):
            self.pending[branch] = "gradient"
        return self.pending[branch] is not None

    def settle(self, branch: str, bad: bool, step: int) -> None:
        """Record the agreed verdict on ``step`` (1-based) and clear the step's local state."""
        term, self.pending[branch] = self.pending[branch], None
        if not bad:
            self.in_a_row[branch] = 0
            self.streak.pop(branch, None)
            return
        if self.in_a_row[branch] == 0:
            self.streak[branch] = (step, term)
        self.in_a_row[branch] += 1
        self.window[branch] += 1

    def exhausted(self) -> bool:
        return any(count >= self.limit for count in self.in_a_row.values())

    def failures(self, rank: int) -> list[dict[str, Any]]:
        """The branches of this rank that reached the limit (for :func:`failure_message`)."""
        return [{"branch": n, "count": c, "since": self.streak[n][0], "term": self.streak[n][1], "rank": rank}
                for n, c in self.in_a_row.items() if c >= self.limit]


def term_label(branch: str, term: str | None) -> str:
    """``S/sup_nll`` for a loss term, ``gradient`` as is, ``unknown`` for None."""
    return "unknown" if term is None else term if term == "gradient" else f"{branch}/{term}"


def failure_message(failures: list[dict[str, Any]], limit: int, checkpoint: Any) -> str:
    """One line for every rank's :meth:`BadSteps.failures`: per branch, the loss term that some rank
    saw first (the lowest such rank), else ``gradient``."""
    parts = []
    for branch in sorted({f["branch"] for f in failures}):
        # A loss term some rank saw beats a gradient that DDP's averaging made non-finite everywhere.
        first = min((f for f in failures if f["branch"] == branch),
                    key=lambda f: (f["term"] in (None, "gradient"), f["term"] is None, f["rank"]))
        parts.append(f"branch {branch}: {first['count']} non-finite steps in a row since step {first['since']} "
                     f"(train.max_bad_steps={limit}); first non-finite: {term_label(branch, first['term'])} "
                     f"(rank {first['rank']})")
    return "; ".join(parts) + f"; the last good state is in checkpoint {checkpoint}"
