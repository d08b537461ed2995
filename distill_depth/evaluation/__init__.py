"""Evaluation internals behind ``distill-depth evaluate`` / ``predict``.

protocol (presets, masks, prediction preparation) · inference (resize in/out, flip TTA, fusion) ·
runner (per-image records) · distributed (rank split, gather) · report (means, tables, JSON).
"""
