"""The training loop: both branches, one step at a time, on any placement.

One optimiser step = ``train.grad_accum`` micro-steps of: read the cell's batch → take this
rank's slice → forward each local branch (autocast) → exchange detached predictions with the
partner(s) → each branch's fp32 loss with the partner's prediction → backward (DDP averages
gradients inside the branch's group only). Then: optimiser + scheduler step, a world-wide
all-reduce of the stop flag, logging, validation, checkpoint — each at a step boundary that all
ranks share.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from distill_depth.checkpoint_io import init_branch_weights
from distill_depth.config import Config, ConfigError, save_config
from distill_depth.topology import Topology, plan_layout
from distill_depth.train.checkpoint import (
    BranchState, DataPosition, export_branches, load_checkpoint, save_checkpoint, write_export_meta,
)
from distill_depth.train.distributed import (
    agree_to_stop, any_rank, barrier, broadcast_object, gather_objects, make_accelerator, wrap_ddp,
)
from distill_depth.train.door import RunStopped, check_run
from distill_depth.train.nonfinite import (
    BadSteps, InjectedFault, failure_message, restore_buffers, snapshot_buffers, term_label,
)
from distill_depth.train.optim import build_optimizer, build_scheduler
from distill_depth.train.rng import BranchStreams, isolated_rng, seed_everything
from distill_depth.train.signals import StopRequest, Watchdog, requeue_if_slurm, shield_data_workers
from distill_depth.train.tracking import build_tracker, colorize
from distill_depth.train.validate import validate
from distill_depth.types import Batch

log = logging.getLogger("distill_depth.train")

BRANCH_SEED_OFFSET = {"S": 0, "U": 1}
"""Each branch is initialised from its own seed, so its initial weights do not depend on placement."""

DUMP_ENV = "DISTILL_DEPTH_DUMP_DIR"
"""Debug aid (used by the tests): each rank writes what it sent/received and its final weights."""


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


def train(cfg: Config, stop_request: StopRequest | None = None) -> int:
    """Train per ``cfg`` on the processes the launcher started; returns the exit code.

    ``stop_request``: an installed handler (the CLI installs one before the slow imports, so a
    signal during start-up is never fatal); when None, one is installed here, first of all. A
    stop signal is honoured at every step boundary, including the one before the first step
    (then nothing new is checkpointed, see ``_stop_before_first_step``).
    """
    owned = stop_request is None
    if stop_request is None:
        stop_request = StopRequest().install()
    shield_data_workers()  # before any DataLoader worker is forked
    try:
        return _train(cfg, stop_request)
    finally:
        if owned:
            stop_request.uninstall()


def _train(cfg: Config, stop_request: StopRequest) -> int:
    accelerator = make_accelerator(cfg.train.timeout_s)
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    if device.type == "cpu":
        device = torch.device("cpu")  # accelerate's CPU ranks say "cpu:N", which torch.load/safetensors refuse
    layout = plan_layout(world, cfg.topology.mode, cfg.topology.sup_ranks, cfg.branches)
    topology = Topology(layout, rank, device)
    out = Path(cfg.train.output_dir)
    is_main = rank == 0
    resume_from = _checked_at_the_door(cfg, is_main)
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        log.info("placement: %s, world %d, %d cell(s) of 1 S + %d U rank(s); groups %s", layout.mode, world,
                 layout.n_cells, layout.ratio, dict(layout.group_ranks))
    if cfg.train.deepspeed != "none":
        from distill_depth.train.deepspeed import require_deepspeed_device  # noqa: PLC0415

        require_deepspeed_device(device)

    from distill_depth.branches import build_branch  # noqa: PLC0415
    from distill_depth.data.stream import TrainStream  # noqa: PLC0415

    branches: dict[str, BranchState] = {}
    for name in topology.roles:
        seed_everything(cfg.train.seed + BRANCH_SEED_OFFSET[name])
        model = build_branch(name, cfg).to(device)
        optimizer = build_optimizer(model, cfg.optim)
        scheduler = build_scheduler(optimizer, cfg.train.max_steps, cfg.optim)
        scaler = torch.amp.GradScaler(device.type) if cfg.train.mixed_precision == "fp16" else None
        branches[name] = BranchState(name, model, optimizer, scheduler, scaler)
    seed_everything(cfg.train.seed * 1000 + 7919 * (rank + 1))
    streams = BranchStreams(cfg.train.seed, {n: layout.group_ranks[n].index(rank) for n in branches}, device)

    lo, hi = layout.data_slice(rank, cfg.data.batch_size)
    if cfg.train.deepspeed != "none":
        _attach_deepspeed(branches, topology, cfg, micro_batch=hi - lo)
    step, position = 0, DataPosition()
    if resume_from is not None:
        step, position = load_checkpoint(resume_from, list(branches.values()), rank, device, streams)
        if is_main:
            log.warning("resuming from checkpoint step %d (%s)", step, resume_from)
    else:
        _init_weights(branches, cfg, device, is_main)
    wrapped = {
        n: b.engine if b.engine is not None else wrap_ddp(b.model, topology.groups.get(n), topology.group_size(n), device)
        for n, b in branches.items()
    }
    for model in wrapped.values():
        model.train()

    stream = TrainStream(
        cfg.data.train_shards, layout.cell_batch_size(cfg.data.batch_size), topology.data_rank, topology.data_world,
        num_workers=cfg.data.num_workers, seed=cfg.train.seed, samples_per_epoch=cfg.data.samples_per_epoch,
        use_stereo=cfg.data.uses_stereo, shuffle_buffer=cfg.data.shuffle_buffer,
        labelled_fraction=cfg.data.labelled_fraction, label_seed=cfg.data.label_seed,
    )
    source = BatchSource(stream, position, cfg.train.overfit_batches)
    tracker = build_tracker(cfg.train.report_to, out, cfg.to_dict(), cfg.train.wandb_project, cfg.train.run_name, is_main)
    watchdog = Watchdog(2 * cfg.train.timeout_s).start()
    autocast = autocast_factory(cfg.train.mixed_precision, device)
    dump_dir = os.environ.get(DUMP_ENV)
    samples_per_step = layout.n_cells * layout.cell_batch_size(cfg.data.batch_size) * cfg.train.grad_accum
    progress = _progress_bar(is_main, step, cfg.train.max_steps)
    totals: dict[str, list[float]] = defaultdict(list)
    step_values: dict[str, list[float]] = defaultdict(list)  # loss terms of the step under way
    bad_steps = BadSteps([n for n, b in branches.items() if b.engine is None], cfg.train.max_bad_steps)
    fault = InjectedFault.from_env()
    last_pred: dict[str, Any] = {}
    log_start = time.perf_counter()
    exit_code = 0
    try:
        if step < cfg.train.max_steps and agree_to_stop(stop_request.requested, device):
            _stop_before_first_step(step, is_main)
            return exit_code
        while step < cfg.train.max_steps:
            step_start = time.perf_counter()
            buffers = {n: snapshot_buffers(b.model) for n, b in branches.items() if b.engine is None}
            for micro in range(cfg.train.grad_accum):
                t0 = time.perf_counter()
                batch = source.next().slice(lo, hi).to(device)
                totals["time/data_s"].append(time.perf_counter() - t0)
                sync = micro == cfg.train.grad_accum - 1
                with contextlib.ExitStack() as stack:
                    if not sync:
                        for model in wrapped.values():
                            if isinstance(model, DistributedDataParallel):  # DeepSpeed handles its own accumulation
                                stack.enter_context(model.no_sync())
                    predictions = {}
                    for name, model in wrapped.items():
                        t0 = time.perf_counter()
                        with autocast(), streams.use(name):
                            predictions[name] = model(batch)
                        totals[f"{name}/compute_s"].append(time.perf_counter() - t0)
                    partners = topology.exchange({n: p.for_partner() for n, p in predictions.items()})
                    totals["time/exchange_s"].append(topology.timing.exchange_s)
                    totals["time/wait_s"].append(topology.timing.wait_s)
                    if dump_dir:
                        _dump_exchange(dump_dir, rank, step, micro, predictions, partners)
                    for name, state in branches.items():
                        t0 = time.perf_counter()
                        with streams.use(name):
                            loss, terms = state.model.loss(batch, predictions[name], partners[name], step)
                        if fault is not None:
                            loss, terms = fault.apply(name, step + 1, rank, loss, terms)
                        if state.engine is not None:  # DeepSpeed divides by grad_accum and steps at the boundary
                            state.engine.backward(loss.float())
                            state.engine.step()
                        else:
                            scaled = loss.float() / cfg.train.grad_accum
                            (state.scaler.scale(scaled) if state.scaler else scaled).backward()
                        totals[f"{name}/compute_s"][-1] += time.perf_counter() - t0
                        values = {"loss": float(loss.detach()), **{t: float(v) for t, v in terms.items()}}
                        bad_steps.see(name, values)
                        for term, value in values.items():
                            step_values[f"{name}/{term}"].append(value)
                last_pred = predictions
            for name, state in branches.items():
                t0 = time.perf_counter()
                totals[f"{name}/lr"].append(state.scheduler.get_last_lr()[0])
                if not _optimizer_step(state, cfg.optim.grad_clip, bad_steps, topology.groups.get(name), device, step + 1,
                                       buffers.get(name)):
                    for key in [k for k in step_values if k.startswith(f"{name}/")]:
                        totals[key].extend(step_values.pop(key))
                totals[f"{name}/compute_s"][-1] += time.perf_counter() - t0
            step_values.clear()  # a skipped step's (non-finite) values stay out of the means
            step += 1
            watchdog.beat()
            t0 = time.perf_counter()
            stop = agree_to_stop(stop_request.requested or bad_steps.exhausted(), device)
            # every rank agreed to stop, so every rank gathers: did a branch run out of good steps?
            failures = [f for part in gather_objects(bad_steps.failures(rank)) for f in part] if stop else []
            # Idle time of the faster group: it waits here for the slower one to finish its step.
            totals["time/sync_s"].append(time.perf_counter() - t0)
            totals["time/step_s"].append(time.perf_counter() - step_start)
            if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or stop:
                elapsed = time.perf_counter() - log_start
                n_steps = len(totals["time/step_s"])
                for name in bad_steps.window:
                    totals[f"{name}/skipped_steps"] = [float(bad_steps.window[name])]
                    bad_steps.window[name] = 0
                scalars = _reduce_scalars(totals, is_main)
                if is_main:
                    scalars["samples_per_s"] = samples_per_step * n_steps / max(elapsed, 1e-9)
                    scalars["epoch"] = source.position.epoch
                    tracker.log_scalars(scalars, step)
                    _append_jsonl(out / "metrics.jsonl", step, scalars)
                    progress.set_postfix(samples_s=f"{scalars['samples_per_s']:.1f}",
                                         **{f"{n}_loss": f"{scalars.get(f'{n}/loss', float('nan')):.3f}" for n in cfg.branches})
                totals.clear()
                log_start = time.perf_counter()
            if cfg.train.image_every and step % cfg.train.image_every == 0:
                _log_images(last_pred, topology, tracker, step)
            if cfg.train.val_every and cfg.data.val_shards and step % cfg.train.val_every == 0:
                metrics = validate({n: b.model for n, b in branches.items()}, topology, cfg, device, autocast, watchdog.beat)
                if is_main:
                    tracker.log_scalars(metrics, step)
                    _append_jsonl(out / "metrics.jsonl", step, metrics)
                    log.info("step %d validation: %s", step, {k: round(v, 4) for k, v in metrics.items()})
            progress.update(1)
            final = step == cfg.train.max_steps
            if stop or final or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0):
                path = save_checkpoint(
                    out, step, source.position, list(branches.values()),
                    {n for n in branches if topology.is_group_leader(n)}, rank, world, cfg,
                    {"mode": layout.mode, "ratio": layout.ratio, "branches": list(layout.branches)},
                    cfg.train.keep_last, streams,
                )
                watchdog.beat()
                if is_main:
                    log.info("checkpoint step %d written to %s", step, path)
            if failures:
                raise RunStopped(failure_message(failures, cfg.train.max_bad_steps, path), 1, report=is_main)
            if stop and not final:
                if is_main:
                    log.warning("stopped by signal at step %d; checkpoint complete", step)
                    requeue_if_slurm()
                return exit_code
        leaders = {n: b.model for n, b in branches.items() if topology.is_group_leader(n)}
        if leaders:
            export_branches(out, leaders)
        barrier()
        if is_main:
            write_export_meta(out, cfg, step)
            log.info("training done at step %d; export in %s", step, out / "export")
        if dump_dir:
            torch.save({n: {k: v.detach().cpu() for k, v in b.model.state_dict().items()} for n, b in branches.items()},
                       Path(dump_dir) / f"weights_rank{rank}.pt")
        return exit_code
    finally:
        progress.close()
        source.close()
        watchdog.stop()
        tracker.finish()


def _init_weights(branches: dict[str, BranchState], cfg: Config, device: torch.device, is_main: bool) -> None:
    """``train.init_s`` / ``train.init_u``: a fresh run starts from another run's weights."""
    for name, state in branches.items():
        source = {"S": cfg.train.init_s, "U": cfg.train.init_u}[name]
        if source:
            path = init_branch_weights(state.model, name, source, device)
            if is_main:
                log.info("branch %s starts from %s", name, path)


def _checked_at_the_door(cfg: Config, is_main: bool) -> Path | None:
    """Rank 0 checks what the run needs (``door.check_run``) before any model is built; every
    rank gets the verdict, so all stop together (:class:`RunStopped`, exit 2) with one message.
    Returns the verified checkpoint to resume from."""
    verdict: tuple[str | None, str | None] = (None, None)
    if is_main:
        try:
            found = check_run(cfg)
            verdict = (None, None if found is None else str(found))
        except ConfigError as exc:
            verdict = (str(exc), None)
    error, resume = broadcast_object(verdict)
    if error is not None:
        raise RunStopped(error, 2, report=is_main)
    return None if resume is None else Path(resume)


def _stop_before_first_step(step: int, is_main: bool) -> None:
    """A stop signal arrived during start-up (all ranks agreed before doing any step).

    No step was done in this process, so there is nothing new to save: the run folder's newest
    complete checkpoint (if any) is exactly where a restart continues. Exit 0 (and requeue under
    SLURM) without spending the grace period on a step and a checkpoint.
    """
    if is_main:
        log.warning("stopped by signal before the first step (at step %d); nothing new to checkpoint", step)
        requeue_if_slurm()


def _attach_deepspeed(branches: dict[str, BranchState], topology: Topology, cfg: Config, micro_batch: int) -> None:
    """Give each local branch a DeepSpeed engine over its own group (GPU only)."""
    from distill_depth.train.deepspeed import GroupMPU, build_engine, deepspeed_config, single_rank_groups  # noqa: PLC0415

    self_groups = single_rank_groups(topology.layout.world)
    for name, state in branches.items():
        config = deepspeed_config(cfg, micro_batch, topology.group_size(name))
        mpu = GroupMPU(topology.groups.get(name), topology.layout.group_ranks[name], self_groups[topology.rank],
                       topology.rank)
        state.engine, state.optimizer, state.scheduler = build_engine(
            state.model, state.optimizer, state.scheduler, config, mpu
        )
        state.scaler = None  # the engine scales fp16 losses itself


def _optimizer_step(state: BranchState, grad_clip: float | None, bad_steps: BadSteps, group: Any,
                    device: torch.device, step: int, buffers: list[torch.Tensor] | None) -> bool:
    """The branch's update at the step boundary; True when the step was bad (non-finite on some
    rank of the branch's ``group``, agreed by all of them): update skipped, ``buffers`` (taken
    before the step's forward passes) put back."""
    if state.engine is not None:
        return False  # stepped by the engine inside the micro-step loop
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    bad = any_rank(bad_steps.local_verdict(state.name, state.model), device, group)
    bad_steps.settle(state.name, bad, step)
    if bad:
        restore_buffers(state.model, buffers or [])
        if state.scaler is not None:  # the same back-off on every rank, whatever each one's own overflow check said
            state.scaler.update(state.scaler.get_scale() * state.scaler.get_backoff_factor())
        if bad_steps.streak[state.name][1] is not None:
            log.warning("step %d: %s is not finite; branch %s's optimiser step skipped (%d in a row)", step,
                        term_label(state.name, bad_steps.streak[state.name][1]), state.name,
                        bad_steps.in_a_row[state.name])
    else:
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(state.model.parameters(), grad_clip)
        if state.scaler is not None:
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
    with warnings.catch_warnings():  # a skipped first step: the schedule follows the step count on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before", category=UserWarning)
        state.scheduler.step()
    state.optimizer.zero_grad(set_to_none=True)
    return bad


def _reduce_scalars(totals: dict[str, list[float]], is_main: bool) -> dict[str, float]:
    """Means over this rank's steps, then over the ranks reporting each key (collective)."""
    local = {k: float(np.mean(v)) for k, v in totals.items() if v}
    merged: dict[str, list[float]] = defaultdict(list)
    for rank_values in gather_objects(local):
        for key, value in rank_values.items():
            merged[key].append(value)
    if not is_main:
        return {}
    # Timings are a rank's wall clock: the slowest rank is what the step costs.
    return {k: (max(v) if k.endswith("_s") else float(np.mean(v))) for k, v in merged.items()}


def _log_images(predictions: dict[str, Any], topology: Topology, tracker: Any, step: int) -> None:
    images = {}
    for name, pred in predictions.items():
        if topology.is_group_leader(name):
            depth, confidence = colorize(pred.canonical_depth.detach(), pred.canonical_confidence.detach())
            images[f"images/{name}/depth"], images[f"images/{name}/confidence"] = depth, confidence
    merged: dict[str, Any] = {}
    for rank_images in gather_objects(images):
        merged.update(rank_images)
    if merged:
        tracker.log_images(merged, step)


def _append_jsonl(path: Path, step: int, values: dict[str, float]) -> None:
    import json  # noqa: PLC0415

    with path.open("a") as handle:
        handle.write(json.dumps({"step": step, **values}) + "\n")


def _dump_exchange(folder: str, rank: int, step: int, micro: int, predictions: dict[str, Any], partners: dict[str, Any]) -> None:
    payload = {
        "sent": {n: _plain(p.for_partner()) for n, p in predictions.items()},
        "received": {n: (_plain(p) if p is not None else None) for n, p in partners.items()},
    }
    Path(folder).mkdir(parents=True, exist_ok=True)
    torch.save(payload, Path(folder) / f"exchange_rank{rank}_step{step}_{micro}.pt")


def _plain(pred: Any) -> dict[str, Any]:
    return {"depth": pred.depth.cpu(), "confidence": pred.confidence.cpu(), "valid": pred.valid.cpu(), "keys": list(pred.keys)}


def _progress_bar(enabled: bool, initial: int, total: int) -> Any:
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
