"""``distill-depth train`` and ``train.py``: the same arguments, the same behaviour.

    accelerate launch train.py --config configs/default.yaml train.max_steps=50 optim.lr=2e-4
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback

from distill_depth.config import ConfigError, load_config


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML config (configs/*.yaml); defaults when omitted")
    parser.add_argument("--report-to", choices=("wandb", "tensorboard", "none"), default=None,
                        help="tracker (same as train.report_to=...)")
    parser.add_argument("--resume", default=None, help="auto | none | PATH (same as train.resume=...)")
    parser.add_argument("--output-dir", default=None, help="run folder (same as train.output_dir=...)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. optim.lr=1e-4")


def _setup_logging() -> None:
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("torch.distributed", "accelerate", "DeepSpeed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run(args: argparse.Namespace) -> int:
    # First thing, before torch is imported (seconds): a SIGTERM/SIGUSR2 from now on only sets a
    # flag that the loop honours at the next step boundary, instead of killing the process.
    from distill_depth.train.signals import StopRequest  # noqa: PLC0415 (stdlib only)

    stop_request = StopRequest().install()
    _setup_logging()
    overrides = list(args.overrides)
    for flag, key in (("report_to", "train.report_to"), ("resume", "train.resume"), ("output_dir", "train.output_dir")):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"distill-depth train: {exc}", file=sys.stderr)
        return 2
    from distill_depth.train.loop import train  # noqa: PLC0415 (torch, accelerate: slow imports)

    distributed = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) > 1
    from distill_depth.data.shard_reader import ShardError  # noqa: PLC0415
    from distill_depth.topology import TopologyError  # noqa: PLC0415
    from distill_depth.train.checkpoint import CheckpointError  # noqa: PLC0415
    from distill_depth.train.deepspeed import DeepSpeedUnavailable  # noqa: PLC0415
    from distill_depth.train.door import RunStopped  # noqa: PLC0415
    from distill_depth.train.tracking import TrackerError  # noqa: PLC0415

    try:
        code = train(cfg, stop_request)
    except RunStopped as exc:
        # Every rank agreed on it (a failed check at the door, too many non-finite steps): one line, from rank 0.
        if exc.report:
            print(f"distill-depth train: {exc.message}", file=sys.stderr)
        tell_the_launcher(f"distill-depth train: {exc.message}")
        sys.stderr.flush()
        if distributed:
            os._exit(exc.code)
        return exc.code
    except (ConfigError, ShardError, TopologyError, CheckpointError, DeepSpeedUnavailable, TrackerError) as exc:
        # A setting that cannot work: say which, without a library traceback.
        print(f"distill-depth train: {exc}", file=sys.stderr)
        tell_the_launcher(f"distill-depth train: {exc}")
        sys.stderr.flush()
        if distributed:
            os._exit(2)
        return 2
    except Exception:  # noqa: BLE001
        traceback.print_exc()
        if distributed:
            # A peer died or a collective failed: leave now, without the process-group teardown
            # that could wait on the dead peer.
            sys.stderr.flush()
            os._exit(1)
        raise
    import torch.distributed as dist  # noqa: PLC0415

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return end_process(code)


def tell_the_launcher(line: str) -> None:
    """Write ``line`` to torchelastic's error file (``TORCHELASTIC_ERROR_FILE``, set by torchrun and
    ``accelerate launch``), so the launcher's failure report shows it as this rank's error instead
    of "To enable traceback see ..." (the report itself is the launcher's, printed after ours)."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    import json  # noqa: PLC0415
    import time  # noqa: PLC0415

    data = {"message": {"message": line, "extraInfo": {"py_callstack": line, "timestamp": str(int(time.time()))}}}
    try:
        with open(path, "w") as handle:
            json.dump(data, handle)
    except OSError:
        pass  # the report then falls back to the exit code; our own line was printed already


FAST_EXIT_ENV = "DISTILL_DEPTH_FAST_EXIT"


def end_process(code: int) -> int:
    """Flush logs and end the process now with ``code`` (unless ``DISTILL_DEPTH_FAST_EXIT=0``).

    Everything is written and closed by then (export, checkpoint, tracker, DataLoader workers,
    process group). What is left is the interpreter's teardown of torch/timm/kornia/wandb: a
    full garbage collection of a large heap, measured at 2-3 s on an idle 2-core machine and
    5-15 s on a busy one, per process; a launcher (and SLURM) waits for it. ``os._exit`` skips
    it. Set ``DISTILL_DEPTH_FAST_EXIT=0`` to return normally instead (calling ``run`` in-process).
    """
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if os.environ.get(FAST_EXIT_ENV, "1") == "0":
        return code
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train.py", description=__doc__.splitlines()[0])
    configure_parser(parser)
    return run(parser.parse_args(argv))
