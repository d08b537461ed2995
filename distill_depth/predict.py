"""`distill-depth predict`: depth and confidence for your own images, any size.

Each image is resized to the training size, inferred, and the maps resized back to the image's
own size. An image that cannot be read is reported by name; the others are still written, and
the exit status is non-zero when any failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from distill_depth.data.kitti import write_depth_png
from distill_depth.evaluation.inference import (
    fuse,
    fusion_aligns_u,
    infer_at_size,
    network_size,
    training_size,
)
from distill_depth.viz import side_by_side

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")
FORMATS = ("npy", "png16", "color")


class ImageReadError(ValueError):
    """An input image could not be decoded; the message names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


@dataclass
class PredictOptions:
    branch: str
    formats: tuple[str, ...]
    out_dir: Path
    input_size: tuple[int, int] | None
    flip_tta: bool = False
    align_u_scale: bool = False


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True, help="run folder, checkpoint folder or export folder")
    parser.add_argument("inputs", nargs="+", metavar="IMAGES_OR_DIR", help="image files and/or folders of images")
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--branch", choices=("S", "U", "fused"), default="S",
                        help="which depth to write: branch S, branch U, or their confidence-weighted fusion (default S)")
    parser.add_argument("--format", choices=FORMATS, action="append", dest="formats",
                        help="npy: float32 metres (+ _confidence.npy); png16: uint16 metres×256; "
                             "color: image | depth | confidence PNG. Repeatable (default: npy)")
    parser.add_argument("--flip-tta", action="store_true", help="average with the mirrored image's prediction")
    parser.add_argument("--height", type=int, default=None, help="network input height (default: training size)")
    parser.add_argument("--width", type=int, default=None, help="network input width (default: training size)")


def collect_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files given directly plus the images inside given folders (sorted); missing paths as failures."""
    images: list[Path] = []
    failures: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                failures.append((item, "folder holds no images"))
            images.extend(found)
        elif path.is_file():
            images.append(path)
        else:
            failures.append((item, "no such file or folder"))
    return images, failures


def read_image(path: Path) -> torch.Tensor:
    """``(1, 3, H, W)`` float in [0, 1], or :class:`ImageReadError` naming the file."""
    try:
        with Image.open(path) as image:
            image.load()
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ImageReadError(path, f"cannot read image ({exc.__class__.__name__}: {exc})") from None
    return torch.from_numpy(rgb.copy()).permute(2, 0, 1).unsqueeze(0)


def _unique_stem(path: Path, used: set[str]) -> str:
    stem = path.stem
    candidate, n = stem, 1
    while candidate in used:
        candidate, n = f"{stem}-{n}", n + 1
    used.add(candidate)
    return candidate


def _atomic_save(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def write_outputs(stem: str, image: torch.Tensor, depth: torch.Tensor, confidence: torch.Tensor,
                  options: PredictOptions) -> list[Path]:
    """Write the requested formats for one image; returns the paths written."""
    base = f"{stem}_{options.branch}"
    written: list[Path] = []
    depth_np = depth[0, 0].float().cpu().numpy()
    if "npy" in options.formats:
        for suffix, array in (("", depth_np), ("_confidence", confidence[0, 0].float().cpu().numpy())):
            path = options.out_dir / f"{base}{suffix}.npy"
            _atomic_save(path, lambda p, a=array: np.save(p, a))
            written.append(path)
    if "png16" in options.formats:
        path = options.out_dir / f"{base}.png"
        _atomic_save(path, lambda p: write_depth_png(p, depth_np))
        written.append(path)
    if "color" in options.formats:
        panel = side_by_side(image, depth, confidence)[0]
        path = options.out_dir / f"{base}_color.png"
        _atomic_save(path, lambda p: Image.fromarray(panel).save(p, format="PNG"))
        written.append(path)
    return written


@torch.no_grad()
def predict_image(models: dict[str, Any], image: torch.Tensor, options: PredictOptions
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Depth and confidence ``(1, 1, H, W)`` at the image's own size for ``options.branch``."""
    size = network_size(tuple(image.shape[-2:]), options.input_size)
    if options.branch == "fused":
        s = infer_at_size(models["S"], image, size, flip_tta=options.flip_tta)
        u = infer_at_size(models["U"], image, size, flip_tta=options.flip_tta)
        return fuse(*s, *u, align_u_scale=options.align_u_scale)
    return infer_at_size(models[options.branch], image, size, flip_tta=options.flip_tta)


def predict_files(models: dict[str, Any], paths: list[Path], options: PredictOptions, device: torch.device,
                  log: Any = None) -> tuple[list[Path], list[tuple[str, str]]]:
    """Predict every image; a failing image is recorded and skipped. Returns (written, failures)."""
    log = log or sys.stderr
    options.out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    written: list[Path] = []
    failures: list[tuple[str, str]] = []
    for path in paths:
        stem = _unique_stem(path, used)
        try:
            image = read_image(path).to(device)
        except ImageReadError as exc:
            print(f"error: {exc}", file=log)
            failures.append((str(path), exc.reason))
            continue
        depth, confidence = predict_image(models, image, options)
        written.extend(write_outputs(stem, image, depth, confidence, options))
    return written, failures


def run(args: argparse.Namespace) -> int:
    from distill_depth.checkpoint_io import load_branches_for_command

    if (args.height is None) != (args.width is None):
        print("distill-depth predict: error: give both --height and --width, or neither", file=sys.stderr)
        return 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ("S", "U") if args.branch == "fused" else (args.branch,)
    models, cfg = load_branches_for_command("predict", args.checkpoint, names, device)
    if models is None:
        return 2
    options = PredictOptions(
        branch=args.branch,
        formats=tuple(dict.fromkeys(args.formats or ["npy"])),
        out_dir=args.out,
        input_size=(args.height, args.width) if args.height is not None else training_size(cfg),
        flip_tta=args.flip_tta,
        align_u_scale=fusion_aligns_u(cfg),
    )
    paths, failures = collect_images(args.inputs)
    for item, why in failures:
        print(f"error: {item}: {why}", file=sys.stderr)
    written, read_failures = predict_files(models, paths, options, device)
    failures.extend(read_failures)
    print(f"wrote {len(written)} files for {len(paths) - len(read_failures)} images to {args.out}")
    if failures:
        print(f"{len(failures)} input(s) failed:", file=sys.stderr)
        for item, why in failures:
            print(f"  {item}: {why}", file=sys.stderr)
        return 1
    return 0
