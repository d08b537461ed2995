"""`distill-depth export`: one trained branch as an ONNX file, checked against PyTorch with onnxruntime.

The graph is the branch's inference path (``infer``: no augmentation, BatchNorm statistics):
input ``image`` (B, 3, H, W) float32 RGB in [0, 1]; outputs ``depth`` (B, 1, H, W) metres and
``confidence`` (B, 1, H, W) in (0, 1). The batch axis is dynamic, H and W are fixed at export.
The file is written under a temporary name, run by onnxruntime at two batch sizes beside the
PyTorch branch, and moved to its final name only when both agree within the tolerance.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from distill_depth.evaluation.inference import NETWORK_MULTIPLE, training_size

INPUT_NAME = "image"
OUTPUT_NAMES = ("depth", "confidence")
OPSET = 18
VERIFY_BATCHES = (1, 2)
"""Batch sizes onnxruntime runs in the check: two, so that a batch axis frozen at export fails it."""
DEPTH_ATOL, DEPTH_RTOL = 1e-3, 1e-4
"""Depth passes when |onnx − torch| ≤ atol + rtol·|torch| (metres) at every pixel; fp32 reorderings
give ~1e-5 relative."""
CONFIDENCE_ATOL = 1e-4


class ExportError(ValueError):
    """An export that cannot be made as asked; the message names the option or file."""


class InferenceGraph(nn.Module):
    """The traced module: image → (depth, confidence) of one branch, as ``branch.infer``."""

    def __init__(self, branch: nn.Module) -> None:
        super().__init__()
        self.branch = branch

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        return self.branch.infer(image)


@dataclass(frozen=True)
class Verification:
    """onnxruntime against PyTorch on the same seeded images."""

    batches: tuple[int, ...]
    max_depth_diff: float
    """Largest |onnx − torch| depth over all pixels and batches, metres."""
    max_confidence_diff: float
    within_tolerance: bool


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    parser.add_argument("--onnx", required=True, type=Path, metavar="OUT.onnx", help="ONNX file to write")
    parser.add_argument("--branch", choices=("S", "U"), default="S", help="which branch to export (default S)")
    parser.add_argument("--height", type=int, default=None, help="input height (default: training size)")
    parser.add_argument("--width", type=int, default=None, help="input width (default: training size)")


def export_size(training: tuple[int, int] | None, height: int | None, width: int | None) -> tuple[int, int]:
    """The fixed (H, W) of the graph: the one asked for, else the training size; multiples of 32."""
    if (height is None) != (width is None):
        raise ExportError("give both --height and --width, or neither")
    if height is None:
        if training is None:
            raise ExportError("the run's training shards are not on this machine, so its training size is "
                              "unknown: give --height and --width")
        height, width = training
    for name, value in (("--height", height), ("--width", width)):
        if value < NETWORK_MULTIPLE or value % NETWORK_MULTIPLE:
            raise ExportError(f"{name} {value}: must be a positive multiple of {NETWORK_MULTIPLE} "
                              "(five stride-2 stages of the encoder)")
    return int(height), int(width)  # type: ignore[arg-type]


def export_onnx(branch: nn.Module, path: Path, size: tuple[int, int]) -> None:
    """Write ``branch``'s inference graph to ``path`` with a dynamic batch axis."""
    graph = InferenceGraph(branch).eval()
    example = torch.rand(2, 3, *size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter narrates each pass on stdout; the command prints its own summary instead.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(graph, (example,), str(path), input_names=[INPUT_NAME], output_names=list(OUTPUT_NAMES),
                          dynamic_shapes=({0: batch},), opset_version=OPSET, dynamo=True, external_data=False)


def verify_onnx(branch: nn.Module, path: Path, size: tuple[int, int], seed: int = 0) -> Verification:
    """Run ``path`` with onnxruntime and ``branch`` with PyTorch on the same random images."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(seed)
    depth_diff = confidence_diff = 0.0
    ok = True
    for batch in VERIFY_BATCHES:
        image = torch.rand(batch, 3, *size, generator=generator)
        with torch.no_grad():
            depth, confidence = (t.numpy() for t in branch.infer(image))
        onnx_depth, onnx_confidence = session.run(list(OUTPUT_NAMES), {INPUT_NAME: image.numpy()})
        if onnx_depth.shape != depth.shape or onnx_confidence.shape != confidence.shape:
            return Verification(VERIFY_BATCHES, float("inf"), float("inf"), False)
        depth_diff = max(depth_diff, float(np.abs(onnx_depth - depth).max()))
        confidence_diff = max(confidence_diff, float(np.abs(onnx_confidence - confidence).max()))
        ok &= bool(np.allclose(onnx_depth, depth, atol=DEPTH_ATOL, rtol=DEPTH_RTOL))
        ok &= bool(np.allclose(onnx_confidence, confidence, atol=CONFIDENCE_ATOL, rtol=0.0))
    return Verification(VERIFY_BATCHES, depth_diff, confidence_diff, ok)


def add_metadata(path: Path, entries: dict[str, str]) -> None:
    """Record where the graph came from inside the ONNX file (``metadata_props``)."""
    import onnx

    model = onnx.load(str(path))
    for key, value in entries.items():
        prop = model.metadata_props.add()
        prop.key, prop.value = key, value
    onnx.save(model, str(path))


def run(args: argparse.Namespace) -> int:
    from distill_depth.checkpoint_io import load_branches_for_command

    models, cfg = load_branches_for_command("export", args.checkpoint, (args.branch,), torch.device("cpu"))
    if models is None:
        return 2
    try:
        size = export_size(training_size(cfg), args.height, args.width)
    except ExportError as exc:
        print(f"distill-depth export: error: {exc}", file=sys.stderr)
        return 2
    branch = models[args.branch]
    out: Path = args.onnx
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        export_onnx(branch, tmp, size)
        add_metadata(tmp, {"branch": args.branch, "checkpoint": str(args.checkpoint), "height": str(size[0]),
                           "width": str(size[1]), "depth_unit": "metres", "input": "RGB float32 in [0, 1], NCHW"})
        check = verify_onnx(branch, tmp, size)
        print(f"onnxruntime vs PyTorch, batch sizes {', '.join(map(str, check.batches))} at {size[0]}x{size[1]}: "
              f"max |depth difference| {check.max_depth_diff:.3g} m, "
              f"max |confidence difference| {check.max_confidence_diff:.3g}")
        if not check.within_tolerance:
            print(f"distill-depth export: error: the ONNX graph does not match PyTorch (tolerance: depth "
                  f"{DEPTH_ATOL} m + {DEPTH_RTOL}·depth, confidence {CONFIDENCE_ATOL}); {out} not written",
                  file=sys.stderr)
            return 1
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {out} (branch {args.branch}, input {INPUT_NAME} Bx3x{size[0]}x{size[1]}, outputs "
          f"{' and '.join(OUTPUT_NAMES)})")
    return 0
