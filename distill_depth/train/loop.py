"""The training loop: both branches, one step at a time, on any placement.

One optimiser step = ``train.grad_accum`` micro-steps of: read the cell's batch → take this
rank's slice → forward each local branch (autocast) → exchange detached predictions with the
partner(s) → each branch's fp32 loss with the partner's prediction → backward (DDP averages
gradients inside the branch's group only). Then: optimiser + scheduler step, a world-wide
all-reduce of the stop flag, logging, validation, checkpoint — each at a step boundary that all
ranks share.

:class:`Trainer` has the phases as methods (torchtitan's shape): construction builds placement,
branches, optimisers, streams and tracker; :meth:`Trainer.train_step` is one optimiser step;
``maybe_log`` / ``maybe_validate`` / ``maybe_checkpoint`` run at the step boundary;
:meth:`Trainer.close` tears down. :func:`train` is the entry point.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from distill_depth.config import Config, save_config
from distill_depth.topology import Topology, plan_layout
from distill_depth.train.checkpoint import DataPosition, export_run, load_checkpoint, save_checkpoint
from distill_depth.train.cpu_memory import keep_freed_memory
from distill_depth.train.distributed import agree_to_stop, gather_objects, make_accelerator, wrap_ddp
from distill_depth.train.door import RunStopped
from distill_depth.train.nonfinite import BadSteps, InjectedFault, failure_message, snapshot_buffers
from distill_depth.train.panels import fixed_panel_batch, log_panels
from distill_depth.train.rng import BranchStreams, seed_everything
from distill_depth.train.setup import (
    BRANCH_SEED_OFFSET, append_jsonl, attach_deepspeed, build_branch_states, checked_at_the_door, init_weights,
    log_images, progress_bar, reduce_scalars, stop_before_first_step,
)
from distill_depth.train.signals import StopRequest, Watchdog, requeue_if_slurm, shield_data_workers
from distill_depth.train.step import BatchSource, StepOutcome, autocast_factory, backward, dump_exchange
from distill_depth.train.step import optimizer_step as _optimizer_step
from distill_depth.train.tracking import build_tracker
from distill_depth.train.validate import validate
from distill_depth.types import Batch

__all__ = ["BRANCH_SEED_OFFSET", "DUMP_ENV", "BatchSource", "Trainer", "autocast_factory", "train", "_optimizer_step"]

log = logging.getLogger("distill_depth.train")

DUMP_ENV = "DISTILL_DEPTH_DUMP_DIR"
"""Debug aid (used by the tests): each rank writes what it sent/received and its final weights."""


def train(cfg: Config, stop_request: StopRequest | None = None) -> int:
    """Train per ``cfg`` on the processes the launcher started; returns the exit code.

    ``stop_request``: an installed handler (the CLI installs one before the slow imports, so a
    signal during start-up is never fatal); when None, one is installed here, first of all. A
    stop signal is honoured at every step boundary, including the one before the first step
    (then nothing new is checkpointed, see ``setup.stop_before_first_step``).
    """
    owned = stop_request is None
    if stop_request is None:
        stop_request = StopRequest().install()
    shield_data_workers()  # before any DataLoader worker is forked
    try:
        trainer = Trainer(cfg, stop_request)
        try:
            return trainer.run()
        finally:
            trainer.close()
    finally:
        if owned:
            stop_request.uninstall()


class Trainer:
    """One rank's share of a run: its branches, their optimisers, the cell's stream, the tracker."""

    def __init__(self, cfg: Config, stop_request: StopRequest) -> None:
        self.cfg = cfg
        self.stop_request = stop_request
        self._build_placement()
        resume_from = checked_at_the_door(
            cfg, self.is_main, self.layout.cell_batch_size(cfg.data.batch_size) * self.layout.n_cells)
        self._write_run_folder()
        self._build_branches(resume_from)
        self._build_stream()
        self.tracker = build_tracker(cfg.train.report_to, self.out, cfg.to_dict(), cfg.train.wandb_project,
                                     cfg.train.run_name, self.is_main)
        self.watchdog = Watchdog(2 * cfg.train.timeout_s).start()
        self.autocast = autocast_factory(cfg.train.mixed_precision, self.device)
        self.dump_dir = os.environ.get(DUMP_ENV)
        self.samples_per_step = self.layout.n_cells * self.layout.cell_batch_size(cfg.data.batch_size) * cfg.train.grad_accum
        self.progress = progress_bar(self.is_main, self.step, cfg.train.max_steps)
        self.totals: dict[str, list[float]] = defaultdict(list)  # per key, the values since the last log
        self.bad_steps = BadSteps([n for n, b in self.branches.items() if b.engine is None], cfg.train.max_bad_steps)
        self.fault = InjectedFault.from_env()
        self.last_predictions: dict[str, Any] = {}
        self.log_start = time.perf_counter()
        self.checkpoint_path: Path | None = None
        self.panel_batch = fixed_panel_batch(cfg.data.val_shards, self.device) if cfg.train.image_every else None

    # -- construction ---------------------------------------------------------------------------

    def _build_placement(self) -> None:
        cfg = self.cfg
        self.accelerator = make_accelerator(cfg.train.timeout_s)
        self.rank, self.world = self.accelerator.process_index, self.accelerator.num_processes
        device = self.accelerator.device
        # accelerate's CPU ranks say "cpu:N", which torch.load/safetensors refuse
        self.device = torch.device("cpu") if device.type == "cpu" else device
        if self.device.type == "cpu" and cfg.train.keep_cpu_memory:
            keep_freed_memory()
        self.layout = plan_layout(self.world, cfg.topology.mode, cfg.topology.sup_ranks, cfg.branches)
        self.topology = Topology(self.layout, self.rank, self.device)
        self.out = Path(cfg.train.output_dir)
        self.is_main = self.rank == 0

    def _write_run_folder(self) -> None:
        cfg, layout = self.cfg, self.layout
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out / "config.yaml")
            log.info("placement: %s, world %d, %d cell(s) of 1 S + %d U rank(s); groups %s", layout.mode, self.world,
                     layout.n_cells, layout.ratio, dict(layout.group_ranks))
        if cfg.train.deepspeed != "none":
            from distill_depth.train.deepspeed import prepare_deepspeed  # noqa: PLC0415

            prepare_deepspeed(cfg, self.device)

    def _build_branches(self, resume_from: Path | None) -> None:
        """Branches (each from its own seed), this rank's RNG streams, resumed or initial weights, DDP."""
        cfg, rank, device = self.cfg, self.rank, self.device
        self.branches = build_branch_states(cfg, self.topology.roles, device)
        seed_everything(cfg.train.seed * 1000 + 7919 * (rank + 1))
        self.streams = BranchStreams(cfg.train.seed, {n: self.layout.group_ranks[n].index(rank) for n in self.branches},
                                     device)
        self.lo, self.hi = self.layout.data_slice(rank, cfg.data.batch_size)
        if resume_from is None:  # before the engines: ZeRO copies the weights into its partitions
            init_weights(self.branches, cfg, device, self.is_main)
        if cfg.train.deepspeed != "none":
            attach_deepspeed(self.branches, self.topology, cfg, micro_batch=self.hi - self.lo)
        self.step, self.position = 0, DataPosition()
        if resume_from is not None:  # after the engines: they load their own (sharded) state
            self.step, self.position = load_checkpoint(resume_from, list(self.branches.values()), rank, device,
                                                       self.streams)
            if self.is_main:
                log.warning("resuming from checkpoint step %d (%s)", self.step, resume_from)
        topology = self.topology
        self.wrapped = {
            n: b.engine if b.engine is not None else wrap_ddp(b.model, topology.groups.get(n), topology.group_size(n), device)
            for n, b in self.branches.items()
        }
        for model in self.wrapped.values():
            model.train()

    def _build_stream(self) -> None:
        from distill_depth.data.stream import TrainStream  # noqa: PLC0415

        cfg, topology = self.cfg, self.topology
        stream = TrainStream(
            cfg.data.train_shards, self.layout.cell_batch_size(cfg.data.batch_size), topology.data_rank,
            topology.data_world, num_workers=cfg.data.num_workers, seed=cfg.train.seed,
            samples_per_epoch=cfg.data.samples_per_epoch, use_stereo=cfg.data.uses_stereo,
            shuffle_buffer=cfg.data.shuffle_buffer, labelled_fraction=cfg.data.labelled_fraction,
            label_seed=cfg.data.label_seed,
        )
        self.source = BatchSource(stream, self.position, cfg.train.overfit_batches)

    # -- the run --------------------------------------------------------------------------------

    def run(self) -> int:
        """Steps until ``train.max_steps`` (then the export) or an agreed stop; the exit code."""
        max_steps = self.cfg.train.max_steps
        if self.step < max_steps and agree_to_stop(self.stop_request.requested, self.device):
            stop_before_first_step(self.step, self.is_main)
            return 0
        while self.step < max_steps:
            step_start = time.perf_counter()
            self.train_step()
            stop, failures = self.agree_on_stop(step_start)
            self.maybe_log(stop)
            self.maybe_validate()
            self.progress.update(1)
            self.maybe_checkpoint(stop)
            if failures:
                raise RunStopped(failure_message(failures, self.cfg.train.max_bad_steps, self.checkpoint_path), 1,
                                 report=self.is_main)
            if stop and self.step != max_steps:
                if self.is_main:
                    log.warning("stopped by signal at step %d; checkpoint complete", self.step)
                    requeue_if_slurm()
                return 0
        self.export()
        return 0

    def train_step(self) -> None:
        """One optimiser step: ``train.grad_accum`` micro-steps, then each branch's update."""
        buffers = {n: snapshot_buffers(b.model) for n, b in self.branches.items() if b.engine is None}
        step_values: dict[str, list[float]] = defaultdict(list)  # loss terms of the step under way
        for name, state in self.branches.items():  # before the micro-steps: an engine steps its schedule in the last
            self.totals[f"{name}/lr"].append(state.scheduler.get_last_lr()[0])
        for micro in range(self.cfg.train.grad_accum):
            self._micro_step(micro, step_values)
        for name, state in self.branches.items():
            t0 = time.perf_counter()
            outcome = _optimizer_step(state, self.cfg.optim.grad_clip, self.bad_steps, self.topology.groups.get(name),
                                      self.device, self.step + 1, buffers.get(name))
            if outcome is not StepOutcome.NON_FINITE:
                for key in [k for k in step_values if k.startswith(f"{name}/")]:
                    self.totals[key].extend(step_values.pop(key))
            self.totals[f"{name}/no_gradient_share"].append(float(outcome is StepOutcome.NO_GRADIENT))
            self.totals[f"{name}/compute_s"][-1] += time.perf_counter() - t0
        # a skipped step's (non-finite) values stay out of the means: step_values is dropped here
        self.step += 1
        self.watchdog.beat()

    def _micro_step(self, micro: int, step_values: dict[str, list[float]]) -> None:
        t0 = time.perf_counter()
        batch = self.source.next().slice(self.lo, self.hi).to(self.device)
        self.totals["time/data_s"].append(time.perf_counter() - t0)
        sync = micro == self.cfg.train.grad_accum - 1
        with contextlib.ExitStack() as stack:
            if not sync:
                for model in self.wrapped.values():
                    if isinstance(model, DistributedDataParallel):  # DeepSpeed handles its own accumulation
                        stack.enter_context(model.no_sync())
            predictions, partners = self._forward_and_exchange(batch, micro)
            for name in self.branches:
                self._loss_and_backward(name, batch, predictions[name], partners[name], step_values)
        self.last_predictions = predictions

    def _forward_and_exchange(self, batch: Batch, micro: int) -> tuple[dict[str, Any], dict[str, Any]]:
        predictions = {}
        for name, model in self.wrapped.items():
            t0 = time.perf_counter()
            with self.autocast(), self.streams.use(name):
                predictions[name] = model(batch)
            self.totals[f"{name}/compute_s"].append(time.perf_counter() - t0)
        partners = self.topology.exchange({n: p.for_partner() for n, p in predictions.items()})
        self.totals["time/exchange_s"].append(self.topology.timing.exchange_s)
        self.totals["time/wait_s"].append(self.topology.timing.wait_s)
        if self.dump_dir:
            dump_exchange(self.dump_dir, self.rank, self.step, micro, predictions, partners)
        return predictions, partners

    def _loss_and_backward(self, name: str, batch: Batch, prediction: Any, partner: Any,
                           step_values: dict[str, list[float]]) -> None:
        state = self.branches[name]
        t0 = time.perf_counter()
        with self.streams.use(name):
            loss, terms = state.model.loss(batch, prediction, partner, self.step)
        if self.fault is not None:
            loss, terms = self.fault.apply(name, self.step + 1, self.rank, loss, terms)
        backward(state, loss, self.cfg.train.grad_accum)
        self.totals[f"{name}/compute_s"][-1] += time.perf_counter() - t0
        values = {"loss": float(loss.detach()), **{t: float(v) for t, v in terms.items()}}
        self.bad_steps.see(name, values)
        for term, value in values.items():
            step_values[f"{name}/{term}"].append(value)

    def agree_on_stop(self, step_start: float) -> tuple[bool, list[Any]]:
        """World-wide: stop now (a signal, or a branch out of good steps)? And the failures, if any."""
        t0 = time.perf_counter()
        stop = agree_to_stop(self.stop_request.requested or self.bad_steps.exhausted(), self.device)
        # every rank agreed to stop, so every rank gathers: did a branch run out of good steps?
        failures = [f for part in gather_objects(self.bad_steps.failures(self.rank)) for f in part] if stop else []
        # Idle time of the faster group: it waits here for the slower one to finish its step.
        self.totals["time/sync_s"].append(time.perf_counter() - t0)
        self.totals["time/step_s"].append(time.perf_counter() - step_start)
        return stop, failures

    # -- at the step boundary -------------------------------------------------------------------

    def maybe_log(self, stop: bool) -> None:
        """Scalars every ``train.log_every`` steps (and at the last or a stopping step); images
        every ``train.image_every``. Collective."""
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps or stop:
            self._log_scalars()
        if cfg.train.image_every and step % cfg.train.image_every == 0:
            if self.panel_batch is not None:
                log_panels({n: b.model for n, b in self.branches.items()}, self.panel_batch, self.topology,
                           self.tracker, step, self.autocast, self.is_main)
            else:  # no val shards: the maps of the last training batch, as the branch saw them
                log_images(self.last_predictions, self.topology, self.tracker, step)

    def _log_scalars(self) -> None:
        elapsed = time.perf_counter() - self.log_start
        n_steps = len(self.totals["time/step_s"])
        for name in self.bad_steps.window:
            self.totals[f"{name}/skipped_steps"] = [float(self.bad_steps.window[name])]
            self.bad_steps.window[name] = 0
        scalars = reduce_scalars(self.totals, self.is_main)
        if self.is_main:
            scalars["samples_per_s"] = self.samples_per_step * n_steps / max(elapsed, 1e-9)
            scalars["epoch"] = self.source.position.epoch
            self.tracker.log_scalars(scalars, self.step)
            append_jsonl(self.out / "metrics.jsonl", self.step, scalars)
            self.progress.set_postfix(samples_s=f"{scalars['samples_per_s']:.1f}", **{
                f"{n}_loss": f"{scalars.get(f'{n}/loss', float('nan')):.3f}" for n in self.cfg.branches})
        self.totals.clear()
        self.log_start = time.perf_counter()

    def maybe_validate(self) -> None:
        """Validation every ``train.val_every`` steps when there are validation shards. Collective."""
        cfg, step = self.cfg, self.step
        if not (cfg.train.val_every and cfg.data.val_shards and step % cfg.train.val_every == 0):
            return
        metrics = validate({n: b.model for n, b in self.branches.items()}, self.topology, cfg, self.device,
                           self.autocast, self.watchdog.beat)
        if self.is_main:
            self.tracker.log_scalars(metrics, step)
            append_jsonl(self.out / "metrics.jsonl", step, metrics)
            log.info("step %d validation: %s", step, {k: round(v, 4) for k, v in metrics.items()})

    def maybe_checkpoint(self, stop: bool) -> Path | None:
        """A checkpoint every ``train.ckpt_every`` steps, at the last step and when stopping. Collective."""
        cfg, step = self.cfg, self.step
        if not (stop or step == cfg.train.max_steps or (cfg.train.ckpt_every and step % cfg.train.ckpt_every == 0)):
            return None
        layout = self.layout
        self.checkpoint_path = save_checkpoint(
            self.out, step, self.source.position, list(self.branches.values()),
            {n for n in self.branches if self.topology.is_group_leader(n)}, self.rank, self.world, cfg,
            {"mode": layout.mode, "ratio": layout.ratio, "branches": list(layout.branches)},
            cfg.train.keep_last, self.streams,
        )
        self.watchdog.beat()
        if self.is_main:
            log.info("checkpoint step %d written to %s", step, self.checkpoint_path)
        return self.checkpoint_path

    def export(self) -> None:
        """The final weights: each group leader writes its branch, rank 0 the metadata. Collective."""
        leaders = {n: b.model for n, b in self.branches.items() if self.topology.is_group_leader(n)}
        export_run(self.out, leaders, self.cfg, self.step, self.rank, self.checkpoint_path)
        if self.is_main:
            self.tracker.log_export(self.out / "export", self.step)
            log.info("training done at step %d; export in %s", self.step, self.out / "export")
        if self.dump_dir:
            weights = {n: {k: v.detach().cpu() for k, v in b.model.state_dict().items()} for n, b in self.branches.items()}
            torch.save(weights, Path(self.dump_dir) / f"weights_rank{self.rank}.pt")

    def close(self) -> None:
        """Progress bar, data workers, watchdog, tracker: whatever happened in the run."""
        self.progress.close()
        self.source.close()
        self.watchdog.stop()
        self.tracker.finish()
