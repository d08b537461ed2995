"""Entry point for launchers: ``accelerate launch train.py --config configs/default.yaml [key=value ...]``.

Same arguments as ``distill-depth train``; see docs/training.md.
"""

import sys

from distill_depth.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
