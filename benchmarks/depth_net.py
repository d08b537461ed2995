"""DepthNet forward + backward: eager vs ``train.channels_last`` vs ``train.compile`` (and both).

    .venv/bin/python benchmarks/depth_net.py [--batch-size 4] [--height 96] [--width 320] [--iters 5]
        [--threads 1] [--variants eager,channels_last,compile,compile+channels_last] [--device cpu]

Each variant builds the same network (seed 0) and runs ``--warmup`` untimed steps (for the compiled
ones: the compilation, timed separately); then the variants take turns, ``--iters`` timed steps
each, and the median of each is printed. A step is
forward, a sum over every output map, backward; no optimiser. The network is in train mode
(BatchNorm batch statistics), as in training.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distill_depth.config import ModelConfig
from distill_depth.models import DepthNet


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(net: DepthNet, image: torch.Tensor) -> None:
    disps, confs = net(image)
    sum(m.float().mean() for m in disps + confs).backward()


def build(variant: str, args: argparse.Namespace, device: torch.device) -> tuple[DepthNet, torch.Tensor, float]:
    """(network, input, warm-up seconds) of one variant, warmed up (compiled ones: compiled)."""
    torch.manual_seed(0)
    net = DepthNet(ModelConfig(encoder=args.encoder)).to(device).train()
    image = torch.rand(args.batch_size, 3, args.height, args.width, device=device)
    if "channels_last" in variant:
        net.to(memory_format=torch.channels_last)
        image = image.contiguous(memory_format=torch.channels_last)
    if "compile" in variant:
        net.compile()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        _step(net, image)
    _sync(device)
    return net, image, time.perf_counter() - t0


def measure(variants: list[str], args: argparse.Namespace, device: torch.device) -> dict[str, dict[str, float]]:
    """Median step time per variant, the variants taking turns: on a shared machine a slow minute
    then hits every variant alike."""
    built = {v: build(v, args, device) for v in variants}
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.iters):
        for variant, (net, image, _) in built.items():
            t0 = time.perf_counter()
            _step(net, image)
            _sync(device)
            times[variant].append(time.perf_counter() - t0)
    return {v: {"median_s": statistics.median(t), "min_s": min(t), "warmup_s": built[v][2]} for v, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--height", type=int, default=96)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--encoder", default="resnet18")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", default="eager,channels_last,compile,compile+channels_last")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"DepthNet({args.encoder}) forward+backward, batch {args.batch_size}, {args.height}x{args.width}, "
          f"{device}, {args.threads} thread(s), median of {args.iters}")
    results = measure(args.variants.split(","), args, device)
    baseline = next(iter(results.values()))["median_s"]
    for variant, result in results.items():
        print(f"{variant:>24}: {result['median_s'] * 1e3:8.1f} ms  (min {result['min_s'] * 1e3:.1f}, "
              f"x{baseline / result['median_s']:.2f} vs first; warm-up {result['warmup_s']:.1f} s)")

if __name__ == "__main__":
    main()
