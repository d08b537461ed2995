"""Mutual distillation: gradients, zero at agreement, scale alignment, ramp, edge cases."""

from __future__ import annotations

import math

import pytest
import torch

from distill_depth.losses import aligns_u_scale, distill, distill_ramp, median_scale


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _depth(seed: int, shape=(2, 1, 12, 20)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1.0 + 30.0 * torch.rand(shape, generator=g)


def _all(shape=(2, 1, 12, 20)) -> torch.Tensor:
    return torch.ones(shape, dtype=torch.bool)


def test_gradients_reach_only_the_student() -> None:
    student = _depth(0).requires_grad_()
    teacher = _depth(1).requires_grad_()
    conf = torch.rand(2, 1, 12, 20).requires_grad_()
    for align in (False, True):
        loss = distill(student, teacher, conf, _all(), scale_align=align)
        loss.backward()
        assert student.grad.abs().sum() > 0
        assert teacher.grad is None and conf.grad is None


def test_identical_predictions_give_zero() -> None:
    depth = _depth(0)
    conf = torch.rand(2, 1, 12, 20)
    assert distill(depth, depth.clone(), conf, _all()).item() == 0.0
    assert distill(depth, depth.clone(), conf, _all(), scale_align=True).item() == pytest.approx(0.0, abs=1e-6)


def test_value_is_confidence_weighted_log_l1() -> None:
    student = torch.full((1, 1, 2, 2), 2.0)
    teacher = torch.full((1, 1, 2, 2), 4.0)
    conf = torch.tensor([[[[1.0, 0.5], [0.0, 0.5]]]])
    assert distill(student, teacher, conf, torch.ones(1, 1, 2, 2, dtype=torch.bool)).item() == pytest.approx(
        math.log(2.0) * 2.0 / 4.0, rel=1e-5
    )


def test_scale_alignment_makes_s_from_u_invariant_to_u_scale() -> None:
    student = _depth(0)
    teacher = _depth(1)
    conf = torch.rand(2, 1, 12, 20)
    base = distill(student, teacher, conf, _all(), scale_align=True)
    for factor in (0.01, 0.3, 7.0):
        scaled = distill(student, teacher * factor, conf, _all(), scale_align=True)
        assert scaled.item() == pytest.approx(base.item(), rel=1e-5)
    # without alignment the scale matters
    assert distill(student, teacher * 7.0, conf, _all()).item() > base.item() + 0.3


def test_median_scale_per_image() -> None:
    student = torch.cat([torch.full((1, 1, 3, 3), 10.0), torch.full((1, 1, 3, 3), 4.0)])
    teacher = torch.full((2, 1, 3, 3), 2.0)
    k = median_scale(student, teacher, torch.ones(2, 1, 3, 3, dtype=torch.bool))
    assert k.flatten().tolist() == pytest.approx([5.0, 2.0])
    empty = median_scale(student, teacher, torch.zeros(2, 1, 3, 3, dtype=torch.bool))
    assert empty.flatten().tolist() == [1.0, 1.0]


def test_mask_restricts_pixels_and_empty_mask_gives_zero() -> None:
    student = _depth(0).requires_grad_()
    teacher = _depth(1)
    conf = torch.ones(2, 1, 12, 20)
    none = distill(student, teacher, conf, torch.zeros(2, 1, 12, 20, dtype=torch.bool), scale_align=True)
    none.backward()
    assert none.item() == 0.0 and torch.isfinite(student.grad).all()
    mask = torch.zeros(2, 1, 12, 20, dtype=torch.bool)
    mask[:, :, :6] = True
    teacher2 = teacher.clone()
    teacher2[:, :, 6:] = 1000.0  # outside the mask: must not matter
    assert distill(student, teacher, conf, mask).item() == pytest.approx(
        distill(student, teacher2, conf, mask).item(), rel=1e-6
    )


def test_nan_inf_zero_inputs_are_masked_out() -> None:
    student = _depth(0)
    teacher = _depth(1)
    conf = torch.rand(2, 1, 12, 20)
    student[0, 0, 0, 0] = float("nan")
    student[0, 0, 0, 1] = 0.0
    teacher[1, 0, 0, 0] = float("inf")
    teacher[1, 0, 0, 1] = -3.0
    conf[1, 0, 3, 3] = float("nan")
    student.requires_grad_()
    for align in (False, True):
        loss = distill(student, teacher, conf, _all(), scale_align=align)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(student.grad).all()


def test_fp32_under_bf16_autocast() -> None:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = distill(_depth(0).bfloat16(), _depth(1).bfloat16(), torch.rand(2, 1, 12, 20).bfloat16(), _all(), True)
    assert loss.dtype == torch.float32


def test_ramp_values() -> None:
    # warm-up as a fraction of max_steps: 10% of 1000 = 100 steps
    assert distill_ramp(0, 1000, 0.5, 0.1) == 0.0
    assert distill_ramp(50, 1000, 0.5, 0.1) == pytest.approx(0.25)
    assert distill_ramp(100, 1000, 0.5, 0.1) == pytest.approx(0.5)
    assert distill_ramp(5000, 1000, 0.5, 0.1) == pytest.approx(0.5)
    # warm-up as a number of steps
    assert distill_ramp(10, 1000, 1.0, 40) == pytest.approx(0.25)
    # no warm-up: full weight at once
    assert distill_ramp(0, 1000, 0.5, 0.0) == 0.5
    # a late start: 0 before it, then the same ramp shifted
    assert distill_ramp(499, 1000, 0.5, 0.1, start=0.5) == 0.0
    assert distill_ramp(550, 1000, 0.5, 0.1, start=0.5) == pytest.approx(0.25)
    assert distill_ramp(600, 1000, 0.5, 0.1, start=0.5) == pytest.approx(0.5)
    assert distill_ramp(29, 1000, 0.5, 0.0, start=30) == 0.0
    assert distill_ramp(30, 1000, 0.5, 0.0, start=30) == 0.5


@pytest.mark.parametrize(
    ("scale_align", "use_stereo", "expected"),
    [("auto", False, True), ("auto", True, False), ("on", True, True), ("off", False, False)],
)
def test_u_scale_is_aligned_only_when_u_has_no_metric_scale_unless_forced(
    scale_align: str, use_stereo: bool, expected: bool
) -> None:
    assert aligns_u_scale(scale_align, use_stereo) is expected


def test_relative_gate_keeps_only_pixels_where_the_teacher_is_surer() -> None:
    """distill_gate=relative: weight sg(C_t)·[C_t > C_s]; the student's confidence gets no gradient."""
    student = torch.full((1, 1, 2, 2), 2.0, requires_grad=True)
    teacher = torch.full((1, 1, 2, 2), 4.0)
    teacher_conf = torch.tensor([[[[0.9, 0.5], [0.3, 0.8]]]])
    student_conf = torch.tensor([[[[0.5, 0.6], [0.3, 0.1]]]]).requires_grad_()
    value = distill(student, teacher, teacher_conf, torch.ones(1, 1, 2, 2, dtype=torch.bool),
                    student_confidence=student_conf)
    # kept: 0.9 (> 0.5) and 0.8 (> 0.1); 0.5 < 0.6 and the tie 0.3 = 0.3 are dropped
    assert value.item() == pytest.approx(math.log(2.0) * (0.9 + 0.8) / 4.0, rel=1e-5)
    value.backward()
    assert student_conf.grad is None
    assert (student.grad != 0).flatten().tolist() == [True, False, False, True]


def test_lidar_trust_is_the_ratio_of_median_errors_at_the_lidar_points() -> None:
    from distill_depth.losses import lidar_trust

    truth = torch.full((3, 1, 4, 4), 10.0)
    sparse = torch.zeros_like(truth)
    sparse[:2, :, ::2, ::2] = 10.0  # image 2 has no LiDAR
    student = truth * math.exp(0.1)
    teacher = truth * math.exp(0.3)
    teacher[1] = truth[1] * math.exp(0.05)  # a teacher better than the student: capped at 1
    trust, has_lidar = lidar_trust(student, teacher, sparse, _all((3, 1, 4, 4)))
    assert has_lidar.tolist() == [True, True, False]
    assert trust.tolist() == pytest.approx([1 / 3, 1.0, 1.0], rel=1e-4)
    # a teacher wrong only by a global scale is fully trusted once its scale is aligned
    scaled = truth * 3.0
    aligned, _ = lidar_trust(truth * math.exp(0.1), scaled, sparse, _all((3, 1, 4, 4)), scale_align=True)
    assert aligned[:2].tolist() == pytest.approx([1.0, 1.0])


def test_lidar_coverage_spans_each_columns_returns() -> None:
    from distill_depth.losses import lidar_coverage

    sparse = torch.zeros(2, 1, 6, 3)
    sparse[0, 0, 2, 0], sparse[0, 0, 4, 0], sparse[0, 0, 3, 1] = 5.0, 6.0, 7.0
    covered, has_lidar = lidar_coverage(sparse)
    assert covered[0, 0].int().tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [1, 1, 0], [1, 0, 0], [0, 0, 0]]
    assert has_lidar.tolist() == [True, False] and not covered[1].any()


def test_reprojects_better_picks_the_depth_that_explains_the_frames() -> None:
    """A textured plane seen from two poses. Student and teacher are each right on one half of the
    image and 1.5x too far on the other: R is the teacher's right half and excludes its wrong half,
    except where the student's auto-mask dropped a pixel; a teacher depth of 0 is never in R."""
    from synthetic_scene import make_K, render_plane, rigid

    from distill_depth.geometry import warp_to_target
    from distill_depth.losses import photometric, reprojects_better

    B, H, W = 2, 48, 96
    K = make_K(B, H, W)
    T = torch.stack([rigid(0.0, 0.02, 0.0, 0.5, 0.0, 0.3), rigid(0.01, -0.02, 0.0, -0.5, 0.0, -0.3)]).float()
    target, depth = render_plane(K, torch.eye(4), H, W)
    source, _ = render_plane(K, T, H, W)
    left = torch.zeros(B, 1, H, W, dtype=torch.bool)
    left[..., : W // 2] = True
    student = torch.where(left, depth, 1.5 * depth)
    teacher = torch.where(left, 1.5 * depth, depth)
    warped, valid = warp_to_target(source, student, T, K)
    _, kept, student_error = photometric(target, [warped], [valid], sources=[source], return_unmasked=True)
    region = reprojects_better(teacher, student_error, kept, target, [source], [T], K)
    inner = torch.zeros_like(left)
    inner[..., 4:-4, 8:-8] = True  # away from the seam and the borders the SSIM window straddles
    inner[..., W // 2 - 4 : W // 2 + 4] = False
    right_share = region[inner & ~left].float().mean().item()
    left_share = region[inner & left & kept].float().mean().item()
    assert right_share > 0.8, right_share
    assert left_share < 0.1, left_share
    assert region[~kept].all()  # no photometric evidence: the teacher is not vetoed
    # swapping the roles flips the answer
    warped_t, valid_t = warp_to_target(source, teacher, T, K)
    _, kept_t, teacher_error = photometric(target, [warped_t], [valid_t], sources=[source], return_unmasked=True)
    swapped = reprojects_better(student, teacher_error, kept_t, target, [source], [T], K)
    assert swapped[inner & left].float().mean().item() > 0.8
    # an unusable teacher pixel is never chosen, even where the student had no evidence
    broken = teacher.clone()
    broken[..., :, W // 2 :] = 0.0
    assert not reprojects_better(broken, student_error, kept, target, [source], [T], K)[..., W // 2 :].any()


def test_most_confident_keeps_the_top_share_of_each_images_mask() -> None:
    """most_confident: per image, the top share of the masked pixels by confidence; pixels outside
    the mask never, an image with an empty mask nothing, share 1 the whole mask."""
    from distill_depth.losses import most_confident

    confidence = torch.arange(2 * 4 * 5, dtype=torch.float32).view(2, 1, 4, 5) / 40
    mask = torch.ones(2, 1, 4, 5, dtype=torch.bool)
    mask[0, 0, 3] = False  # the image's 5 most confident pixels are outside its mask
    mask[1] = False
    keep = most_confident(confidence, mask, 0.25)
    assert keep[0].sum() == 4  # ceil(0.25 * 15)
    assert torch.equal(keep[0, 0, 2, 1:], torch.ones(4, dtype=torch.bool)) and not keep[0, 0, 3].any()
    assert not keep[1].any()
    assert torch.equal(most_confident(confidence, mask, 1.0), mask)
