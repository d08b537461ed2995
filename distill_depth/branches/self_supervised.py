"""Branch U (METHOD.md, "Branch U"): depth and confidence by photometric reprojection, weak augmentation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from distill_depth.augment import AugmentedView
from distill_depth.branches.base import TEMPORAL_SOURCES, BranchBase, BranchError, network_input, view_lidar
from distill_depth.config import Config
from distill_depth.geometry import pose_from_axis_angle, warp_to_target
from distill_depth.losses import (
    aligns_u_scale,
    identity_error,
    lidar_confidence_nll,
    most_confident,
    photometric,
    reprojects_better,
    self_confidence_nll,
    smoothness,
)
from distill_depth.losses.common import masked_mean
from distill_depth.losses.photometric import LARGE_ERROR
from distill_depth.models import ErrorConfidenceNet, PoseNet
from distill_depth.types import Batch, PartnerPrediction, Prediction


class SelfSupervisedBranch(BranchBase):
    """Branch U: depth + confidence by photometric reprojection from the sources ``data.u_sources``
    names (video t±1, the stereo partner, or both; L_self + λ_d L_u<-s), weak augmentation. Owns
    the pose network, which exists only when a temporal source is used."""

    name = "U"
    distill_direction = "u_from_s"
    # The element-wise loss functions of the step, called through ``self`` so that ``train.compile``
    # (``speed.compile_losses``) can swap in fused, compiled versions of exactly these.
    loss_kernels = ("photometric", "identity_error", "self_confidence_nll", "smoothness")
    photometric = staticmethod(photometric)
    identity_error = staticmethod(identity_error)
    self_confidence_nll = staticmethod(self_confidence_nll)
    smoothness = staticmethod(smoothness)

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg, cfg.augment.u_strength)
        # Stereo-only U never builds the pose net: nothing of it can run, train or sit in the optimiser.
        self.pose_net = PoseNet(cfg.model) if cfg.data.uses_temporal else None
        if cfg.loss.u_confidence_target == "lidar":
            # built last: the depth and pose nets start from the same weights as without it
            self.error_confidence = ErrorConfidenceNet()

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

    @staticmethod
    def _where_partner_reprojects_better(
        view: AugmentedView, partner: PartnerPrediction, own_error: Tensor, own_kept: Tensor,
        target: Tensor, sources: list[Tensor], poses: list[Tensor], K: Tensor,
    ) -> Tensor:
        """``loss.u_distill_pixels: reprojects_better``: (B, 1, H, W) bool in the canonical frame,
        the pixels where S's depth explains U's frames better than U's own (``losses.reprojects_better``)."""
        if view.canonical_to_aug is not None or view.depth_to_canonical is not None:
            raise BranchError(
                "loss.u_distill_pixels=reprojects_better warps S's depth into U's augmented view, which "
                "needs a flip-only view (augment.u_strength: weak); this view crops, zooms or rotates"
            )
        # a flip-only view is its own inverse: to_canonical also maps canonical maps into the view
        teacher, _ = view.to_canonical(partner.depth.to(target.device).float())
        teacher_valid, _ = view.to_canonical(partner.valid.to(target.device))
        teacher = torch.where(teacher_valid, teacher, torch.zeros_like(teacher))
        better = reprojects_better(teacher, own_error, own_kept, target, sources, poses, K)
        return view.to_canonical(better)[0]

    def _error_confidence_term(self, batch: Batch, prediction: Prediction) -> Tensor | None:
        """L_conf of ``loss.u_confidence_target: lidar`` (``losses.lidar_confidence_nll``), or None.

        In U's own view: its LiDAR and the network's full-resolution depth (before a zoom's depth
        factor, like S's: both hold the zoomed scene's equivalent), median-aligned when U has no
        metric scale of its own."""
        if self.error_confidence is None:
            return None
        loss_cfg = self.cfg.loss
        sparse, _ = view_lidar(batch, prediction.extras["view"])
        align = aligns_u_scale(loss_cfg.scale_align, self.cfg.data.uses_stereo)
        return lidar_confidence_nll(prediction.depth[0].float(), prediction.extras["shown_confidence"], sparse,
                                    loss_cfg.tau_s, loss_cfg.rho, align_scale=align)

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
        full-resolution canonical frame, no scale alignment (U learns S's metric scale). Under
        ``loss.u_confidence_target: lidar``, + L_conf: the ``ErrorConfidenceNet``'s confidence
        against U's full-resolution LiDAR error on labelled samples (its inputs are detached: U's
        depth never learns from the LiDAR).
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
            identity = self.identity_error(target, sources, loss_cfg.ssim_alpha) if loss_cfg.automask else None
            photo_terms, smooth_terms = [], []
            # under a depth-scaling zoom (augment.u_strength=strong) the network predicts the
            # zoomed scene's equivalent depth D/m; the zoomed K warps with the true depth D
            to_true = None if view.depth_to_canonical is None else view.depth_to_canonical.view(-1, 1, 1, 1)
            for scale, (disp, depth, conf) in enumerate(self._scaled_maps(prediction, size)):
                depth = depth if to_true is None else depth * to_true
                warped, valid = zip(*(warp_to_target(src, depth, poses[n], K) for n, src in zip(poses, sources)))
                pe_min, mask, unmasked = self.photometric(
                    target, list(warped), list(valid), alpha=loss_cfg.ssim_alpha, identity=identity, return_unmasked=True
                )
                if loss_cfg.u_confidence_pixels == "all":
                    # depth still learns on the kept pixels only; the confidence also on the dropped ones
                    error = torch.where(mask, pe_min, unmasked.detach())
                    photo_terms.append(self.self_confidence_nll(error, conf, unmasked < LARGE_ERROR, loss_cfg.tau_u))
                else:
                    photo_terms.append(self.self_confidence_nll(pe_min, conf, mask, loss_cfg.tau_u))
                native = prediction.extras["disp"][scale].float()
                image_s = F.interpolate(target, size=native.shape[-2:], mode="area") if scale else target
                smooth_terms.append(self.smoothness(native, image_s) / 2**scale)
                if scale == 0:  # the logged diagnostics are full-resolution only
                    pe_mean, mask_fraction = masked_mean(pe_min, mask).detach(), mask.float().mean()
                    own_error, own_kept = unmasked.detach(), mask
            photo = torch.stack(photo_terms).mean()
            smooth = torch.stack(smooth_terms).mean()
            hinted = None
            if loss_cfg.u_distill_pixels == "reprojects_better" and self._learns_from(partner):
                hinted = self._where_partner_reprojects_better(
                    view, partner, own_error, own_kept, target, sources, list(poses.values()), K
                )
            share = loss_cfg.u_distill_confident_share
            if share < 1.0 and self._learns_from(partner):
                confident = most_confident(partner.confidence, partner.valid, share).to(prediction.canonical_depth.device)
                hinted = confident if hinted is None else hinted & confident
            distill_term, weight = self._distill_term(
                prediction, partner, step, scale_align=False, image_weight=self._image_weight(batch),
                region=self._distill_region(batch, inside=True), keep=hinted,
            )
            total = photo + loss_cfg.lambda_smooth * smooth + weight * distill_term
            lidar_conf = self._error_confidence_term(batch, prediction)
            if lidar_conf is not None:
                total = total + lidar_conf
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
            if lidar_conf is not None:
                terms["lidar_conf_nll"] = lidar_conf
                terms["shown_conf_mean"] = prediction.extras["shown_confidence"].mean()
            if loss_cfg.u_distill_pixels == "reprojects_better":
                # the share of the compared pixels where U learns from S
                terms["hint_fraction"] = (
                    masked_mean(hinted.float(), prediction.canonical_valid & partner.valid.to(total.device))
                    if hinted is not None else torch.zeros((), device=total.device)
                )
        return total, {k: v.detach().float() for k, v in terms.items()}
