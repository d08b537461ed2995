"""What both branches share: the augmenter, the DepthNet, the map back to the canonical frame,
the distillation term, inference; and the rules every branch applies to a batch.

Each branch owns its augmenter and networks. ``forward`` runs every network whose parameters the
loss trains (the trainer wraps the branch in DDP and calls ``loss`` on the unwrapped module), and
``loss`` is computed in fp32 with autocast disabled. The other branch's prediction only ever
arrives detached (``PartnerPrediction``), so no gradient crosses between branches.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_depth.augment import AugmentedView, build_augmenter
from distill_depth.config import Config
from distill_depth.losses import distill, distill_ramp, lidar_coverage, upsample
from distill_depth.models import DepthNet, ErrorConfidenceNet
from distill_depth.types import Batch, PartnerPrediction, Prediction

TEMPORAL_SOURCES = ("prev", "next")
PARTNER = {"S": ("U", "u_from_s"), "U": ("S", "s_from_u")}
"""Branch → (its partner, the ``loss.distill_direction`` value under which the partner learns from it)."""


def network_input(image: Tensor, memory_format: torch.memory_format = torch.contiguous_format) -> Tensor:
    """Non-finite pixels → 0 before a network sees them: one bad pixel would otherwise turn every
    output (and gradient) of the convolution stack into NaN. The losses mask those pixels out.
    ``memory_format``: the networks' layout (``train.channels_last``), so no conv converts its input."""
    return torch.nan_to_num(image, nan=0.0, posinf=0.0, neginf=0.0).contiguous(memory_format=memory_format)


def labelled_lidar(batch: Batch) -> Tensor:
    """(B, 1, H, W) fp32: the batch's canonical-frame LiDAR, zero on samples outside the labelled
    subset (``Batch.labelled``); what the partner-side rules (trust, coverage) may read."""
    return keep_labelled(batch, batch.sparse_depth)[0]


def view_lidar(batch: Batch, view: AugmentedView) -> tuple[Tensor, Tensor]:
    """(sparse, labelled): the augmented view's LiDAR, as :func:`keep_labelled` leaves it."""
    return keep_labelled(batch, view.sparse_depth)


def keep_labelled(batch: Batch, sparse_depth: Tensor) -> tuple[Tensor, Tensor]:
    """(sparse, labelled): ``sparse_depth`` (B, 1, H, W) as fp32, zero on samples outside the
    labelled subset, and that subset (B,) bool (every sample when the batch does not say). An
    unlabelled sample's LiDAR, if a caller left any, is no supervision."""
    sparse = sparse_depth.float()
    if batch.labelled is None:
        labelled = torch.ones(sparse.shape[0], dtype=torch.bool, device=sparse.device)
    else:
        labelled = batch.labelled.to(sparse.device)
    return sparse.masked_fill(~labelled.view(-1, 1, 1, 1), 0.0), labelled


def lidar_rows(sparse_depth: Tensor) -> Tensor:
    """(B, 2): per image, the median over columns with a return of the column's top and bottom
    return row, as fractions of the height (a sensor property: the beams' elevation range).
    sparse_depth (B, 1, H, W) with at least one return per image."""
    hit = torch.isfinite(sparse_depth) & (sparse_depth > 0)
    height = hit.shape[-2]
    rows = torch.arange(height, device=hit.device).view(1, 1, -1, 1).float()
    top = torch.where(hit, rows, math.inf).amin(dim=-2).flatten(1)
    bottom = torch.where(hit, rows, -math.inf).amax(dim=-2).flatten(1)
    out = []
    for t, b in zip(top, bottom):
        columns = torch.isfinite(t)
        out.append(torch.stack([t[columns].median(), b[columns].median()]))
    return torch.stack(out) / (height - 1)


def sensor_band(reach: Tensor, height: int, device: torch.device) -> Tensor:
    """(1, 1, height, 1) bool: the rows between the (top, bottom) fractions of ``reach``."""
    rows = torch.arange(height, device=device).view(1, 1, -1, 1) / (height - 1)
    reach = reach.to(device)
    return (rows >= reach[0]) & (rows <= reach[1])


class BranchError(ValueError):
    """A batch or partner prediction does not fit what the branch needs; the message says what."""


class BranchBase(nn.Module):
    """What both branches share: augmenter, DepthNet, canonical mapping, distillation, inference."""

    name: str
    distill_direction: str  # the value of ``loss.distill_direction`` that enables this branch's student term
    memory_format = torch.contiguous_format  # train.channels_last sets it with the weights (train/speed.py)
    loss_kernels: tuple[str, ...] = ()  # names of loss functions held as attributes, compiled by train.compile
    # buffers that are state of one training run, not learnt weights: saved for exact resume, but a
    # new run that starts from these weights (train.init_s / init_u) starts them afresh
    run_state_keys: tuple[str, ...] = ("lidar_reach",)
    REACH_MOMENTUM = 0.9

    def __init__(self, cfg: Config, strength: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.augmenter = build_augmenter(strength, cfg.augment)
        self.depth_net = DepthNet(cfg.model)
        # the confidence this branch shows its partner, evaluation and predict, when it is not the
        # depth net's own (U under loss.u_confidence_target: lidar)
        self.error_confidence: ErrorConfidenceNet | None = None
        if cfg.loss.distill_regions == "by_sensor_coverage":
            # (top, bottom) row of the LiDAR's reach as fractions of the height; NaN until a labelled
            # image is seen. State only when the option is on: other runs' exports load unchanged
            self.register_buffer("lidar_reach", torch.full((2,), float("nan")))

    def _shown_confidence(self, image: Tensor, disparity: Tensor, confidence: Tensor) -> Tensor:
        """(B, 1, H, W) fp32: the confidence this branch shows outside its own loss (partner,
        evaluation, predict): the depth net's full-resolution confidence, or the
        ``ErrorConfidenceNet``'s when the branch has one."""
        if self.error_confidence is None:
            return confidence.float()
        return self.error_confidence(image, disparity, confidence).float()

    def _predict_depth(self, view: AugmentedView, batch: Batch) -> Prediction:
        image = network_input(view.image, self.memory_format)
        disps, confs = self.depth_net(image)
        depths = [self.depth_net.to_depth(d) for d in disps]
        confs = [c.float() for c in confs]
        shown = self._shown_confidence(image, disps[0], confs[0])
        canonical, valid = view.to_canonical(torch.cat([depths[0], shown], dim=1))
        canonical_depth = canonical[:, :1]
        if view.depth_to_canonical is not None:
            canonical_depth = canonical_depth * view.depth_to_canonical.view(-1, 1, 1, 1)
        teacher = self._clean_teacher(batch) if self.training and self._teaches_clean() else None
        return Prediction(
            depth=depths,
            confidence=confs,
            canonical_depth=canonical_depth,
            canonical_confidence=canonical[:, 1:2],
            canonical_valid=valid,
            keys=list(batch.keys),
            extras={"view": view, "disp": disps, "shown_confidence": shown},
            teacher=teacher,
        )

    def _teaches_clean(self) -> bool:
        """``loss.teacher_view: clean`` (or ``clean_if_strong`` on a strongly augmented branch) and a
        partner branch in this run that learns from this one (a single-branch run, or a one-way
        run's teacher-less side, skips the extra pass)."""
        partner, partner_learns = PARTNER[self.name]
        loss = self.cfg.loss
        clean = loss.teacher_view == "clean" or (loss.teacher_view == "clean_if_strong" and self.augmenter.strength == "strong")
        return clean and partner in self.cfg.branches and loss.distill_direction in ("both", partner_learns)

    @torch.no_grad()
    def _clean_teacher(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """(depth, confidence) (B, 1, H, W) on the un-augmented image, for ``loss.teacher_view: clean``.

        Train-mode BatchNorm (the batch's own statistics, as in the student pass) with the running
        statistics left as they are: the extra pass must not change what evaluation sees.
        """
        norms = [m for m in self.depth_net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in norms]
        tracked = [None if m.num_batches_tracked is None else m.num_batches_tracked.clone() for m in norms]
        try:
            for m in norms:
                m.momentum = 0.0
            image = network_input(batch.image, self.memory_format)
            disps, confs = self.depth_net(image)
        finally:
            for m, momentum, count in zip(norms, momenta, tracked):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        return self.depth_net.to_depth(disps[0]).float(), self._shown_confidence(image, disps[0], confs[0])

    def _scaled_maps(self, prediction: Prediction, size: tuple[int, int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per scale: (disp, depth, confidence) upsampled to ``size`` in fp32 (disparity is the
        interpolated quantity, as in Monodepth2)."""
        maps = []
        for disp, conf in zip(prediction.extras["disp"], prediction.confidence):
            disp_full = upsample(disp.float(), size)
            maps.append((disp_full, self.depth_net.to_depth(disp_full), upsample(conf.float(), size)))
        return maps

    def _learns_from(self, partner: PartnerPrediction | None) -> bool:
        """Whether this branch's student term is on: a partner sent a prediction and
        ``loss.distill_direction`` enables this direction."""
        return partner is not None and self.cfg.loss.distill_direction in ("both", self.distill_direction)

    def _distill_term(
        self, prediction: Prediction, partner: PartnerPrediction | None, step: int, scale_align: bool,
        image_weight: Tensor | None = None, region: Tensor | None = None, keep: Tensor | None = None,
    ) -> tuple[Tensor, float]:
        """(L_student<-partner, its ramped weight); (0, 0) when alone or disabled by ``loss.distill_direction``."""
        zero = torch.zeros((), dtype=torch.float32, device=prediction.canonical_depth.device)
        if not self._learns_from(partner):
            return zero, 0.0
        if list(partner.keys) != list(prediction.keys):
            raise BranchError(
                f"branch {self.name}: partner prediction is for samples {partner.keys[:3]}..., "
                f"this batch is {prediction.keys[:3]}... (the two branches must see the same samples in order)"
            )
        device = prediction.canonical_depth.device
        mask = prediction.canonical_valid & partner.valid.to(device)
        if region is not None:
            mask = mask & region.to(device)
        gate = self.cfg.loss.distill_gate
        relative = gate in ("relative", f"relative_{self.name.lower()}")
        term = distill(
            prediction.canonical_depth,
            partner.depth.to(device),
            partner.confidence.to(device),
            mask,
            scale_align=scale_align,
            student_confidence=prediction.canonical_confidence if relative else None,
            image_weight=image_weight,
            keep=None if keep is None else keep.to(device),
        )
        loss_cfg = self.cfg.loss
        weight = distill_ramp(step, self.cfg.train.max_steps, loss_cfg.lambda_distill, loss_cfg.distill_warmup,
                              loss_cfg.distill_start)
        return term, weight

    def _diagnostic_partner(self, batch: Batch, partner: PartnerPrediction | None) -> PartnerPrediction | None:
        """``loss.diagnostic_teacher: ground_truth``: the partner's depth becomes the dense ground truth."""
        if self.cfg.loss.diagnostic_teacher == "none" or partner is None:
            return partner
        if batch.gt_depth is None:
            raise BranchError("loss.diagnostic_teacher=ground_truth needs dense ground truth (gt.png) in the training shards")
        gt = batch.gt_depth.float().to(partner.depth.device)
        if gt.shape[-2:] != partner.depth.shape[-2:]:
            gt = F.interpolate(gt, size=partner.depth.shape[-2:], mode="nearest")
        defined = gt > 0
        return PartnerPrediction(gt, defined.float(), partner.valid & defined, partner.keys)

    def _image_weight(self, batch: Batch, trust: Tensor | None = None) -> Tensor | None:
        """(B,) factor on this branch's distillation term per image: ``trust`` (S's partner trust)
        times ``loss.unlabelled_gain_<direction>`` on unlabelled samples; None when both are neutral."""
        gain = getattr(self.cfg.loss, f"unlabelled_gain_{self.distill_direction}")
        if gain == 1.0 or batch.labelled is None:
            return trust
        labelled = batch.labelled.to(batch.image.device)
        per_image = torch.where(labelled, 1.0, gain).float()
        return per_image if trust is None else trust * per_image.to(trust.device)

    def _distill_region(self, batch: Batch, inside: bool) -> Tensor | None:
        """``loss.distill_regions``: (B, 1, H, W) bool, the pixels inside (U's term) or outside (S's
        term) the LiDAR's reach; None for ``everywhere``. A labelled image's reach is its own
        (``by_coverage`` and ``by_sensor_coverage``); an unlabelled image keeps every pixel under
        ``by_coverage`` and gets the sensor's reach under ``by_sensor_coverage`` (every pixel until a
        labelled image has shown it)."""
        mode = self.cfg.loss.distill_regions
        if mode == "everywhere":
            return None
        sparse = labelled_lidar(batch)
        covered, has_lidar = lidar_coverage(sparse)
        known = has_lidar
        if mode == "by_sensor_coverage":
            reach = self._sensor_reach(sparse, has_lidar)
            if torch.isfinite(reach).all():
                band = sensor_band(reach, covered.shape[-2], covered.device)
                covered = torch.where(has_lidar.view(-1, 1, 1, 1), covered, band)
                known = torch.ones_like(has_lidar)
        region = covered if inside else ~covered
        return region | ~known.view(-1, 1, 1, 1)

    @torch.no_grad()
    def _sensor_reach(self, sparse: Tensor, has_lidar: Tensor) -> Tensor:
        """(2,) the LiDAR's (top, bottom) reach, fractions of the height: in training, a running mean
        (momentum ``REACH_MOMENTUM``) of each labelled image's :func:`lidar_rows`; the first
        measurement is taken as it is."""
        if self.training and has_lidar.any():
            measured = lidar_rows(sparse[has_lidar.to(sparse.device)]).mean(dim=0).to(self.lidar_reach)
            if torch.isfinite(self.lidar_reach).all():
                self.lidar_reach.mul_(self.REACH_MOMENTUM).add_((1 - self.REACH_MOMENTUM) * measured)
            else:
                self.lidar_reach.copy_(measured)
        return self.lidar_reach

    @torch.no_grad()
    def infer(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] → full-resolution depth (metres) and confidence, (B, 1, H, W) fp32.

        No augmentation; the network runs in eval mode (BatchNorm running statistics) and the
        previous train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            image = network_input(image, self.memory_format)
            disps, confs = self.depth_net(image)
            return self.depth_net.to_depth(disps[0]), self._shown_confidence(image, disps[0], confs[0])
        finally:
            self.train(was_training)
