"""distill-depth: semi-supervised monocular depth by mutual distillation (Baek, Kim, Kim, ICRA 2022)."""

__version__ = "0.1.0"
