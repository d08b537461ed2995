"""Branch S (METHOD.md, "Branch S"): depth and confidence from sparse LiDAR, strong augmentation."""

from __future__ import annotations

import torch
from torch import Tensor

from distill_depth.augment import AugmentedView
from distill_depth.branches.base import BranchBase, labelled_lidar, view_lidar
from distill_depth.config import Config
from distill_depth.losses import aligns_u_scale, lidar_trust, point_filtering, split_held_out, sup_confidence_nll
from distill_depth.losses.common import masked_mean
from distill_depth.losses.supervised import lidar_mask
from distill_depth.types import Batch, PartnerPrediction, Prediction


class SupervisedBranch(BranchBase):
    """Branch S: depth + confidence from sparse LiDAR (L_sup' + λ_pf L_pf + λ_d L_s<-u), strong augmentation."""

    name = "S"
    distill_direction = "s_from_u"
    # called through ``self`` so that ``train.compile`` can swap in compiled versions (train/speed.py)
    loss_kernels = ("sup_confidence_nll", "point_filtering")
    sup_confidence_nll = staticmethod(sup_confidence_nll)
    point_filtering = staticmethod(point_filtering)

    TRUST_MOMENTUM = 0.9
    run_state_keys = (*BranchBase.run_state_keys, "partner_trust")

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
            # L_sup' and the held-out L_pf skip unlabelled samples by construction (no LiDAR left);
            # the prior variant acts on pixels *without* LiDAR, so it is told which samples count
            sparse, labelled = view_lidar(batch, view)
            per_pixel = labelled.view(-1, 1, 1, 1)
            lidar = lidar_mask(sparse)
            fit, held = split_held_out(lidar, loss_cfg.pf_fraction if loss_cfg.point_filtering == "held_out" else 0.0)
            image_valid = per_pixel.expand_as(lidar)
            sup_terms, pf_terms = [], []
            for _, depth, conf in self._scaled_maps(prediction, tuple(sparse.shape[-2:])):
                sup_terms.append(self.sup_confidence_nll(depth, conf, sparse, fit, loss_cfg.tau_s, loss_cfg.rho))
                pf_terms.append(
                    self.point_filtering(
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
