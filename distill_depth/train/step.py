"""The pieces of one optimiser step: the resumable batch source, autocast, the branch's update at
the step boundary (with the agreed non-finite skip), and the exchange dump the tests read."""

from __future__ import annotations

import contextlib
import enum
import logging
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch

from distill_depth.train.checkpoint import BranchState, DataPosition
from distill_depth.train.distributed import any_rank_each
from distill_depth.train.nonfinite import BadSteps, grad_norm, restore_buffers, term_label
from distill_depth.train.rng import isolated_rng
from distill_depth.types import Batch

log = logging.getLogger("distill_depth.train")


class BatchSource:
    """The cell's stream as an endless sequence of batches with a resumable position."""

    def __init__(self, stream: Any, position: DataPosition, overfit_batches: int = 0) -> None:
        self.stream = stream
        self.position = position
        self.overfit_batches = overfit_batches
        self._cache: list[Batch] = []
        self._iterator: Iterator[Batch] | None = None

    def next(self) -> Batch:
        if self.overfit_batches and len(self._cache) == self.overfit_batches:
            batch = self._cache[self.position.batch_in_epoch % self.overfit_batches]
            self.position.batch_in_epoch += 1
            return batch
        with isolated_rng():
            batch = self._read()
        if self.overfit_batches:
            self._cache.append(batch)
        return batch

    def _read(self) -> Batch:
        pos = self.position
        if self._iterator is None:
            self._iterator = iter(self.stream.epoch(pos.epoch, pos.batch_in_epoch))
        try:
            batch = next(self._iterator)
        except StopIteration:  # a short epoch: the next one starts
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            self._iterator = iter(self.stream.epoch(pos.epoch, 0))
            batch = next(self._iterator)
        pos.batch_in_epoch += 1
        if pos.batch_in_epoch >= self.stream.batches_per_epoch:
            pos.epoch, pos.batch_in_epoch = pos.epoch + 1, 0
            self.close()
        return batch

    def close(self) -> None:
        closer = getattr(self._iterator, "close", None)
        if closer is not None:
            closer()
        self._iterator = None


def autocast_factory(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def autocast() -> contextlib.AbstractContextManager:
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=dtype)

    return autocast


def backward(state: BranchState, loss: torch.Tensor, grad_accum: int) -> None:
    """One micro-step's backward pass of a branch (DeepSpeed: also its step at the boundary)."""
    if state.engine is not None:  # DeepSpeed divides by grad_accum and steps at the boundary
        state.engine.backward(loss.float())
        state.engine.step()
    else:
        scaled = loss.float() / grad_accum
        (state.scaler.scale(scaled) if state.scaler else scaled).backward()


class StepOutcome(enum.Enum):
    """What a branch's update at the step boundary did."""

    STEPPED = "stepped"
    NON_FINITE = "non_finite"
    """Skipped: a loss term or gradient went non-finite on some rank of the branch."""
    NO_GRADIENT = "no_gradient"
    """Skipped: the gradient is exactly zero on every rank (e.g. S-only on a batch without a
    labelled sample). AdamW would still move the weights by its momentum and weight decay, a step
    with nothing learnt from; at label fraction 0.05 and batch 4 that is 81 % of S-only's steps."""


def optimizer_step(state: BranchState, grad_clip: float | None, bad_steps: BadSteps, group: Any,
                   device: torch.device, step: int, buffers: list[torch.Tensor] | None) -> StepOutcome:
    """The branch's update at the step boundary. Every rank of the branch's ``group`` agrees on
    the outcome: a non-finite step is skipped and ``buffers`` (taken before the step's forward
    passes) are put back; a step without gradient is skipped (its buffers, moved by real images,
    are kept). The learning-rate schedule follows the step count either way."""
    if state.engine is not None:
        return StepOutcome.STEPPED  # stepped by the engine inside the micro-step loop
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    total_norm = grad_norm(state.model)
    norm = float(total_norm)
    bad, learnt = any_rank_each([bad_steps.local_verdict(state.name, norm), norm != 0.0], device, group)
    bad_steps.settle(state.name, bad, step)
    if bad:
        outcome = StepOutcome.NON_FINITE
        _skip(state, bad_steps, buffers, step)
    elif not learnt:
        outcome = StepOutcome.NO_GRADIENT
        if state.scaler is not None:  # unscale_ was called: reset the scaler's per-step state, scale kept
            state.scaler.update(state.scaler.get_scale())
    else:
        outcome = StepOutcome.STEPPED
        if grad_clip:  # clip_grad_norm_ without computing the norm a second time
            torch.nn.utils.clip_grads_with_norm_(state.model.parameters(), grad_clip, total_norm)
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    with warnings.catch_warnings():  # a skipped first step: the schedule follows the step count on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before", category=UserWarning)
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return outcome


def _skip(state: BranchState, bad_steps: BadSteps, buffers: list[torch.Tensor] | None, step: int) -> None:
    restore_buffers(state.model, buffers or [])
    if state.scaler is not None:  # the same back-off on every rank, whatever each one's own overflow check said
        state.scaler.update(state.scaler.get_scale() * state.scaler.get_backoff_factor())
    if bad_steps.streak[state.name][1] is not None:
        log.warning("step %d: %s is not finite; branch %s's optimiser step skipped (%d in a row)", step,
                    term_label(state.name, bad_steps.streak[state.name][1]), state.name,
                    bad_steps.in_a_row[state.name])


def dump_exchange(folder: str, rank: int, step: int, micro: int, predictions: dict[str, Any],
                  partners: dict[str, Any]) -> None:
    """``DISTILL_DEPTH_DUMP_DIR``: what this rank sent and received in one micro-step."""
    payload = {
        "sent": {n: _plain(p.for_partner()) for n, p in predictions.items()},
        "received": {n: (_plain(p) if p is not None else None) for n, p in partners.items()},
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(payload, Path(folder) / f"exchange_rank{rank}_step{step}_{micro}.pt")


def _plain(pred: Any) -> dict[str, Any]:
    return {"depth": pred.depth.cpu(), "confidence": pred.confidence.cpu(), "valid": pred.valid.cpu(), "keys": list(pred.keys)}
