"""Colormaps: shapes, dtypes, monotonic brightness, per-image normalisation, panel layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from distill_depth.viz import (
    CONFIDENCE_COLORMAP,
    DEPTH_COLORMAP,
    colorize_confidence,
    colorize_depth,
    luminance,
    side_by_side,
)


def test_colormaps_rise_monotonically_in_brightness():
    for table in (DEPTH_COLORMAP, CONFIDENCE_COLORMAP):
        assert table.shape == (256, 3) and table.dtype == np.uint8
        assert np.all(np.diff(luminance(table)) >= 0)


def test_colorize_depth_shape_dtype_and_near_is_brighter():
    depth = torch.linspace(1.0, 80.0, 64).view(1, 1, 4, 16).repeat(2, 1, 1, 1)
    depth[1] *= 3.0  # a scaled copy looks the same: the range is per image
    depth[0, 0, 0, 0] = 0.0  # no value → black
    rgb = colorize_depth(depth)
    assert rgb.shape == (2, 4, 16, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == [0, 0, 0]
    lum = luminance(rgb[1].reshape(-1, 3))
    assert np.all(np.diff(lum) <= 1e-9)  # depth increases along the row-major order
    assert lum[0] > lum[-1] + 100
    np.testing.assert_array_equal(rgb[0].reshape(-1, 3)[1:], colorize_depth(depth[:1] * 3.0)[0].reshape(-1, 3)[1:])


def test_colorize_depth_without_any_value_is_black():
    assert colorize_depth(np.zeros((1, 1, 3, 3), np.float32)).max() == 0


def test_colorize_confidence_fixed_scale():
    conf = torch.tensor([0.0, 0.5, 1.0]).view(1, 1, 1, 3)
    rgb = colorize_confidence(conf)
    assert rgb.shape == (1, 1, 3, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0, 0].tolist() == CONFIDENCE_COLORMAP[0].tolist()
    assert rgb[0, 0, 2].tolist() == CONFIDENCE_COLORMAP[255].tolist()
    # Not normalised per image: a uniform 0.5 map keeps its mid colour.
    assert colorize_confidence(torch.full((1, 1, 2, 2), 0.5))[0, 0, 0].tolist() == rgb[0, 0, 1].tolist()


def test_side_by_side_layout():
    image = torch.rand(2, 3, 5, 7)
    depth = torch.rand(2, 1, 5, 7) + 1
    conf = torch.rand(2, 1, 5, 7)
    out = side_by_side(image, depth, conf, gap=2)
    assert out.shape == (2, 5, 7 * 3 + 2 * 2, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[:, :, 9:16], colorize_depth(depth))
    assert (out[:, :, 7:9] == 255).all()
    assert side_by_side(depth=depth, gap=0).shape == (2, 5, 7, 3)
    with pytest.raises(ValueError, match="panels differ"):
        side_by_side(image, torch.rand(2, 1, 4, 7) + 1)
    with pytest.raises(ValueError, match="at least one"):
        side_by_side()
