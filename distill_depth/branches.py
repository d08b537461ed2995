"""The two branches of METHOD.md as self-contained modules: S (LiDAR) and U (video and/or stereo).

Each branch owns its augmenter and networks. ``forward`` runs every network whose parameters the
loss trains (the trainer wraps the branch in DDP and calls ``loss`` on the unwrapped module), and
``loss`` is computed in fp32 with autocast disabled. The other branch's prediction only ever
arrives detached (``PartnerPrediction``), so no gradient crosses between branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill_depth.augment import AugmentedView, build_augmenter
from distill_depth.config import Config
from distill_depth.geometry import pose_from_axis_angle, warp_to_target
from distill_depth.losses import (
    aligns_u_scale,
    distill,
    distill_ramp,
    identity_error,
    lidar_coverage,
    lidar_trust,
    photometric,
    point_filtering,
    self_confidence_nll,
    smoothness,
    split_held_out,
    sup_confidence_nll,
    upsample,
)
from distill_depth.losses.common import masked_mean
from distill_depth.losses.photometric import LARGE_ERROR
from distill_depth.losses.supervised import lidar_mask
from distill_depth.models import DepthNet, PoseNet
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
    sparse = batch.sparse_depth.float()
    if batch.labelled is None:
        return sparse
    return sparse.masked_fill(~batch.labelled.to(sparse.device).view(-1, 1, 1, 1), 0.0)


class BranchError(ValueError):
    """A batch or partner prediction does not fit what the branch needs; the message says what."""


class _Branch(nn.Module):
    """What both branches share: augmenter, DepthNet, canonical mapping, distillation, inference."""

    name: str
    distill_direction: str  # the value of ``loss.distill_direction`` that enables this branch's student term
    memory_format = torch.contiguous_format  # train.channels_last sets it with the weights (train/speed.py)

    def __init__(self, cfg: Config, strength: str) -> None:
        super().__init__()
        self.cfg = cfg
        self.augmenter = build_augmenter(strength, cfg.augment)
        self.depth_net = DepthNet(cfg.model)

    def _predict_depth(self, view: AugmentedView, batch: Batch) -> Prediction:
        disps, confs = self.depth_net(network_input(view.image, self.memory_format))
        depths = [self.depth_net.to_depth(d) for d in disps]
        confs = [c.float() for c in confs]
        canonical, valid = view.to_canonical(torch.cat([depths[0], confs[0]], dim=1))
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
            extras={"view": view, "disp": disps},
            teacher=teacher,
        )

    def _teaches_clean(self) -> bool:
        """``loss.teacher_view: clean`` and a partner branch in this run that learns from this one
        (a single-branch run, or a one-way run's teacher-less side, skips the extra pass)."""
        partner, partner_learns = PARTNER[self.name]
        loss = self.cfg.loss
        return (loss.teacher_view == "clean" and partner in self.cfg.branches
                and loss.distill_direction in ("both", partner_learns))

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
            disps, confs = self.depth_net(network_input(batch.image, self.memory_format))
        finally:
            for m, momentum, count in zip(norms, momenta, tracked):
                m.momentum = momentum
                if count is not None:
                    m.num_batches_tracked.copy_(count)
        return self.depth_net.to_depth(disps[0]).float(), confs[0].float()

    def _scaled_maps(self, prediction: Prediction, size: tuple[int, int]) -> list[tuple[Tensor, Tensor, Tensor]]:
        """Per scale: (disp, depth, confidence) upsampled to ``size`` in fp32 (disparity is the
        interpolated quantity, as in Monodepth2)."""
        maps = []
        for disp, conf in zip(prediction.extras["disp"], prediction.confidence):
            disp_full = upsample(disp.float(), size)
            maps.append((disp_full, self.depth_net.to_depth(disp_full), upsample(conf.float(), size)))
        return maps

    def _distill_term(
        self, prediction: Prediction, partner: PartnerPrediction | None, step: int, scale_align: bool,
        image_weight: Tensor | None = None, region: Tensor | None = None,
    ) -> tuple[Tensor, float]:
        """(L_student<-partner, its ramped weight); (0, 0) when alone or disabled by ``loss.distill_direction``."""
        zero = torch.zeros((), dtype=torch.float32, device=prediction.canonical_depth.device)
        direction = self.cfg.loss.distill_direction
        if partner is None or direction not in ("both", self.distill_direction):
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
        relative = gate == "relative" or (gate == "relative_u" and self.name == "U")
        term = distill(
            prediction.canonical_depth,
            partner.depth.to(device),
            partner.confidence.to(device),
            mask,
            scale_align=scale_align,
            student_confidence=prediction.canonical_confidence if relative else None,
            image_weight=image_weight,
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
        """``loss.distill_regions: by_coverage``: (B, 1, H, W) bool, the pixels inside (U's term)
        or outside (S's term) the LiDAR's reach of labelled images, every pixel of the others."""
        if self.cfg.loss.distill_regions != "by_coverage":
            return None
        covered, has_lidar = lidar_coverage(labelled_lidar(batch))
        region = covered if inside else ~covered
        return region | ~has_lidar.view(-1, 1, 1, 1)

    @torch.no_grad()
    def infer(self, image: Tensor) -> tuple[Tensor, Tensor]:
        """(B, 3, H, W) in [0, 1] → full-resolution depth (metres) and confidence, (B, 1, H, W) fp32.

        No augmentation; the network runs in eval mode (BatchNorm running statistics) and the
        previous train/eval mode is restored afterwards.
        """
        was_training = self.training
        self.eval()
        try:
            disps, confs = self.depth_net(network_input(image, self.memory_format))
            return self.depth_net.to_depth(disps[0]), confs[0].float()
        finally:
            self.train(was_training)


class SupervisedBranch(_Branch):
    """Branch S: depth + confidence from sparse LiDAR (L_sup' + λ_pf L_pf + λ_d L_s<-u), strong augmentation."""

    name = "S"
    distill_direction = "s_from_u"

    TRUST_MOMENTUM = 0.9

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.augment.s_strength)
        if cfg.loss.partner_trust == "lidar":
            # state only when the option is on: exports of runs without it load unchanged
            self.register_buffer("partner_trust", torch.ones(()))

    def _partner_trust(self, batch: Batch, prediction: Prediction, partner: PartnerPrediction | None,
                       align: bool) -> Tensor | None:
        """(B,) factor on L_s<-u (``loss.partner_trust: lidar``), or None. Labelled images get their
        own t; the others the batch's labelled mean, else the running mean, which is updated here."""
        if self.cfg.loss.partner_trust != "lidar" or partner is None:
            return None
        device = prediction.canonical_depth.device
        sparse = labelled_lidar(batch).to(device)
        mask = prediction.canonical_valid & partner.valid.to(device)
        trust, has_lidar = lidar_trust(prediction.canonical_depth, partner.depth.to(device), sparse, mask, align)
        if has_lidar.any():
            measured = trust[has_lidar].mean()
            if self.training:
                self.partner_trust.mul_(self.TRUST_MOMENTUM).add_((1 - self.TRUST_MOMENTUM) * measured)
            fill = measured
        else:
            fill = self.partner_trust
        return torch.where(has_lidar, trust, fill.to(trust.dtype))

    def forward(self, batch: Batch) -> Prediction:
        """Augment (train mode only), predict per scale, map full resolution back to the canonical frame."""
        return self._predict_depth(self.augmenter(batch), batch)

    @staticmethod
    def _labelled(batch: Batch, sparse: Tensor) -> Tensor:
        """(B,) bool: samples whose LiDAR supervises S (all of them when the batch does not say)."""
        if batch.labelled is None:
            return torch.ones(sparse.shape[0], dtype=torch.bool, device=sparse.device)
        return batch.labelled.to(sparse.device)

    def loss(
        self, batch: Batch, prediction: Prediction, partner: PartnerPrediction | None, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_S = mean_s L_sup'(s) + λ_pf · mean_s L_pf(s) + w_d(step) · L_s<-u.

        L_sup' and L_pf are multi-scale (each scale's disparity and confidence upsampled to full
        resolution, averaged over scales); the held-out pixels are drawn once per step. L_s<-u is
        full-resolution only, in the canonical frame.
        """
        view: AugmentedView = prediction.extras["view"]
        partner = self._diagnostic_partner(batch, partner)
        device_type = view.sparse_depth.device.type
        with torch.autocast(device_type=device_type, enabled=False):
            loss_cfg = self.cfg.loss
            labelled = self._labelled(batch, view.sparse_depth)
            per_pixel = labelled.view(-1, 1, 1, 1)
            # an unlabelled sample's LiDAR (if a caller left any) is no supervision: L_sup' and the
            # held-out L_pf then skip it by construction; the prior variant acts on pixels *without*
            # LiDAR, so it is told which samples count
            sparse = view.sparse_depth.float().masked_fill(~per_pixel, 0.0)
            lidar = lidar_mask(sparse)
            fit, held = split_held_out(lidar, loss_cfg.pf_fraction if loss_cfg.point_filtering == "held_out" else 0.0)
            image_valid = per_pixel.expand_as(lidar)
            sup_terms, pf_terms = [], []
            for _, depth, conf in self._scaled_maps(prediction, tuple(sparse.shape[-2:])):
                sup_terms.append(sup_confidence_nll(depth, conf, sparse, fit, loss_cfg.tau_s, loss_cfg.rho))
                pf_terms.append(
                    point_filtering(
                        loss_cfg.point_filtering, depth, conf, sparse, held, loss_cfg.tau_s,
                        loss_cfg.pf_fraction, loss_cfg.rho, image_valid,
                    )
                )
            sup = torch.stack(sup_terms).mean()
            pf = torch.stack(pf_terms).mean()
            align = aligns_u_scale(loss_cfg.scale_align, self.cfg.data.uses_stereo)
            trust = self._partner_trust(batch, prediction, partner, align)
            distill_term, weight = self._distill_term(
                prediction, partner, step, align, self._image_weight(batch, trust),
                region=self._distill_region(batch, inside=False),
            )
            total = sup + loss_cfg.lambda_pf * pf + weight * distill_term
            conf0 = prediction.confidence[0].float()
            terms = {
                "sup_nll": sup,
                "pf": pf,
                "distill": distill_term,
                "distill_weight": torch.tensor(weight, device=total.device),
                "conf_mean": conf0.mean(),
                "conf_lidar_mean": masked_mean(conf0, lidar),
                "lidar_fraction": lidar.float().mean(),
                "labelled_share": labelled.float().mean(),
            }
            if trust is not None:
                terms["partner_trust"] = trust.mean()
        return total, {k: v.detach().float() for k, v in terms.items()}


class SelfSupervisedBranch(_Branch):
    """Branch U: depth + confidence by photometric reprojection from the sources ``data.u_sources``
    names (video t±1, the stereo partner, or both; L_self + λ_d L_u<-s), weak augmentation. Owns
    the pose network, which exists only when a temporal source is used."""

    name = "U"
    distill_direction = "u_from_s"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.augment.u_strength)
        # Stereo-only U never builds the pose net: nothing of it can run, train or sit in the optimiser.
        self.pose_net = PoseNet(cfg.model) if cfg.data.uses_temporal else None

    def _source_names(self, view: AugmentedView) -> list[str]:
        names: list[str] = []
        u_sources = self.cfg.data.u_sources
        if self.cfg.data.uses_temporal:
            names = [n for n in TEMPORAL_SOURCES if n in view.sources]
            if not names:
                raise BranchError(
                    f"data.u_sources={u_sources} needs source frames {TEMPORAL_SOURCES}; the batch has {sorted(view.sources)}"
                )
        if self.cfg.data.uses_stereo:
            if "stereo" not in view.clean_sources or view.stereo_T is None:
                raise BranchError(
                    f"data.u_sources={u_sources} needs the 'stereo' source and stereo_T "
                    "(shards made with make-shards --stereo); the batch has none"
                )
            names.append("stereo")
        return names

    def forward(self, batch: Batch) -> Prediction:
        """Augment, predict depth per scale, and run the pose net for every temporal source
        (T_target_to_source; the stereo source uses the known, flip-adjusted ``view.stereo_T``)."""
        view = self.augmenter(batch)
        prediction = self._predict_depth(view, batch)
        poses: dict[str, Tensor] = {}
        for name in self._source_names(view):
            if name == "stereo":
                poses[name] = view.stereo_T.float()
            else:
                axis_angle, translation = self.pose_net(network_input(view.image, self.memory_format),
                                                          network_input(view.sources[name], self.memory_format))
                poses[name] = pose_from_axis_angle(axis_angle.float(), translation.float())
        prediction.extras["poses"] = poses
        return prediction

    def loss(
        self, batch: Batch, prediction: Prediction, partner: PartnerPrediction | None, step: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """L_U = mean_s L_self(s) + λ_sm · mean_s L_smooth(s) / 2^s + w_d(step) · L_u<-s.

        Photometric NLL: multi-scale, each scale's disparity upsampled to full resolution, sources
        warped with full-resolution K and the un-jittered images. Smoothness: Monodepth2's way, on
        each scale's own disparity against the image resized to it, weight 1/2^s. L_u<-s:
        full-resolution canonical frame, no scale alignment (U learns S's metric scale).
        """
        view: AugmentedView = prediction.extras["view"]
        partner = self._diagnostic_partner(batch, partner)
        poses: dict[str, Tensor] = prediction.extras["poses"]
        if view.K is None:
            raise BranchError(
                "branch U needs the intrinsics of its augmented view, but the augmentation made K invalid "
                f"(augment.u_strength={self.cfg.augment.u_strength!r}; rotation breaks the pinhole model)"
            )
        loss_cfg = self.cfg.loss
        with torch.autocast(device_type=view.image.device.type, enabled=False):
            target = view.clean_image.float()
            K = view.K.float()
            size = tuple(target.shape[-2:])
            sources = [view.clean_sources[n].float() for n in poses]
            # the un-warped error depends on neither depth nor pose: once per batch, not per scale
            identity = identity_error(target, sources, loss_cfg.ssim_alpha) if loss_cfg.automask else None
            photo_terms, smooth_terms = [], []
            # under a depth-scaling zoom (augment.u_strength=strong) the network predicts the
            # zoomed scene's equivalent depth D/m; the zoomed K warps with the true depth D
            to_true = None if view.depth_to_canonical is None else view.depth_to_canonical.view(-1, 1, 1, 1)
            for scale, (disp, depth, conf) in enumerate(self._scaled_maps(prediction, size)):
                depth = depth if to_true is None else depth * to_true
                warped, valid = zip(*(warp_to_target(src, depth, poses[n], K) for n, src in zip(poses, sources)))
                pe_min, mask, unmasked = photometric(
                    target, list(warped), list(valid), alpha=loss_cfg.ssim_alpha, identity=identity, return_unmasked=True
                )
                if loss_cfg.u_confidence_pixels == "all":
                    # depth still learns on the kept pixels only; the confidence also on the dropped ones
                    error = torch.where(mask, pe_min, unmasked.detach())
                    photo_terms.append(self_confidence_nll(error, conf, unmasked < LARGE_ERROR, loss_cfg.tau_u))
                else:
                    photo_terms.append(self_confidence_nll(pe_min, conf, mask, loss_cfg.tau_u))
                native = prediction.extras["disp"][scale].float()
                image_s = F.interpolate(target, size=native.shape[-2:], mode="area") if scale else target
                smooth_terms.append(smoothness(native, image_s) / 2**scale)
                if scale == 0:  # the logged diagnostics are full-resolution only
                    pe_mean, mask_fraction = masked_mean(pe_min, mask).detach(), mask.float().mean()
            photo = torch.stack(photo_terms).mean()
            smooth = torch.stack(smooth_terms).mean()
            distill_term, weight = self._distill_term(
                prediction, partner, step, scale_align=False, image_weight=self._image_weight(batch),
                region=self._distill_region(batch, inside=True),
            )
            total = photo + loss_cfg.lambda_smooth * smooth + weight * distill_term
            translations = [T[:, :3, 3].norm(dim=1).mean() for n, T in poses.items() if n != "stereo"]
            terms = {
                "photo_nll": photo,
                "smooth": smooth,
                "distill": distill_term,
                # a fill kernel, not a host-to-device copy: nothing in the step waits for the device
                "distill_weight": torch.full((), weight, device=total.device),
                "pe": pe_mean,
                "automask_fraction": mask_fraction,
                "conf_mean": prediction.confidence[0].float().mean(),
                "pose_translation": torch.stack(translations).mean() if translations else torch.zeros((), device=total.device),
            }
        return total, {k: v.detach().float() for k, v in terms.items()}


def build_branch(name: str, cfg: Config) -> nn.Module:
    """``"S"`` → :class:`SupervisedBranch`, ``"U"`` → :class:`SelfSupervisedBranch`."""
    if name == "S":
        return SupervisedBranch(cfg)
    if name == "U":
        return SelfSupervisedBranch(cfg)
    raise BranchError(f"branch name must be 'S' or 'U', got {name!r}")
