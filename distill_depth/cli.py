"""`distill-depth` command line: one subcommand per module, imported only when it runs.

Each subcommand module defines ``configure_parser(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("distill_depth.data.synth", "write synthetic drives in KITTI raw layout (or Cityscapes snippets)"),
    "make-shards": ("distill_depth.data.shards", "turn a KITTI raw or Cityscapes tree into WebDataset shards"),
    "train": ("distill_depth.train.cli", "train both branches (same as `accelerate launch train.py`)"),
    "evaluate": ("distill_depth.evaluate", "evaluate a checkpoint on shards (KITTI and Cityscapes protocols)"),
    "predict": ("distill_depth.predict", "depth + confidence for your own images"),
    "export": ("distill_depth.export", "one trained branch as an ONNX file, checked with onnxruntime"),
}


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill-depth", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            importlib.import_module(module_name).configure_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = argv[0] if argv and argv[0] in SUBCOMMANDS else None
    parser = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
