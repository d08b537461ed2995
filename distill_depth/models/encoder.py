"""timm encoders with explicit, checked weight loading (random, local file, or timm's hub download).

A local weights file is validated against the architecture before timm loads it, so a wrong file
fails with a message that names the file and the offending keys instead of a deep torch traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import timm
import torch
from torch import Tensor, nn

Pretrained = Literal["none", "file", "hub"]


class WeightsError(ValueError):
    """A weights file is missing, unreadable, or does not fit the architecture."""


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) state dict from ``path``.

    A torch checkpoint that wraps its weights in ``state_dict``/``model`` is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"model.weights: file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure becomes one clear error
        raise WeightsError(f"model.weights: cannot read {path}: {exc}") from None
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise WeightsError(f"model.weights: {path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _check_fits(name: str, state: dict[str, Tensor], path: str) -> dict[str, Tensor]:
    """Compare a classification checkpoint with timm's ``name`` (3 input channels); drop its classifier."""
    reference = timm.create_model(name, pretrained=False)
    classifier = reference.pretrained_cfg.get("classifier") or ()
    classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not any(k.startswith(c + ".") for c in classifier)}
    expected = {
        k: v.shape
        for k, v in reference.state_dict().items()
        if not any(k.startswith(c + ".") for c in classifier) and not k.endswith("num_batches_tracked")
    }
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not k.endswith("num_batches_tracked"))
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k])}"
        for k in sorted(set(expected) & set(state))
        if state[k].shape != expected[k]
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys (e.g. {missing[:5]})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:5]})")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches ({'; '.join(mismatched[:5])})")
    if problems:
        raise WeightsError(f"model.weights: {path} does not fit timm model {name!r}: " + ", ".join(problems))
    return state


def create_encoder(
    name: str,
    pretrained: Pretrained = "none",
    weights: str | None = None,
    in_chans: int = 3,
    out_indices: tuple[int, ...] | None = None,
) -> nn.Module:
    """A timm ``features_only`` encoder; ``in_chans`` != 3 widens the first conv.

    With pretrained weights and ``in_chans = 6`` (two stacked frames), timm repeats the RGB filters
    and scales them by 3/6: the standard "duplicate and halve" initialisation.
    """
    kwargs: dict[str, Any] = {"features_only": True, "in_chans": in_chans}
    if out_indices is not None:
        kwargs["out_indices"] = out_indices
    try:
        if pretrained == "none":
            return timm.create_model(name, pretrained=False, **kwargs)
        if pretrained == "hub":
            return timm.create_model(name, pretrained=True, **kwargs)
    except RuntimeError as exc:
        raise WeightsError(f"model encoder {name!r} (pretrained={pretrained}): {exc}") from None
    except Exception as exc:  # unknown model name and similar
        if "Unknown model" in str(exc):
            raise WeightsError(f"model.encoder: unknown timm model {name!r}") from None
        raise
    if pretrained != "file":
        raise WeightsError(f"model.pretrained: {pretrained!r} is not one of ['none', 'file', 'hub']")
    if not weights:
        raise WeightsError("model.pretrained is 'file' but model.weights is not set")
    state = _check_fits(name, read_state_dict(weights), weights)
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"state_dict": state}, **kwargs)


class InputNormalize(nn.Module):
    """Images in [0, 1] → the encoder's expected normalisation (ImageNet mean/std), per 3-channel frame."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        cfg = getattr(encoder, "pretrained_cfg", None) or {}
        mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32)
        self.register_buffer("mean", mean.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", std.view(1, 3, 1, 1), persistent=False)

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3k, H, W) → same shape; each consecutive RGB triple is normalised."""
        frames = image.shape[1] // 3
        mean = self.mean.repeat(1, frames, 1, 1).to(image.dtype)
        std = self.std.repeat(1, frames, 1, 1).to(image.dtype)
        return (image - mean) / std
