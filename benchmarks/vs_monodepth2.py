"""Training step time: Monodepth2's own trainer step vs ours (U alone, S alone, S+U colocated).

    python benchmarks/vs_monodepth2.py --monodepth2 PATH [--data ../shared/data/udacity_sfnd]
        [--steps 12] [--warmup 3] [--threads 2] [--device cpu]
    python benchmarks/vs_monodepth2.py --ours-only ...   # our three rows only (no checkout needed)
    python benchmarks/vs_monodepth2.py ... --memory      # then each trainer's peak RSS, alone in a process

``PATH`` is a checkout of https://github.com/nianticlabs/monodepth2 that you provide (its licence
is non-commercial: nothing of it is in this repository). Its ``trainer.Trainer`` is built from its
own ``options.MonodepthOptions`` and one step is the body of its ``run_epoch``:
``process_batch`` (depth + pose networks, warps, losses), ``zero_grad``, ``backward``, Adam
``step``. Ours is ``Trainer.train_step`` of ``distill-depth train`` (``benchmarks/trainer_steps.py``):
augmentation, forward, exchange, losses, backward, AdamW step of each branch.

The same configuration on both sides: 320x96, batch 4, ResNet-18 depth and pose encoders from
scratch, 4 scales, monocular frames t-1/t+1, 0 loader workers, ``--threads`` torch threads (one
process, both trainers in it). Both are fed the same in-memory batches, made once from the real
KITTI drive in ``--data`` (KITTI raw layout: targets 1..28 with frames t-1, t+1 and the LiDAR of
t, resized with Lanczos; Monodepth2 gets its input dict with the colour pyramid and K/inv_K per
scale, ours a ``Batch``), so neither loader is timed and both see identical pixels and the
drive's own intrinsics. Monodepth2's dataset still gets built by its trainer, from a split file of
those frames written to a temporary folder. The trainers take turns step by step (the order
rotates each round), ``--warmup`` untimed rounds then ``--steps`` timed; medians and ratios
(ours / Monodepth2) are printed.

Compatibility with current numpy / Pillow / torchvision / missing optional packages is applied in
this process only, at run time (never by editing the checkout): ``PIL.Image.ANTIALIAS`` (Pillow
10 removed it) is ``LANCZOS``; torchvision's ResNet builders accept the legacy positional
``pretrained`` flag (from scratch only); numpy's removed ``np.int`` / ``np.float`` / ``np.bool``
aliases are the builtins; ``tensorboardX``, ``six``, ``skimage`` and ``IPython`` get inert stand-ins
when they are not installed (Monodepth2 imports them; the timed step uses none of them).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import trainer_steps  # noqa: E402

REPO = trainer_steps.REPO
DEFAULT_DATA = REPO.parent / "shared" / "data" / "udacity_sfnd"
DRIVE = "2011_09_26/2011_09_26_drive_unknown_sync"
TARGETS = range(1, 29)
"""Frames with both neighbours and a LiDAR scan (image_02: 0..77, velodyne: 0..29)."""
MONODEPTH2_MODULES = ("trainer", "options", "utils", "layers", "kitti_utils", "networks", "datasets")
HOW_TO_GET = """vs_monodepth2 needs a Monodepth2 checkout (non-commercial licence: it is not part of this repo):

    git clone https://github.com/nianticlabs/monodepth2 /path/to/monodepth2
    python benchmarks/vs_monodepth2.py --monodepth2 /path/to/monodepth2

(--ours-only runs our three rows without it.)"""


# -- the frames ----------------------------------------------------------------------------------

def load_frames(data: Path, height: int, width: int, n_batches: int, batch_size: int) -> list[dict]:
    """Per batch: {"color": {frame_id: [(B,3,h/2^s,w/2^s) for s in 0..3]}, "sparse", "K"} (CPU
    float32), from the drive's frames (targets in order, cycling), Lanczos-resized as Monodepth2
    resizes them; ``data == "random"``: smooth random frames (for tests without the drive)."""
    import numpy as np
    import torch
    from PIL import Image

    from distill_depth.data import kitti

    if str(data) == "random":
        return [_random_frames(trainer_steps.random_batch(batch_size, height, width, "cpu", seed=i))
                for i in range(n_batches)]
    calib = kitti.load_calibration(data / DRIVE.split("/")[0])
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def image(frame: int, scale: int) -> torch.Tensor:
        if (frame, scale) not in cache:
            path = data / DRIVE / "image_02" / "data" / f"{frame:010d}.png"
            with Image.open(path) as im:
                full = im.convert("RGB")
            size = (width // 2**scale, height // 2**scale)
            array = np.asarray(full.resize(size, Image.LANCZOS), dtype=np.float32) / 255.0
            cache[(frame, scale)] = torch.from_numpy(array).permute(2, 0, 1)
        return cache[(frame, scale)]

    orig_hw = (375, 1242)
    K = torch.from_numpy(kitti.intrinsics(calib, 2, orig_hw, (height, width))).float()
    batches, targets = [], list(TARGETS)
    for b in range(n_batches):
        frames = [targets[(b * batch_size + i) % len(targets)] for i in range(batch_size)]
        color = {f_id: [torch.stack([image(t + f_id, s) for t in frames]) for s in range(4)] for f_id in (0, -1, 1)}
        sparse = torch.stack([torch.from_numpy(kitti.project_velodyne(
            kitti.load_velodyne(data / DRIVE / "velodyne_points" / "data" / f"{t:010d}.bin"), calib, 2, orig_hw,
            (height, width)))[None] for t in frames])
        batches.append({"color": color, "sparse": sparse, "K": K, "frames": frames})
    return batches


def _random_frames(batch) -> dict:
    import torch.nn.functional as F

    def pyramid(x):
        return [x if s == 0 else F.interpolate(x, scale_factor=0.5**s, mode="area") for s in range(4)]

    color = {0: pyramid(batch.image), -1: pyramid(batch.sources["prev"]), 1: pyramid(batch.sources["next"])}
    return {"color": color, "sparse": batch.sparse_depth, "K": batch.K[0], "frames": list(range(batch.size))}


def our_batch(frames: dict, device):
    from distill_depth.types import Batch

    color = frames["color"]
    B = color[0][0].shape[0]
    return Batch(image=color[0][0], sources={"prev": color[-1][0], "next": color[1][0]},
                 sparse_depth=frames["sparse"], K=frames["K"].expand(B, 3, 3).clone(),
                 keys=[f"2011_09_26_drive_unknown_l_{t:010d}" for t in frames["frames"]]).to(device)


def monodepth2_inputs(frames: dict, device) -> dict:
    """Monodepth2's ``inputs`` dict: ("color"/"color_aug", frame_id, scale) and ("K"/"inv_K", scale)
    (4x4, K scaled by 2^-scale); colour augmentation off (its dataset applies it to half the
    samples, outside the step)."""
    import torch

    color = frames["color"]
    B = color[0][0].shape[0]
    inputs = {}
    for f_id, pyramid in color.items():
        for s, im in enumerate(pyramid):
            inputs[("color", f_id, s)] = im.to(device)
            inputs[("color_aug", f_id, s)] = inputs[("color", f_id, s)]
    for s in range(4):
        K = torch.eye(4)
        K[:3, :3] = frames["K"]
        K[:2] /= 2**s  # (pixel-centre offsets differ by < 1 px at the coarse scales: immaterial for time)
        inputs[("K", s)] = K.expand(B, 4, 4).clone().to(device)
        inputs[("inv_K", s)] = torch.linalg.inv(K).expand(B, 4, 4).clone().to(device)
    return inputs


# -- Monodepth2, driven from outside ----------------------------------------------------------------

def _stub(name: str, **attrs) -> list[str]:
    """An inert module ``name`` (with parents) when the real one is not installed; the names added
    to ``sys.modules`` (taken out again after Monodepth2's imports, so that other libraries'
    probes, e.g. accelerate's for tensorboardX, do not find them)."""
    top = name.split(".")[0]
    if top in sys.modules or importlib.util.find_spec(top) is not None:
        return []
    parts, added = name.split("."), []
    for i in range(1, len(parts) + 1):
        dotted = ".".join(parts[:i])
        sys.modules[dotted] = types.ModuleType(dotted)
        added.append(dotted)
        if i > 1:
            setattr(sys.modules[".".join(parts[:i - 1])], parts[i - 1], sys.modules[dotted])
    for key, value in attrs.items():
        setattr(sys.modules[name], key, value)
    return added


class _NullWriter:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def monodepth2_compat():
    """Run-time shims for current packages (this process only; the checkout is never edited)."""
    import numpy as np
    import PIL.Image
    import torchvision.models

    stubs = [*_stub("tensorboardX", SummaryWriter=_NullWriter), *_stub("IPython", embed=lambda *a, **k: None),
             *_stub("six.moves.urllib"), *_stub("skimage.transform")]
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [sys.modules.pop(name, None) for name in stubs])
        if not hasattr(PIL.Image, "ANTIALIAS"):
            stack.enter_context(mock.patch.object(PIL.Image, "ANTIALIAS", PIL.Image.LANCZOS, create=True))
        for alias, builtin in (("int", int), ("float", float), ("bool", bool)):
            if alias not in np.__dict__:
                stack.enter_context(mock.patch.object(np, alias, builtin, create=True))
        for depth in (18, 34, 50, 101, 152):
            name = f"resnet{depth}"
            stack.enter_context(mock.patch.object(torchvision.models, name, _legacy_resnet(getattr(torchvision.models, name))))
        yield


def _legacy_resnet(builder):
    def build(pretrained=False, **kwargs):
        if pretrained:
            raise ValueError("vs_monodepth2 trains from scratch (--weights_init scratch)")
        return builder(weights=None, **kwargs)

    return build


def import_monodepth2(path: Path) -> tuple[types.ModuleType, types.ModuleType]:
    """Monodepth2's ``trainer`` and ``options`` modules from ``path``. Its generic top-level names
    (``utils``, ``layers``, ``datasets``...) must not be taken, and are taken out of
    ``sys.modules`` again once imported (its modules keep their references), so that no later
    import in this process (ours, or a library's ``import datasets``) gets one of them."""
    if not (path / "trainer.py").is_file() or not (path / "networks").is_dir():
        raise SystemExit(f"--monodepth2 {path}: no trainer.py / networks/ there; is it a Monodepth2 checkout?")
    taken = [m for m in MONODEPTH2_MODULES if m in sys.modules]
    if taken:
        raise SystemExit(f"modules {taken} are already imported in this process: Monodepth2's would clash")
    sys.path.insert(0, str(path))
    try:
        with monodepth2_compat():
            trainer, options = importlib.import_module("trainer"), importlib.import_module("options")
        for name in MONODEPTH2_MODULES:
            where = getattr(sys.modules.get(name), "__file__", "") or ""
            if name in sys.modules and not Path(where).resolve().is_relative_to(path.resolve()):
                raise SystemExit(f"module {name} resolved to {where}, not into {path}")
    finally:
        sys.path.remove(str(path))
        for name in [m for m in sys.modules if m.split(".")[0] in MONODEPTH2_MODULES]:
            del sys.modules[name]
    return trainer, options


def build_monodepth2(modules: tuple[types.ModuleType, types.ModuleType], args: argparse.Namespace, split_dir: Path,
                     log_dir: Path):
    """Monodepth2's ``Trainer`` at our configuration; its split is our frames (a temp file)."""
    module, md2_options = modules

    split = split_dir / "bench"
    split.mkdir(parents=True, exist_ok=True)
    lines = "".join(f"{DRIVE} {t} l\n" for t in TARGETS)
    for part in ("train", "val"):
        (split / f"{part}_files.txt").write_text(lines)
    argv = ["--data_path", str(args.data), "--log_dir", str(log_dir), "--model_name", "vs_distill_depth",
            "--height", str(args.height), "--width", str(args.width), "--batch_size", str(args.batch_size),
            "--num_layers", "18", "--weights_init", "scratch", "--scales", "0", "1", "2", "3",
            "--frame_ids", "0", "-1", "1", "--num_workers", "0", "--png"]
    if args.device == "cpu":
        argv.append("--no_cuda")
    opts = md2_options.MonodepthOptions().parser.parse_args(argv)
    real_readlines = module.readlines
    # its trainer reads <checkout>/splits/<split>/<part>_files.txt: the same file names, our folder
    redirect = lambda path: real_readlines(str(split / Path(path).name))  # noqa: E731
    with monodepth2_compat(), mock.patch.object(module, "readlines", redirect):
        trainer = module.Trainer(opts)
    trainer.set_train()
    return trainer


def monodepth2_step(trainer, inputs: dict) -> None:
    """The body of Monodepth2's ``run_epoch`` for one batch (logging aside)."""
    outputs, losses = trainer.process_batch(dict(inputs))
    trainer.model_optimizer.zero_grad()
    losses["loss"].backward()
    trainer.model_optimizer.step()


# -- the comparison ------------------------------------------------------------------------------

OURS = {"ours U": ["branches=[U]"], "ours S": ["branches=[S]"], "ours S+U": []}


def our_overrides(args: argparse.Namespace) -> list[str]:
    return ["model.encoder=resnet18", "model.pose_encoder=resnet18", "model.pretrained=none", "model.num_scales=4",
            "data.u_sources=temporal", f"data.batch_size={args.batch_size}", "data.num_workers=0", *args.overrides]


def compare(args: argparse.Namespace) -> dict[str, list[float]]:
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    wanted = lambda label: args.only in (None, label)  # noqa: E731
    md2_modules = None if args.ours_only or not wanted("Monodepth2") else import_monodepth2(Path(args.monodepth2))
    rounds = args.warmup + args.steps
    frames = load_frames(args.data, args.height, args.width, min(rounds, len(TARGETS) // args.batch_size),
                         args.batch_size)
    ours_batches = [our_batch(f, device) for f in frames]
    steps: dict[str, object] = {}
    with contextlib.ExitStack() as stack:
        if md2_modules is not None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="dd_vs_md2_")))
            md2 = build_monodepth2(md2_modules, args, tmp / "splits", tmp / "logs")
            md2_inputs = [monodepth2_inputs(f, device) for f in frames]
            md2_count = iter(range(10**9))
            steps["Monodepth2"] = lambda: monodepth2_step(md2, md2_inputs[next(md2_count) % len(md2_inputs)])
        for label, extra in OURS.items():
            if not wanted(label):
                continue
            trainer = stack.enter_context(trainer_steps.in_memory_trainer(our_overrides(args) + extra, ours_batches))
            steps[label] = trainer.train_step
        times: dict[str, list[float]] = {label: [] for label in steps}
        labels = list(steps)
        for r in range(rounds):
            for label in labels[r % len(labels):] + labels[:r % len(labels)]:  # the order rotates
                trainer_steps.sync(device)
                t0 = time.perf_counter()
                steps[label]()
                trainer_steps.sync(device)
                if r >= args.warmup:
                    times[label].append(time.perf_counter() - t0)
    return times


def report(times: dict[str, list[float]], args: argparse.Namespace) -> None:
    print(f"\n{args.width}x{args.height}, batch {args.batch_size}, ResNet-18 from scratch, 4 scales, frames t-1/t+1, "
          f"{args.device}, {args.threads} thread(s), {os.cpu_count()} cores; median of {args.steps} steps after "
          f"{args.warmup} (alternating), frames: {args.data}"
          + (f"; ours with {' '.join(args.overrides)}" if args.overrides else "") + "\n")
    base = statistics.median(times["Monodepth2"]) if "Monodepth2" in times else None
    print(f"{'':12}{'median s/step':>15}{'min s/step':>12}{'samples/s':>11}{'ours/Monodepth2':>17}")
    for label, values in times.items():
        median = statistics.median(values)
        ratio = f"{median / base:.2f}" if base and label != "Monodepth2" else "-"
        print(f"{label:12}{median:>15.3f}{min(values):>12.3f}{args.batch_size / median:>11.2f}{ratio:>17}")


def peak_rss_mib() -> float:
    """This process's peak resident set size: ``VmHWM`` of /proc/self/status (KiB). Not
    ``ru_maxrss``: Linux carries that across ``exec`` from the parent, so a child of a big process
    would report the parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # no procfs: an upper bound


def measure_memory(args: argparse.Namespace, argv: list[str]) -> None:
    """Peak RSS of each trainer alone, in its own process (one process holds one trainer, as one
    rank does): the same frames and settings, ``--warmup`` + ``--steps`` rounds of that trainer only."""
    labels = ([] if args.ours_only else ["Monodepth2"]) + list(OURS)
    print(f"\npeak RSS, each trainer alone in its own process ({args.warmup} + {args.steps} steps):")
    base = None
    for label in labels:
        out = subprocess.run([sys.executable, __file__, *argv, "--only", label], capture_output=True, text=True)
        found = [line for line in out.stdout.splitlines() if line.startswith("peak RSS MiB ")]
        if out.returncode != 0 or not found:
            raise SystemExit(f"vs_monodepth2 --memory: the {label!r} process failed (exit {out.returncode}):\n"
                             f"{out.stderr[-2000:]}")
        mib = float(found[-1].split()[-1])
        base = mib if label == "Monodepth2" else base
        ratio = f"{mib / base:.2f}" if base and label != "Monodepth2" else "-"
        print(f"{label:12}{mib:>10.0f} MiB{ratio:>17}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--monodepth2", help="path to a checkout of nianticlabs/monodepth2")
    parser.add_argument("--ours-only", action="store_true", help="our rows only (no Monodepth2 checkout)")
    parser.add_argument("--data", default=str(DEFAULT_DATA),
                        help="KITTI raw root with the drive (default ../shared/data/udacity_sfnd); 'random': random frames")
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for our three trainers (repeatable), e.g. --set train.channels_last=true")
    parser.add_argument("--memory", action="store_true",
                        help="after the timing, the peak RSS of each trainer alone in its own process")
    parser.add_argument("--only", choices=["Monodepth2", *OURS], help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not args.monodepth2 and not args.ours_only:
        print(HOW_TO_GET)
        return 0
    if args.data != "random":
        args.data = Path(args.data)
        if not (args.data / DRIVE / "image_02").is_dir():
            raise SystemExit(f"--data {args.data}: no {DRIVE}/image_02 there (see /work/shared/data/SOURCES.md)")
    os.environ.setdefault("WANDB_MODE", "disabled")
    if args.only:  # one trainer in this process: the --memory probe
        compare(args)
        print(f"peak RSS MiB {peak_rss_mib():.1f}", flush=True)
        return 0
    report(compare(args), args)
    if args.memory:
        measure_memory(args, [a for a in argv if a != "--memory"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
