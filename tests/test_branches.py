"""Branches S and U: the Prediction contract, loss terms, no gradient across branches, edge cases,
and overfitting a handful of synthetic samples with real photometric consistency."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from distill_depth.branches import BranchError, SelfSupervisedBranch, SupervisedBranch, build_branch
from distill_depth.config import Config
from distill_depth.types import Batch

# --- a tiny analytic scene: textured ground plane, back wall, and a box face ---------------------


def _texture(u: torch.Tensor, v: torch.Tensor, seed: int) -> torch.Tensor:
    """Smooth colour texture (3, ...) as a function of plane coordinates: sums of sinusoids."""
    g = torch.Generator().manual_seed(seed)
    channels = []
    for _ in range(3):
        value = torch.full_like(u, 0.5)
        for _k in range(6):
            freq = 0.6 + 3.0 * torch.rand(2, generator=g, dtype=torch.float64)
            phase = 2 * math.pi * torch.rand(2, generator=g, dtype=torch.float64)
            amp = 0.05 + 0.12 * torch.rand(1, generator=g).item()
            value = value + amp * torch.sin(freq[0] * u + phase[0]) * torch.sin(freq[1] * v + phase[1])
        channels.append(value)
    return torch.stack(channels).clamp(0, 1)


def _render_at(center, H, W, K, seed, box_x, ox, oy):
    ys, xs = torch.meshgrid(
        torch.arange(H, dtype=torch.float64) + oy, torch.arange(W, dtype=torch.float64) + ox, indexing="ij"
    )
    dx = (xs - K[0, 2]) / K[0, 0]
    dy = (ys - K[1, 2]) / K[1, 1]
    cx, cy, cz = center
    inf = torch.full_like(dx, math.inf)
    t_ground = torch.where(dy > 1e-6, (1.5 - cy) / dy.clamp(min=1e-6), inf)  # plane y = 1.5 (y down)
    t_wall = torch.full_like(dx, 30.0 - cz)  # plane z = 30
    t_box = torch.full_like(dx, 10.0 - cz)  # box face z = 10, |x - box_x| < 2, |y| < 1.5
    bx, by = cx + dx * t_box, cy + dy * t_box
    t_box = torch.where(((bx - box_x).abs() < 2.0) & (by.abs() < 1.5), t_box, inf)
    nearest = torch.stack([t_ground, t_wall, t_box]).min(0)
    depth, which = nearest.values, nearest.indices
    X, Y, Z = cx + dx * depth, cy + dy * depth, cz + depth
    image = torch.where(
        which == 0,
        _texture(X * 1.2, Z * 0.4, seed),
        torch.where(which == 1, _texture(X * 0.5, Y * 0.5, seed + 1), _texture(X, Y, seed + 2)),
    )
    return image.float(), depth.float()[None]


def render(center, H, W, K, seed, box_x=0.0, supersample=4):
    """(image (3, H, W) supersampled against aliasing, depth (1, H, W) at pixel centres) of a camera at
    ``center`` (x right, y down, z forward; no rotation)."""
    offsets = [(i + 0.5) / supersample - 0.5 for i in range(supersample)]
    image = sum(
        _render_at(center, H, W, K.double(), seed, box_x, ox, oy)[0] for ox in offsets for oy in offsets
    ) / supersample**2
    return image, _render_at(center, H, W, K.double(), seed, box_x, 0.0, 0.0)[1]


def synthetic_batch(n: int, H: int, W: int, stereo: bool = False, scale: float = 1.0) -> Batch:
    """n samples: target, prev/next (camera 0.5 m back/forward) or the stereo partner (0.54 m right,
    with the exact ``stereo_T``), sparse LiDAR on a regular subset of pixels, exact depth as gt.
    ``scale`` multiplies every distance (the images do not change: pinhole projection is scale-free)."""
    K = torch.tensor([[0.58 * W, 0, (W - 1) / 2], [0, 1.92 * H, (H - 1) / 2], [0, 0, 1.0]])
    images, depths, sources = [], [], {k: [] for k in (("stereo",) if stereo else ("prev", "next"))}
    for i in range(n):
        x0, z0, seed, box_x = 0.4 * (i - n / 2), 0.7 * i, 10 * i, 0.8 * (i % 3 - 1)
        image, depth = render((x0, 0.0, z0), H, W, K, seed, box_x)
        images.append(image)
        depths.append(depth)
        offsets = {"prev": (0.0, -0.5), "next": (0.0, 0.5), "stereo": (0.54, 0.0)}
        for name in sources:
            ox, oz = offsets[name]
            sources[name].append(render((x0 + ox, 0.0, z0 + oz), H, W, K, seed, box_x)[0])
    depth = torch.stack(depths) * scale
    sparse = torch.zeros_like(depth)
    sparse[..., ::3, ::5] = depth[..., ::3, ::5]
    stereo_T = None
    if stereo:
        stereo_T = torch.eye(4).repeat(n, 1, 1)
        stereo_T[:, 0, 3] = -0.54 * scale  # X_stereo = X_target - baseline
    return Batch(
        image=torch.stack(images),
        sources={k: torch.stack(v) for k, v in sources.items()},
        sparse_depth=sparse,
        K=K.repeat(n, 1, 1),
        keys=[f"synth_{i:03d}" for i in range(n)],
        gt_depth=depth,
        stereo_T=stereo_T,
    )


def median_scaled_abs_rel(pred: torch.Tensor, gt: torch.Tensor) -> float:
    values = [((p * g.median() / p.median() - g).abs() / g).mean() for p, g in zip(pred, gt)]
    return torch.stack(values).mean().item()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


H, W = 32, 96


@pytest.fixture(scope="module")
def batch() -> Batch:
    return synthetic_batch(2, H, W)


@pytest.fixture(scope="module")
def branches() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    cfg = Config()
    return {"S": build_branch("S", cfg), "U": build_branch("U", cfg)}


# --- contract -------------------------------------------------------------------------------------


def test_build_branch_names() -> None:
    cfg = Config()
    assert isinstance(build_branch("S", cfg), SupervisedBranch)
    assert isinstance(build_branch("U", cfg), SelfSupervisedBranch)
    with pytest.raises(BranchError, match="'X'"):
        build_branch("X", cfg)


def test_synthetic_scene_is_photometrically_consistent(batch: Batch) -> None:
    from distill_depth.geometry import warp_to_target
    from distill_depth.losses import photometric_error

    T = torch.eye(4).repeat(2, 1, 1)
    T[:, 2, 3] = 0.5  # prev camera 0.5 m behind: X_prev = X_target + (0, 0, 0.5)
    warped, valid = warp_to_target(batch.sources["prev"], batch.gt_depth, T, batch.K)
    exact = photometric_error(batch.image, warped)[valid].mean()
    unwarped = photometric_error(batch.image, batch.sources["prev"]).mean()
    assert exact < 0.5 * unwarped


@pytest.mark.parametrize("name", ["S", "U"])
def test_forward_prediction_contract(branches, batch: Batch, name: str) -> None:
    branch = branches[name].train()
    prediction = branch(batch)
    assert len(prediction.depth) == len(prediction.confidence) == 4
    for s, (depth, conf) in enumerate(zip(prediction.depth, prediction.confidence)):
        assert depth.shape == conf.shape == (2, 1, H // 2**s, W // 2**s)
        assert depth.dtype == torch.float32 and depth.requires_grad
        assert ((depth >= 0.1 - 1e-4) & (depth <= 100.0 + 1e-3)).all()
    assert prediction.canonical_depth.shape == prediction.canonical_valid.shape == (2, 1, H, W)
    assert prediction.canonical_depth.requires_grad
    assert prediction.keys == batch.keys
    partner = prediction.for_partner()
    assert not partner.depth.requires_grad and partner.keys == batch.keys


def test_eval_forward_is_unaugmented_and_matches_infer(branches, batch: Batch) -> None:
    branch = branches["S"].eval()
    with torch.no_grad():
        prediction = branch(batch)
    depth, conf = branch.infer(batch.image)
    torch.testing.assert_close(prediction.canonical_depth, depth)
    torch.testing.assert_close(prediction.canonical_confidence, conf)
    assert prediction.canonical_valid.all()
    branch.train()
    branch.infer(batch.image)
    assert branch.training  # infer restores the mode


def test_weak_augmentation_flip_maps_back_exactly(batch: Batch) -> None:
    torch.manual_seed(0)
    cfg = Config()
    cfg.augment.flip_p = 1.0
    branch = build_branch("U", cfg).train()
    prediction = branch(batch)
    torch.testing.assert_close(prediction.canonical_depth, torch.flip(prediction.depth[0], dims=[-1]))


@pytest.mark.parametrize("name", ["S", "U"])
def test_loss_terms_alone_and_with_partner(branches, batch: Batch, name: str) -> None:
    branch = branches[name].train()
    other = branches["U" if name == "S" else "S"].train()
    prediction = branch(batch)
    total, terms = branch.loss(batch, prediction, None, step=0)
    expected = {"S": {"sup_nll", "pf", "distill", "conf_mean"}, "U": {"photo_nll", "smooth", "distill", "conf_mean"}}
    assert expected[name] <= set(terms)
    assert total.dtype == torch.float32 and total.ndim == 0 and torch.isfinite(total)
    assert terms["distill"].item() == 0.0
    assert all(not v.requires_grad for v in terms.values())

    partner = other(batch).for_partner()
    # during warm-up (step 0) the weight is 0; after it, λ_d
    _, terms0 = branch.loss(batch, prediction, partner, step=0)
    assert terms0["distill_weight"].item() == 0.0
    total, terms = branch.loss(batch, prediction, partner, step=10_000)
    assert terms["distill"].item() > 0 and terms["distill_weight"].item() == pytest.approx(0.5)
    branch.zero_grad()
    other.zero_grad()
    total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch.parameters())
    assert all(p.grad is None for p in other.parameters())  # nothing crosses to the partner


def test_partner_for_other_samples_is_an_error(branches, batch: Batch) -> None:
    branch = branches["S"]
    prediction = branch(batch)
    partner = prediction.for_partner()
    partner.keys = list(reversed(partner.keys))
    with pytest.raises(BranchError, match="same samples"):
        branch.loss(batch, prediction, partner, step=100)


def test_distill_direction_ablation(batch: Batch) -> None:
    torch.manual_seed(0)
    cfg = Config()
    cfg.loss.distill_direction = "u_from_s"
    s_branch, u_branch = build_branch("S", cfg), build_branch("U", cfg)
    s_pred, u_pred = s_branch(batch), u_branch(batch)
    assert s_branch.loss(batch, s_pred, u_pred.for_partner(), 10_000)[1]["distill"].item() == 0.0
    assert u_branch.loss(batch, u_pred, s_pred.for_partner(), 10_000)[1]["distill"].item() > 0.0


def test_edge_cases_give_finite_losses(branches, batch: Batch) -> None:
    no_lidar = Batch(**{**batch.__dict__, "sparse_depth": torch.zeros_like(batch.sparse_depth)})
    s_branch, u_branch = branches["S"], branches["U"]
    s_pred = s_branch(no_lidar)
    total, terms = s_branch.loss(no_lidar, s_pred, None, 0)
    assert torch.isfinite(total) and terms["sup_nll"].item() == 0.0
    total.backward()
    # NaN / inf in the inputs of the losses (sparse depth for S; images for U; the partner) are masked
    # out. (S's strong augmentation refuses NaN images itself: kornia's equalize checks the range.)
    broken = batch.sparse_depth.clone()
    broken[0, 0, 0, :5] = float("nan")
    broken[1, 0, 3, :5] = float("inf")
    images = batch.sources["prev"].clone()
    images[0, :, 10, 10] = float("nan")
    bad_lidar = Batch(**{**batch.__dict__, "sparse_depth": broken})
    bad_image = Batch(**{**batch.__dict__, "sources": {**batch.sources, "prev": images}})
    partner = u_branch(batch).for_partner()
    partner.depth[0, 0, :3] = float("nan")
    partner.confidence[1, 0, :3] = float("inf")
    for branch, bad in ((s_branch, bad_lidar), (u_branch, bad_image)):
        prediction = branch(bad)
        total, terms = branch.loss(bad, prediction, partner, 10_000)
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())


@pytest.mark.parametrize("name", ["S", "U"])
def test_losses_are_fp32_under_bf16_autocast(branches, batch: Batch, name: str) -> None:
    branch = branches[name]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        prediction = branch(batch)
        total, terms = branch.loss(batch, prediction, None, 0)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert all(v.dtype == torch.float32 for v in terms.values())


# --- overfitting ------------------------------------------------------------------------------------


def _train(branch, batch: Batch, steps: int, lr: float) -> list[dict[str, float]]:
    optimizer = torch.optim.Adam(branch.parameters(), lr=lr)
    history = []
    for step in range(steps):
        prediction = branch(batch)
        total, terms = branch.loss(batch, prediction, None, step)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        history.append({"total": total.item(), **{k: v.item() for k, v in terms.items()}})
    return history


def test_supervised_branch_overfits() -> None:
    """Two samples, defaults (depth starts around ``model.init_depth`` = 10 m, the scene spans
    ~3-30 m): the LiDAR NLL and the total fall well below where they started."""
    torch.manual_seed(0)
    batch = synthetic_batch(2, 32, 96)
    branch = build_branch("S", Config()).train()
    history = _train(branch, batch, steps=50, lr=1e-3)
    # means over the first 3 and last 5 steps: each step draws a new zoom (and, with
    # augment.zoom_depth=scale, a new depth target D*/m), so a single step is noisy
    start = {k: sum(h[k] for h in history[:3]) / 3 for k in ("sup_nll", "total")}
    end = {k: sum(h[k] for h in history[-5:]) / 5 for k in ("sup_nll", "total")}
    assert end["sup_nll"] < 0.85 * start["sup_nll"]
    assert end["total"] < 0.85 * start["total"]


def test_self_supervised_branch_overfits_and_beats_constant_depth() -> None:
    """U alone with the stereo partner (known baseline) on 2 samples: the photometric loss falls and
    its depth, median-scaled, beats the best constant depth. The scene is shrunk 20× and the
    depth starts at the sigmoid's midpoint (~0.2 m, ``model.init_depth: null``): in range, but far
    enough from the answer that the loss has to do the work."""
    torch.manual_seed(0)
    batch = synthetic_batch(2, 32, 96, stereo=True, scale=0.05)
    cfg = Config()
    cfg.data.u_sources = "stereo"
    cfg.model.init_depth = None
    branch = build_branch("U", cfg).train()
    history = _train(branch, batch, steps=35, lr=1e-3)
    assert history[-1]["pe"] < 0.6 * history[0]["pe"]
    assert history[-1]["photo_nll"] < 0.7 * history[0]["photo_nll"]
    depth, _ = branch.infer(batch.image)
    constant = median_scaled_abs_rel(torch.ones_like(batch.gt_depth), batch.gt_depth)
    assert median_scaled_abs_rel(depth, batch.gt_depth) < 0.9 * constant


# --- the real shard stream (bundled KITTI-layout shards) ----------------------------------------------


def test_branches_on_bundled_shards(bundled_shards) -> None:
    """A batch from the real stream through both branches with the exchange, MS mode (stereo)."""
    from distill_depth.data.stream import eval_batches
    from distill_depth.geometry import warp_to_target
    from distill_depth.losses import photometric_error

    batch = next(iter(eval_batches(str(bundled_shards / "train"), 2, 0, 1, num_workers=0)))
    assert "stereo" in batch.sources and batch.stereo_T is not None
    # the stereo transform is consistent with the images: at LiDAR pixels, warping the stereo
    # image with the LiDAR depth explains the target better than the un-warped stereo image
    warped, valid = warp_to_target(batch.sources["stereo"], batch.sparse_depth, batch.stereo_T, batch.K)
    lidar = valid & (batch.sparse_depth > 0)
    assert lidar.sum() > 100
    assert photometric_error(batch.image, warped)[lidar].mean() < photometric_error(
        batch.image, batch.sources["stereo"]
    )[lidar].mean()

    torch.manual_seed(0)
    cfg = Config()
    cfg.data.u_sources = "temporal+stereo"
    s_branch, u_branch = build_branch("S", cfg).train(), build_branch("U", cfg).train()
    s_pred, u_pred = s_branch(batch), u_branch(batch)
    assert set(u_pred.extras["poses"]) == {"prev", "next", "stereo"}
    for branch, prediction, partner in ((s_branch, s_pred, u_pred), (u_branch, u_pred, s_pred)):
        total, terms = branch.loss(batch, prediction, partner.for_partner(), step=cfg.train.max_steps)
        total.backward()
        assert torch.isfinite(total) and all(torch.isfinite(v) for v in terms.values())
        assert terms["distill"].item() > 0


# --- U's sources: M / S / MS ------------------------------------------------------------------------


def _with_stereo(batch: Batch, stereo: Batch) -> Batch:
    """``batch`` (prev/next) plus the stereo partner and stereo_T of ``stereo`` (same scenes)."""
    return Batch(image=batch.image, sources={**batch.sources, "stereo": stereo.sources["stereo"]},
                 sparse_depth=batch.sparse_depth, K=batch.K, keys=batch.keys, gt_depth=batch.gt_depth,
                 stereo_T=stereo.stereo_T)


@pytest.mark.parametrize(("sources", "warped", "has_pose_net"), [
    ("temporal", {"prev", "next"}, True), ("stereo", {"stereo"}, False),
    ("temporal+stereo", {"prev", "next", "stereo"}, True),
])
def test_u_sources_select_the_warped_frames(sources: str, warped: set[str], has_pose_net: bool) -> None:
    """Each mode warps exactly its sources; stereo-only U has no pose network at all, so no pose
    parameter can be run, trained or handed to an optimiser."""
    from distill_depth.train.optim import build_optimizer

    torch.manual_seed(0)
    batch = _with_stereo(synthetic_batch(1, 32, 96), synthetic_batch(1, 32, 96, stereo=True))
    cfg = Config()
    cfg.data.u_sources = sources
    branch = build_branch("U", cfg).train()
    prediction = branch(batch)
    assert set(prediction.extras["poses"]) == warped
    assert (branch.pose_net is not None) is has_pose_net
    has_pose_params = any(name.startswith("pose_net.") for name, _ in branch.named_parameters())
    assert has_pose_params is has_pose_net
    total, _ = branch.loss(batch, prediction, None, step=0)
    total.backward()
    optimizer = build_optimizer(branch, cfg.optim)
    optimised = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in branch.parameters()}
    assert len(optimizer.param_groups) == (2 if has_pose_net else 1)


def test_u_sources_missing_frames_are_named() -> None:
    mono, stereo_only = synthetic_batch(1, 32, 96), synthetic_batch(1, 32, 96, stereo=True)
    cfg = Config()
    cfg.data.u_sources = "stereo"
    with pytest.raises(BranchError, match=r"data.u_sources=stereo needs the 'stereo' source.*make-shards --stereo"):
        build_branch("U", cfg)(mono)
    cfg.data.u_sources = "temporal"
    with pytest.raises(BranchError, match=r"data.u_sources=temporal needs source frames \('prev', 'next'\)"):
        build_branch("U", cfg)(stereo_only)


def test_clean_teacher_view_sends_the_unaugmented_prediction(batch: Batch) -> None:
    """teacher_view=clean: S sends what it predicts on the un-augmented image (equal to a pass in
    train mode without augmentation), valid everywhere; BatchNorm running statistics unchanged
    by that extra pass; the student side still uses the augmented view."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.loss.teacher_view = "clean"
    s_branch = build_branch("S", cfg).train()
    norms = [m for m in s_branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    torch.manual_seed(1)
    s_pred = s_branch(batch)
    after_student_and_teacher = [m.running_mean.clone() for m in norms]
    sent = s_pred.for_partner()
    assert sent.valid.all()
    with torch.no_grad():
        reference = s_branch.depth_net(batch.image)
    assert torch.allclose(sent.depth, s_branch.depth_net.to_depth(reference[0][0]), rtol=1e-5)
    assert torch.allclose(sent.confidence, reference[1][0], atol=1e-6)
    assert not torch.allclose(sent.depth, s_pred.canonical_depth.detach().nan_to_num(), rtol=1e-3)

    cfg.loss.teacher_view = "own"
    torch.manual_seed(0)
    own_branch = build_branch("S", cfg).train()
    torch.manual_seed(1)
    own_branch(batch)
    own_norms = [m for m in own_branch.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for clean, own in zip(after_student_and_teacher, own_norms):
        assert torch.equal(clean, own.running_mean)  # only the student pass moved the statistics
    assert own_branch(batch).teacher is None


def test_clean_if_strong_makes_the_pass_by_augmentation_strength(batch: Batch) -> None:
    """``clean_if_strong`` follows the augmentation, not the branch's name: U with strong
    augmentation makes the clean pass, S with weak augmentation (the "same augmentation" ablation)
    sends its own view; the weak branch's sent depth is its own prediction with the flip undone."""
    cfg = Config()
    cfg.loss.teacher_view = "clean_if_strong"
    cfg.augment.s_strength, cfg.augment.u_strength = "weak", "strong"
    torch.manual_seed(0)
    assert build_branch("U", cfg).train()(batch).teacher is not None
    torch.manual_seed(0)
    weak_s = build_branch("S", cfg).train()(batch)
    assert weak_s.teacher is None
    sent = weak_s.for_partner()
    assert sent.valid.all()  # a flip maps back onto every pixel
    assert torch.equal(sent.depth, weak_s.canonical_depth.detach().float())


@pytest.mark.parametrize(("branches", "direction", "view", "sends_clean"), [
    (["S", "U"], "both", "clean", {"S": True, "U": True}),
    (["S", "U"], "s_from_u", "clean", {"S": False, "U": True}),  # one-way: only U teaches
    (["S", "U"], "none", "clean", {"S": False, "U": False}),
    (["S"], "both", "clean", {"S": False}),  # a single-branch run has nobody to teach
    (["U"], "both", "clean", {"U": False}),
    (["S", "U"], "both", "clean_if_strong", {"S": True, "U": False}),  # U's view is weak
    (["S", "U"], "both", "own", {"S": False, "U": False}),
])
def test_the_clean_teacher_pass_runs_only_for_a_partner_that_learns_from_it(
        batch: Batch, branches: list[str], direction: str, view: str, sends_clean: dict[str, bool]) -> None:
    """The extra no-grad pass of teacher_view=clean costs a forward pass per step: it is made only
    when the run has the partner branch and ``loss.distill_direction`` makes it learn;
    ``clean_if_strong`` makes it only for the strongly augmented branch."""
    cfg = Config()
    cfg.branches, cfg.loss.teacher_view, cfg.loss.distill_direction = branches, view, direction
    for name, expected in sends_clean.items():
        torch.manual_seed(0)
        assert (build_branch(name, cfg).train()(batch).teacher is not None) == expected, name


def test_u_confidence_on_all_pixels_trains_it_where_automasking_drops_them() -> None:
    """u_confidence_pixels=all: on a batch whose sources equal the target (a static camera) while the
    pose net predicts motion, every warp is worse than no warp and auto-masking drops every pixel.
    With ``kept`` U's confidence gets no gradient at all; with ``all`` it learns the warped error
    there, while the depth still gets no photometric gradient."""
    static = synthetic_batch(2, H, W)
    static = replace(static, sources={k: static.image.clone() for k in static.sources})
    grads = {}
    for pixels in ("kept", "all"):
        torch.manual_seed(0)
        cfg = Config()
        cfg.loss.u_confidence_pixels = pixels
        cfg.loss.lambda_smooth = 0.0
        u_branch = build_branch("U", cfg).train()
        with torch.no_grad():  # a sideways motion of a few pixels (at the identity motion the warp
            # would tie the un-warped error up to the resampling's rounding)
            u_branch.pose_net.head[-1].bias[3] = 0.5 / cfg.model.pose_translation_scale
        prediction = u_branch(static)
        total, _ = u_branch.loss(static, prediction, None, 0)
        total.backward()
        head = u_branch.depth_net.decoder
        grads[pixels] = {name: p.grad.abs().sum().item() if p.grad is not None else 0.0
                         for name, p in head.named_parameters()}
    conf_kept = sum(v for k, v in grads["kept"].items() if "conf" in k)
    conf_all = sum(v for k, v in grads["all"].items() if "conf" in k)
    assert conf_kept == 0.0 and conf_all > 0.0
    disp_all = sum(v for k, v in grads["all"].items() if "disp" in k)
    assert disp_all == 0.0


def test_u_confidence_target_lidar_shows_a_lidar_trained_confidence_and_leaves_u_blind_to_lidar() -> None:
    """u_confidence_target=lidar: U shows (partner, infer) the ErrorConfidenceNet's confidence, which
    learns U's LiDAR error on labelled images only (the term equals lidar_confidence_nll there); the
    depth net's gradients do not depend on the LiDAR at all, and without a labelled image the
    confidence net gets no gradient."""
    from distill_depth.losses import lidar_confidence_nll

    base = synthetic_batch(2, H, W)

    def step(batch: Batch, labelled: list[bool]):
        torch.manual_seed(0)
        cfg = Config()
        cfg.loss.u_confidence_target = "lidar"
        cfg.augment.flip_p = 0.0  # the view is the canonical frame: sparse[1] = 0 below is exact
        u_branch = build_branch("U", cfg).train()
        batch = replace(batch, labelled=torch.tensor(labelled))
        prediction = u_branch(batch)
        total, terms = u_branch.loss(batch, prediction, None, 0)
        total.backward()
        grads = {name: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                 for name, p in u_branch.named_parameters()}
        return u_branch, batch, prediction, terms, grads

    u_branch, batch, prediction, terms, grads = step(base, [True, False])
    shown = prediction.extras["shown_confidence"]
    assert not torch.equal(shown, prediction.confidence[0])
    # the default teacher_view (clean_if_strong) sends U's weak view; flip_p 0: its frame is canonical
    assert torch.equal(prediction.for_partner().confidence, shown)
    clean_confidence = u_branch._clean_teacher(batch)[1]  # what teacher_view=clean sends: the same net's
    with torch.no_grad():
        disps, confs = u_branch.depth_net(batch.image)
        expected = u_branch._shown_confidence(batch.image, disps[0], confs[0])
    assert torch.allclose(clean_confidence, expected, atol=1e-6)
    assert not torch.allclose(clean_confidence, confs[0].float(), atol=1e-3)
    assert torch.allclose(u_branch.infer(base.image)[1], u_branch.eval()(batch).canonical_confidence, atol=1e-6)
    sparse = base.sparse_depth.clone()
    sparse[1] = 0.0
    # monocular U (the default u_sources): its depth is median-scaled to the LiDAR first
    expected = lidar_confidence_nll(prediction.depth[0], shown, sparse, 0.1, align_scale=True)
    assert terms["lidar_conf_nll"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert sum(g.abs().sum() for n, g in grads.items() if n.startswith("error_confidence")) > 0

    # other LiDAR values (not a uniform factor, which the median scaling would cancel): the
    # confidence net learns another error, every other network exactly the same gradient
    warp = torch.linspace(0.5, 2.0, W).view(1, 1, 1, W)
    _, _, _, other_terms, other_grads = step(replace(base, sparse_depth=base.sparse_depth * warp), [True, False])
    assert other_terms["lidar_conf_nll"].item() != pytest.approx(terms["lidar_conf_nll"].item(), rel=1e-3)
    for name, grad in grads.items():
        if not name.startswith("error_confidence"):
            assert torch.equal(grad, other_grads[name]), name

    _, _, _, none_terms, none_grads = step(base, [False, False])
    assert none_terms["lidar_conf_nll"].item() == 0.0
    assert sum(g.abs().sum() for n, g in none_grads.items() if n.startswith("error_confidence")) == 0


def test_partner_trust_scales_s_from_u_by_the_lidar_error_ratio(batch: Batch) -> None:
    """partner_trust=lidar: a partner whose depth is off by a factor 2 at the LiDAR points is
    trusted less than one that equals S's own prediction; the running trust moves toward the
    measured value and lives in S's state_dict only when the option is on."""
    assert "partner_trust" not in build_branch("S", Config()).state_dict()
    torch.manual_seed(0)
    cfg = Config()
    cfg.loss.partner_trust = "lidar"
    cfg.loss.distill_warmup = 0
    cfg.loss.scale_align = "off"  # aligned, a factor 2 would cost the partner nothing
    s_branch = build_branch("S", cfg).train()
    assert "partner_trust" in s_branch.state_dict()
    torch.manual_seed(1)
    prediction = s_branch(batch)
    own = prediction.for_partner()
    good = replace(own, depth=batch.gt_depth.clone(), confidence=torch.ones_like(own.confidence))
    bad = replace(good, depth=batch.gt_depth * 2.0)
    _, good_terms = s_branch.loss(batch, prediction, good, 10)
    after_good = s_branch.partner_trust.item()
    _, bad_terms = s_branch.loss(batch, prediction, bad, 10)
    assert good_terms["partner_trust"].item() == pytest.approx(1.0)  # the truth: trusted fully
    assert 0.0 < bad_terms["partner_trust"].item() < 0.99  # an untrained S errs by ~0.67 in log, the partner by log 2
    assert s_branch.partner_trust.item() < after_good


def test_distill_regions_by_coverage_splits_who_teaches_where(batch: Batch) -> None:
    """by_coverage: S's term sees only pixels outside the LiDAR's reach, U's only inside; an
    unlabelled image gives both terms every pixel. Checked with a partner that differs from the
    student only above the top return (S's term then equals the everywhere term's share there)."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.loss.distill_regions = "by_coverage"
    cfg.loss.scale_align = "off"  # aligned, a factor 2 would vanish
    cfg.loss.unlabelled_gain_u_from_s = 1.0  # METHOD.md's: U learns from S on unlabelled images too
    s_branch, u_branch = build_branch("S", cfg).eval(), build_branch("U", cfg).eval()
    from distill_depth.losses import lidar_coverage

    covered, has_lidar = lidar_coverage(batch.sparse_depth)
    assert has_lidar.all() and covered.any() and (~covered).any()
    s_pred, u_pred = s_branch(batch), u_branch(batch)
    # a partner equal to the student inside the coverage, 2x off outside it
    own = s_pred.for_partner()
    outside_only = replace(own, depth=torch.where(covered, own.depth, own.depth * 2.0),
                           confidence=torch.ones_like(own.confidence))
    s_term = s_branch.loss(batch, s_pred, outside_only, 10_000)[1]["distill"].item()
    assert s_term == pytest.approx(math.log(2.0), rel=1e-4)  # every compared pixel is outside
    own_u = u_pred.for_partner()
    inside_equal = replace(own_u, depth=torch.where(covered, own_u.depth, own_u.depth * 2.0),
                           confidence=torch.ones_like(own_u.confidence))
    assert u_branch.loss(batch, u_pred, inside_equal, 10_000)[1]["distill"].item() == pytest.approx(0.0, abs=1e-6)
    unlabelled = replace(batch, labelled=torch.zeros(batch.image.shape[0], dtype=torch.bool))
    u_all = u_branch.loss(unlabelled, u_pred, inside_equal, 10_000)[1]["distill"].item()
    assert u_all > 0.1  # now the outside pixels count for U too




def test_lidar_rows_are_the_median_top_and_bottom_return_per_image() -> None:
    from distill_depth.branches.base import lidar_rows

    sparse = torch.zeros(2, 1, 21, 12)
    sparse[0, :, 5:16:2, ::2] = 10.0  # rows 5..15 in every other column
    sparse[0, :, 9, 1] = 10.0  # one column reaching only row 9: the median ignores it
    sparse[1, :, 10:21:5, :] = 10.0  # rows 10..20
    assert torch.allclose(lidar_rows(sparse), torch.tensor([[5 / 20, 15 / 20], [10 / 20, 20 / 20]]))


def test_distill_regions_by_sensor_coverage_gives_unlabelled_images_the_sensors_reach() -> None:
    """by_sensor_coverage: a labelled image keeps its own coverage; an unlabelled one gets the rows
    between the running top and bottom return rows of the labelled images seen in training (S's term
    outside, U's inside); before any labelled image, every pixel; evaluation does not update it."""
    torch.manual_seed(0)
    cfg = Config()
    cfg.loss.distill_regions = "by_sensor_coverage"
    batch = synthetic_batch(2, H, W)
    sparse = torch.zeros_like(batch.sparse_depth)
    sparse[..., 10:21:2, ::3] = batch.gt_depth[..., 10:21:2, ::3]  # rows 10..20 of 32
    s_branch, u_branch = build_branch("S", cfg).train(), build_branch("U", cfg).train()
    assert build_branch("S", Config()).state_dict().keys().isdisjoint({"lidar_reach"})

    nothing = replace(batch, sparse_depth=sparse, labelled=torch.tensor([False, False]))
    assert s_branch._distill_region(nothing, inside=False).all()
    assert s_branch.lidar_reach.isnan().all()

    mixed = replace(batch, sparse_depth=sparse, labelled=torch.tensor([True, False]))
    outside = s_branch._distill_region(mixed, inside=False)
    inside = u_branch._distill_region(mixed, inside=True)
    assert torch.allclose(s_branch.lidar_reach, torch.tensor([10 / 31, 20 / 31]))
    band = torch.zeros(H, dtype=torch.bool)
    band[10:21] = True
    assert torch.equal(outside[1, 0, :, 0], ~band) and torch.equal(inside[1, 0, :, 0], band)
    assert not outside[1, 0, 10:21].any() and inside[1, 0, 10:21].all()
    from distill_depth.losses import lidar_coverage

    own, _ = lidar_coverage(sparse[:1])
    assert torch.equal(outside[0], ~own[0]) and torch.equal(inside[0], own[0])

    lower = torch.zeros_like(sparse)
    lower[..., 20:31:2, ::3] = batch.gt_depth[..., 20:31:2, ::3]  # rows 20..30
    s_branch.eval()._distill_region(replace(batch, sparse_depth=lower, labelled=torch.tensor([True, True])), False)
    assert torch.allclose(s_branch.lidar_reach, torch.tensor([10 / 31, 20 / 31]))
    s_branch.train()._distill_region(replace(batch, sparse_depth=lower, labelled=torch.tensor([True, True])), False)
    assert torch.allclose(s_branch.lidar_reach, torch.tensor([0.9 * 10 / 31 + 0.1 * 20 / 31, 0.9 * 20 / 31 + 0.1 * 30 / 31]))


def test_unlabelled_gains_scale_each_distillation_term_on_unlabelled_samples_only(batch: Batch) -> None:
    """unlabelled_gain_<direction>=g: with a partner 1.5x off everywhere (confidence 1), a term is
    log 1.5 on an all-labelled batch with or without the gain, and (n - 1 + g)/n · log 1.5 when
    one of n samples is unlabelled; S's gain does not reach U's term and vice versa ("neutral" here
    is METHOD.md's 1 for both, set explicitly: the config's S gain is not 1)."""
    n = batch.image.shape[0]
    everyone, first_unlabelled = torch.ones(n, dtype=torch.bool), torch.arange(n) != 0
    for name, key, other in (("S", "unlabelled_gain_s_from_u", "unlabelled_gain_u_from_s"),
                             ("U", "unlabelled_gain_u_from_s", "unlabelled_gain_s_from_u")):
        torch.manual_seed(0)
        branches = {}
        for variant, gains in (("neutral", {key: 1.0, other: 1.0}), ("gained", {key: 4.0, other: 1.0}),
                               ("cut", {key: 0.0, other: 1.0}), ("other", {key: 1.0, other: 4.0})):
            cfg = Config()
            cfg.loss.scale_align = "off"  # aligned, a factor 1.5 would vanish
            for k, v in gains.items():
                setattr(cfg.loss, k, v)
            branches[variant] = build_branch(name, cfg).eval()
            branches[variant].load_state_dict(branches["neutral"].state_dict())
        prediction = branches["neutral"](batch)
        assert prediction.canonical_valid.all()  # eval: no augmentation, every pixel compared
        own = prediction.for_partner()
        partner = replace(own, depth=prediction.canonical_depth.detach() * 1.5,
                          confidence=torch.ones_like(own.confidence))

        def term(variant: str, labelled: torch.Tensor) -> float:
            loss = branches[variant].loss(replace(batch, labelled=labelled), prediction, partner, 10_000)
            return loss[1]["distill"].item()

        log15 = math.log(1.5)
        for variant in branches:
            assert term(variant, everyone) == pytest.approx(log15, rel=1e-4), (name, variant)
        assert term("neutral", first_unlabelled) == pytest.approx(log15, rel=1e-4)
        assert term("other", first_unlabelled) == pytest.approx(log15, rel=1e-4)
        assert term("gained", first_unlabelled) == pytest.approx((n - 1 + 4.0) / n * log15, rel=1e-4)
        assert term("cut", first_unlabelled) == pytest.approx((n - 1) / n * log15, rel=1e-4)


def test_distill_gate_relative_u_and_s_gate_only_their_branchs_term(batch: Batch) -> None:
    """distill_gate: with a partner 1.5x off everywhere whose confidence is 0.5 on the left half of
    the image and 1 on the right, and a student whose own confidence is forced to 0.75: ``teacher``
    weighs every pixel by the partner's confidence; ``relative`` keeps only the right half (where
    the partner is surer) in both branches' terms; ``relative_u`` does so for U's term only,
    ``relative_s`` for S's only."""
    half = torch.zeros(1, 1, H, W, dtype=torch.bool)
    half[..., W // 2:] = True
    terms = {}
    for gate in ("teacher", "relative", "relative_u", "relative_s"):
        cfg = Config()
        cfg.loss.scale_align = "off"
        cfg.loss.distill_gate = gate
        for name in ("S", "U"):
            torch.manual_seed(1)
            branch = build_branch(name, cfg).eval()
            prediction = branch(batch)
            prediction = replace(prediction, canonical_confidence=torch.full_like(prediction.canonical_confidence, 0.75))
            own = prediction.for_partner()
            confidence = torch.where(half, 1.0, 0.5).expand_as(own.confidence)
            partner = replace(own, depth=prediction.canonical_depth.detach() * 1.5, confidence=confidence)
            terms[gate, name] = branch.loss(batch, prediction, partner, 10_000)[1]["distill"].item()
    log15 = math.log(1.5)
    for name in ("S", "U"):
        assert terms["teacher", name] == pytest.approx(0.75 * log15, rel=1e-4)
        assert terms["relative", name] == pytest.approx(0.5 * log15, rel=1e-4)
    assert terms["relative_u", "S"] == pytest.approx(terms["teacher", "S"], rel=1e-6)
    assert terms["relative_u", "U"] == pytest.approx(terms["relative", "U"], rel=1e-6)
    assert terms["relative_s", "S"] == pytest.approx(terms["relative", "S"], rel=1e-6)
    assert terms["relative_s", "U"] == pytest.approx(terms["teacher", "U"], rel=1e-6)


def test_u_distill_pixels_reprojects_better_gates_us_term_by_u_s_own_frames() -> None:
    """u_distill_pixels=reprojects_better on a stereo pair with its exact baseline, weak (flipping)
    augmentation: U's depth is exact on the left half of the canonical image and 1.5x too far on
    the right, S's the other way round. U's term then keeps S's teaching mostly where S is right
    (a mean weight of ~1/2, below it if the flip into U's view were wrong); with ``all`` every pixel
    counts. S's term is untouched."""
    from distill_depth.models.depth_net import depth_to_disp

    stereo = synthetic_batch(4, 48, 96, stereo=True)
    left = torch.zeros_like(stereo.gt_depth, dtype=torch.bool)
    left[..., : left.shape[-1] // 2] = True
    u_canonical = torch.where(left, stereo.gt_depth, 1.5 * stereo.gt_depth)
    s_canonical = torch.where(left, 1.5 * stereo.gt_depth, stereo.gt_depth)
    terms = {}
    for pixels in ("all", "reprojects_better"):
        cfg = Config()
        cfg.data.u_sources = "stereo"
        cfg.loss.u_distill_pixels = pixels
        torch.manual_seed(3)
        branch = build_branch("U", cfg).train()
        for _ in range(20):  # the branch's own augmentation stream: draw until some samples are mirrored
            prediction = branch(stereo)
            view = prediction.extras["view"]
            if 0 < int(view.flipped.sum()) < 4:
                break
        assert 0 < int(view.flipped.sum()) < 4
        in_view, _ = view.to_canonical(u_canonical)  # a mirror is its own inverse
        disp = depth_to_disp(in_view, cfg.model.min_depth, cfg.model.max_depth)
        prediction.extras["disp"] = [disp] * len(prediction.extras["disp"])
        prediction = replace(prediction, canonical_depth=u_canonical,
                             canonical_valid=torch.ones_like(left))
        partner = replace(prediction.for_partner(), depth=s_canonical,
                          confidence=torch.ones_like(s_canonical), valid=torch.ones_like(left))
        terms[pixels] = branch.loss(stereo, prediction, partner, 10_000)[1]
    log15 = math.log(1.5)
    assert terms["all"]["distill"].item() == pytest.approx(log15, rel=1e-4)
    assert "hint_fraction" not in terms["all"]
    share = terms["reprojects_better"]["hint_fraction"].item()
    assert 0.4 < share < 0.7, share
    assert terms["reprojects_better"]["distill"].item() == pytest.approx(share * log15, rel=1e-4)
    # S has no photometric term: the option leaves its L_s<-u alone
    cfg = Config()
    cfg.loss.u_distill_pixels = "reprojects_better"
    cfg.loss.scale_align = "off"  # aligned, a factor 1.5 would vanish
    torch.manual_seed(3)
    s_branch = build_branch("S", cfg).eval()
    s_prediction = s_branch(stereo)
    s_partner = replace(s_prediction.for_partner(), depth=s_prediction.canonical_depth.detach() * 1.5,
                        confidence=torch.ones_like(s_prediction.canonical_confidence))
    assert s_branch.loss(stereo, s_prediction, s_partner, 10_000)[1]["distill"].item() == pytest.approx(log15, rel=1e-4)


def test_u_distill_confident_share_keeps_s_s_most_confident_pixels(batch: Batch) -> None:
    """u_distill_confident_share=0.25: U learns from S only on the quarter of each image where S's
    confidence is highest. S sends a depth 1.5x U's own everywhere; its confidence rises from left
    to right, so U's term is log 1.5 times the mean S confidence over the kept right-hand pixels,
    divided over all pixels (dropped pixels do not raise the kept ones' weight)."""
    terms = {}
    for share in (1.0, 0.25):
        cfg = Config()
        cfg.loss.u_distill_confident_share = share
        torch.manual_seed(0)
        branch = build_branch("U", cfg).eval()
        prediction = branch(batch)
        depth = prediction.canonical_depth.detach()
        ramp = torch.linspace(0.1, 0.9, depth.shape[-1]).expand_as(depth).contiguous()
        partner = replace(prediction.for_partner(), depth=depth * 1.5, confidence=ramp,
                          valid=torch.ones_like(depth, dtype=torch.bool))
        prediction = replace(prediction, canonical_valid=torch.ones_like(depth, dtype=torch.bool))
        terms[share] = branch.loss(batch, prediction, partner, 10_000)[1]["distill"].item()
    log15 = math.log(1.5)
    assert terms[1.0] == pytest.approx(log15 * ramp.mean().item(), rel=1e-4)
    kept = ramp >= ramp.flatten(1).sort(dim=1, descending=True).values[:, math.ceil(0.25 * ramp[0].numel()) - 1].view(-1, 1, 1, 1)
    assert 0.2 < kept.float().mean().item() < 0.3
    assert terms[0.25] == pytest.approx(log15 * (ramp * kept).sum().item() / ramp.numel(), rel=1e-4)


def test_diagnostic_teacher_ground_truth_replaces_the_partner(batch: Batch) -> None:
    """diagnostic_teacher=ground_truth: each branch's distillation term is the mean log error to the
    dense ground truth, whatever the partner sent; without ground truth it is an error."""
    cfg = Config()
    cfg.loss.diagnostic_teacher = "ground_truth"
    cfg.loss.scale_align = "off"
    for name in ("S", "U"):
        torch.manual_seed(0)
        branch = build_branch(name, cfg).eval()
        prediction = branch(batch)
        nonsense = replace(prediction.for_partner(), depth=torch.full_like(prediction.canonical_depth, 3.0))
        gt = batch.gt_depth
        defined = gt > 0
        expected = (prediction.canonical_depth.log() - gt.clamp(min=1e-6).log()).abs()[defined].mean().item()
        assert branch.loss(batch, prediction, nonsense, 10_000)[1]["distill"].item() == pytest.approx(expected, rel=1e-4)
        with pytest.raises(BranchError, match="gt.png"):
            branch.loss(replace(batch, gt_depth=None), prediction, nonsense, 10_000)
