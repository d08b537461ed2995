"""The experiment configuration's schema: one typed dataclass per section, a docstring per field.

The field docstrings are the reference of every key (``scripts/gen_config_docs.py`` writes
docs/configuration.md from them); reading YAML files and overrides into these is
``distill_depth.config.loading``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLED_SHARDS = REPO_ROOT / "shards"


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and the value."""


@dataclass
class DataConfig:
    train_shards: str = str(BUNDLED_SHARDS / "train")
    """Training shards: a folder with ``manifest.json``, a brace pattern of tars, or a single tar."""
    val_shards: str | None = str(BUNDLED_SHARDS / "val")
    """Validation shards (same forms as ``train_shards``); ``None`` disables validation."""
    batch_size: int = 4
    """Samples per U rank per micro-step (``train.grad_accum`` of them make one optimiser step). An S
    rank of a cell with r U ranks sees r·batch_size."""
    num_workers: int = 1
    """DataLoader worker processes per rank (0 decodes in the training process)."""
    shuffle_buffer: int = 64
    """Sample-level shuffle buffer after the per-epoch seeded shard shuffle."""
    samples_per_epoch: int | None = None
    """Samples per epoch across all cells; ``None`` takes the manifest's count."""
    u_sources: Literal["temporal", "stereo", "temporal+stereo"] = "temporal"
    """Source frames of branch U's photometric loss, the rows of the paper's table: ``temporal``
    (M: frames t-1, t+1, poses from the pose network), ``stereo`` (S: the stereo partner only,
    metric from the known baseline; the pose network is not built) or ``temporal+stereo`` (MS).
    Any stereo mode needs shards made with ``make-shards --stereo`` and makes U metric (no median
    alignment under ``loss.scale_align: auto`` or median scaling ``auto``). Replaces the deprecated
    ``data.use_stereo`` (true → ``temporal+stereo``, false → ``temporal``)."""
    labelled_fraction: float = 1.0
    """Share of training samples that keep their LiDAR (the semi-supervised regime): a sample is
    labelled when a hash of ``(label_seed, key)`` falls below it, so the subset is identical on every
    rank, after resume and for any world size. The others train S only through L_s<-u. Samples
    already unlabelled in the shards (``make-shards --keep-unlabelled``) stay unlabelled.
    Validation and evaluation always read every label. Logged as ``S/labelled_share``."""
    label_seed: int = 0
    """Seed of the labelled subset (another seed, another subset of the same size)."""

    @property
    def uses_stereo(self) -> bool:
        """U warps the stereo partner (metric scale from the baseline)."""
        return "stereo" in self.u_sources.split("+")

    @property
    def use_stereo(self) -> bool:
        """Deprecated read-only alias of :attr:`uses_stereo` (code written against the old field);
        removed together with the ``data.use_stereo`` key."""
        return self.uses_stereo

    @property
    def uses_temporal(self) -> bool:
        """U warps frames t-1, t+1 with poses from the pose network."""
        return "temporal" in self.u_sources.split("+")


@dataclass
class ModelConfig:
    encoder: str = "resnet18"
    """timm model name of the depth encoder (any CNN with ``features_only``)."""
    pose_encoder: str = "resnet18"
    """timm model name of the pose encoder (first conv widened to 6 channels)."""
    pretrained: Literal["none", "file", "hub"] = "none"
    """Encoder initialisation: random, from ``weights`` (a local file), or downloaded by timm."""
    weights: str | None = None
    """Path to ImageNet weights (safetensors or .pth) when ``pretrained: file``."""
    num_scales: int = 4
    """Decoder output scales (1, 1/2, 1/4, 1/8 of the input)."""
    init_depth: float | None = 10.0
    """Depth (metres) the disparity heads start around, via their bias; ``None``: the sigmoid's
    midpoint (~0.2 m with the default range). A street-scene depth lets S start near the right
    scale and keeps U's first warps consistent with metric-sized motion."""
    pose_translation_scale: float = 1.0
    """Translation per unit of the pose head's output (metres when depth is metric). 1.0 lets U's
    poses reach metric motion (~1 m/frame) once S teaches it metres; Monodepth2 uses 0.01."""
    min_depth: float = 0.1
    """d_min of the disparity→depth mapping, metres."""
    max_depth: float = 100.0
    """d_max of the disparity→depth mapping, metres."""


@dataclass
class LossConfig:
    tau_s: float = 0.1
    """τ_s of L_sup' and L_pf: the error at which S's optimal confidence starts to fall below 1
    (optimal C = min(1, τ_s/ρ))."""
    tau_u: float = 0.05
    """τ_u of L_self: the same for U's photometric error. 0.02 (2026-12-07, tuning drives, 25 %
    labels, 3 seeds) spread C_u (mean 0.50 vs 0.85) and raised U's AURG (+0.087 vs +0.062), but S
    learnt less from U (-16.0 % vs -22.0 % against S-only, one seed worse than S-only)."""
    rho: Literal["log", "l1"] = "log"
    """Per-pixel supervised error ρ: |log D - log D*| or |D - D*| in metres."""
    point_filtering: Literal["held_out", "prior", "none"] = "held_out"
    """How S's confidence is trained away from LiDAR points (METHOD.md, "point filtering")."""
    pf_fraction: float = 0.2
    """M: held-out fraction of LiDAR pixels (``held_out``) or the prior confidence (``prior``)."""
    lambda_pf: float = 1.0
    """λ_pf, weight of the point-filtering term."""
    lambda_distill: float = 0.5
    """λ_d, final weight of each distillation term. Measured in the two-stage plan (2026-12-07, tuning
    drives, 25 % labels, 3 seeds): 0.25 lost for both branches; 1.0 helped U on two seeds (-17 %,
    -10.5 %) and made the weak seed worse for both (U +4.9 %): a stronger coupling pulls each pair
    toward its shared answer, right or wrong (docs/fidelity.md, ninth round). With full labels
    (tuning drives, 3 seeds) 1.0 gave U -4.8 % against -4.3 % and S -10.9 % against -11.4 %, its
    weak seed worse than S-only (thirteenth round)."""
    distill_warmup: float = 0.1
    """Ramp of λ_d from 0: a fraction of ``train.max_steps`` if < 1, else a number of steps."""
    distill_start: float = 0.0
    """Step from which distillation is on (before it, both λ_d are 0; the ramp of ``distill_warmup``
    starts here): a fraction of ``train.max_steps`` if < 1, else a number of steps. A partner's
    early predictions are noise; 0 = METHOD.md."""
    distill_direction: Literal["both", "s_from_u", "u_from_s", "none"] = "both"
    """Which distillation terms are active (ablations: one way only, none)."""
    scale_align: Literal["auto", "on", "off"] = "auto"
    """Median scale alignment k in L_s<-u; auto = on unless ``data.u_sources`` has stereo (metric)."""
    teacher_view: Literal["own", "clean", "clean_if_strong"] = "clean_if_strong"
    """Which prediction a branch sends to its partner. ``own``: the one on its own augmented view,
    mapped back (what its loss sees). ``clean``: an extra forward pass without gradients on the
    un-augmented image (BatchNorm statistics untouched), so a strongly augmented S teaches with
    the prediction it would make at test time (FixMatch's rule: targets from the weak view).
    ``clean_if_strong`` (the default since 2026-12-07): the clean pass only for a branch with
    strong augmentation (S); a weakly augmented one (U: flip and colour jitter) sends its own view,
    flip undone, and saves a forward pass per step. Measured against ``clean`` (tuning drives,
    two-stage plan, 3 seeds, from the same stage-1 weights): labelled fraction 1, S +0.3 %, U +0.1 %;
    0.25, S +0.1 % (-0.4, -2.0, +2.7 per seed), U +0.3 %: the same within the seeds' noise, for
    S+U colocated at 640×192 1.31× Monodepth2's U step instead of 1.44× (docs/benchmarks.md)."""
    u_confidence_pixels: Literal["kept", "all"] = "kept"
    """Where U's confidence is trained. ``kept``: the pixels auto-masking keeps (with the depth).
    ``all``: every pixel with a finite error; where auto-masking drops a pixel (objects moving
    with the camera, no parallax) the confidence still learns the detached warped error there,
    so U does not teach its partner with an untrained confidence where it had no evidence.
    Measured (2026-12-07, tuning drives, 25 % labels, 3 seeds): U better on moving cars (0.584 vs
    0.672) but not on the mean (-5.5 % vs -5.8 % against U-only, one seed +4.9 %), S -19.9 % vs -22.0 %."""
    u_confidence_target: Literal["photometric", "lidar"] = "photometric"
    """The confidence U shows its partner, evaluation and predict. ``photometric``: its depth net's,
    learnt from the photometric error (METHOD.md). ``lidar``: a second, small net's
    (``models.ErrorConfidenceNet``, on U's image and detached disparity and confidence), learnt
    toward min(1, τ_s/ρ) of U's log-depth error at the LiDAR pixels of labelled images
    (``losses.lidar_confidence_nll``): the quantity S's held-out points teach C_s, so both
    confidences share one scale and ``distill_gate: relative`` compares like with like. U's own
    loss keeps its photometric confidence, and nothing of the LiDAR reaches U's depth (U-only's
    depth is bit-identical with or without it). Measured in the two-stage plan (2026-12-07, 3 seeds;
    docs/fidelity.md, tenth and eleventh rounds), tuning drives, labelled fraction 1 / 0.25 / 0.05:
    S -7.5 / -21.6 / -36.4 % vs S-only (``photometric``: -8.2 / -22.0 / -33.6 %), U -4.9 / -7.0 /
    -1.6 % vs U-only (-5.4 / -5.8 / -1.7 %), and U's AURG lower at every fraction (+0.05 vs
    +0.06): a wash, so not the default. The held-out drives, read after that decision, agree: S
    -15.6 / -11.5 / -31.2 % (-20.6 / -7.5 / -31.0 %), U -5.0 / -0.1 / -0.1 % (-7.2 / +0.6 / +0.2 %).
    Its per-pixel agreement with the oracle "which branch is closer" is at chance (53-56 %). With
    ``distill_gate: relative`` both branches lost."""
    u_distill_pixels: Literal["all", "reprojects_better"] = "all"
    """Where U learns from S (L_u<-s). ``all``: every pixel both branches saw (METHOD.md).
    ``reprojects_better``: Depth Hints' rule (Watson et al., ICCV 2019) with S's depth as the hint:
    only where S's depth, warped with U's own poses, explains U's source frames better than U's
    depth does (lower minimum photometric error at full resolution), plus the pixels auto-masking
    drops for U (no photometric evidence either way: objects moving with the camera). U's own
    frames, not its confidence, judge the teacher pixel by pixel. Needs a flip-only U view
    (``augment.u_strength: weak``). Measured (2026-12-07, tuning drives, 25 % labels, 3 seeds,
    paired with ``all`` from the same stage-1 weights): S's depth reprojects better on 58-61 % of
    the pixels, and U lost a little (0.188 vs 0.183, 0.202 vs 0.197, 0.276 vs 0.278; mean +1.7 %);
    S unchanged. Where U's frames prefer its own depth, S's teaching still helped it."""
    u_distill_confident_share: float = 1.0
    """The share of each image's pixels, by S's confidence, where U learns from S (L_u<-s): U takes
    S's depth only where S is surest of it in that image (``losses.most_confident``), so that S's
    within-image ranking of its errors (AURG > 0), not the scale of C_s against C_u, picks the
    pixels. 1 = every pixel (METHOD.md). Applies with ``u_distill_pixels`` (both must keep a pixel).
    Measured (2026-12-07, tuning drives, 25 % labels, 3 seeds, paired with 1 from the same stage-1
    weights): 0.5, U +5.0 % (+9.5, +7.0, -1.6), S +4.3 %; 0.25, U +5.4 %, S +5.0 %: worse, most on
    moving cars (U 0.661 -> 0.756), where S is right but not among its surest pixels. Not a default."""
    partner_trust: Literal["none", "lidar"] = "none"
    """An extra per-image factor on S's L_s<-u weight. ``lidar``: t = min(1, S's median log error /
    U's median log error) at the image's LiDAR points (``losses.lidar_trust``); an image without
    LiDAR gets the running mean of t (momentum ``0.9``, kept in S's state). U's confidence comes from
    photometric errors and says nothing about a wrong scale or a wrong surface that warps well;
    the LiDAR does. Measured in the two-stage plan (2026-12-07, tuning drives, 25 % labels, 3 seeds):
    no effect (S -22.0 % vs S-only, as without it): t stays 0.96-1.0, because the mutual S and U it
    compares have converged toward each other at the LiDAR points."""
    distill_regions: Literal["everywhere", "by_coverage", "by_sensor_coverage"] = "everywhere"
    """Where each distillation term applies. ``everywhere``: every pixel both branches saw.
    ``by_coverage``: S learns from U only outside its LiDAR's reach (above the top return of each
    column, columns without returns) and U from S only inside it (where S's depth is supervised);
    images without LiDAR (unlabelled) keep every pixel both ways. The labels decide who teaches.
    ``by_sensor_coverage``: the same on labelled images; an unlabelled image gets the sensor's reach,
    the rows between the running mean of the labelled images' top and bottom returns (their
    median over columns): the beams' elevation range is a property of the rig, not of the image.
    Measured (2026-12-07, tuning drives, 25 % labels, 3 seeds, two-stage plan): S -14.2 % vs S-only
    (-22.0 % everywhere), U -0.9 % (-5.8 %): S got worse on its own LiDAR rows (0.290 vs 0.242)
    without U's teaching there, so that teaching was helping (docs/fidelity.md, tenth round)."""
    unlabelled_gain_s_from_u: float = 30.0
    """Factor on S's L_s<-u on samples outside the labelled subset (``data.labelled_fraction``, or
    shards' unlabelled frames). There L_s<-u is S's only depth signal, and at the defaults its
    per-pixel gradient is ~30x weaker than the LiDAR NLL's (C/τ_s vs λ_d·C_u); under Adam, whose
    step is set by the labelled batches' large gradients, an unlabelled batch then barely moves S.
    30 gives an unlabelled image about the pull of a labelled one (docs/method.md, "readings";
    docs/fidelity.md, fifth and sixth rounds). 10 at 25 % labels (ninth round): S -20.1 % vs
    -22.0 % with 30, U -7.1 % vs -5.8 %. 1 = METHOD.md; labelled samples are unaffected,
    and with every sample labelled the factor has no effect."""
    unlabelled_gain_u_from_s: float = 1.0
    """Factor on U's L_u<-s on samples outside the labelled subset. There S's depth is its own
    extrapolation, partly taught by U; 0 lets S teach U only on images where S had LiDAR. 1 =
    METHOD.md and the default: under a decayed second stage it gave U more than 0 did (tuning
    drives, 25 % labels: −5.8 % vs −2.3 % against U-only; docs/fidelity.md, sixth round). 3 and 10
    lost (seventh round): S's 30x and U's factor close a loop on unlabelled images in which both
    branches settle on one wrong depth (10: S 0.207 -> 0.309). With every sample labelled the
    factor has no effect."""
    diagnostic_teacher: Literal["none", "ground_truth"] = "none"
    """A diagnostic, never for real training: ``ground_truth`` replaces the partner's depth by the
    batch's dense ground truth (``gt.png``, synthetic training shards), confidence 1 where it is
    defined, in every distillation term. It tests a distillation path with a perfect teacher: a
    student that gets worse from it has a bug in the path, not a bad partner."""
    distill_gate: Literal["teacher", "relative", "relative_u", "relative_s"] = "teacher"
    """Per-pixel weight of a distillation term. ``teacher``: sg(C_teacher) (METHOD.md).
    ``relative``: sg(C_teacher) where the teacher is more confident than the student, sg(C_student),
    else 0: a branch learns only where its partner is surer than itself. ``relative_u``: that rule
    for U's L_u<-s only, S's L_s<-u keeps ``teacher``; ``relative_s`` the reverse (S learns from U
    only where U is surer than S, U keeps ``teacher``). Measured (2026-12-07, tuning drives, 25 %
    labels): ``relative_u`` made U worse than ``teacher`` on both paired seeds (0.230 vs 0.206,
    0.212 vs 0.196) and in every region, most on moving cars (0.742 -> 0.873) and textureless
    patches (0.112 -> 0.130): U's photometric confidence is not low where U is wrong (auto-masking
    leaves it untrained on cars moving with the camera; a uniform surface warps well at a wrong
    depth), so the gate drops S's teaching exactly where U needs it. ``relative_s`` changed nothing
    (S -22.1 % vs -22.0 %): C_u exceeds C_s on 97-99 % of the pixels, because the two confidences
    are trained on different errors (τ_s on log depth, τ_u on photometric error) and do not say
    which branch is closer to the truth (``benchmarks/teacher_oracle.py``; docs/fidelity.md, ninth round)."""
    ssim_alpha: float = 0.85
    """α of the photometric error pe = α/2 (1 - SSIM) + (1 - α)|a - b|."""
    lambda_smooth: float = 1e-3
    """λ_sm, weight of the edge-aware smoothness on mean-normalised disparity."""
    automask: bool = True
    """Monodepth2 auto-masking of pixels whose un-warped error is lower."""


@dataclass
class AugmentConfig:
    s_strength: Literal["weak", "strong"] = "strong"
    """Augmentation of branch S (``weak`` = the same as U: the "same augmentation" ablation)."""
    u_strength: Literal["weak", "strong"] = "weak"
    """Augmentation of branch U (``strong`` includes the rotation, which U cannot use: its warps
    need the exact intrinsics K)."""
    flip_p: float = 0.5
    """Probability of a horizontal flip (both branches)."""
    jitter: float = 0.2
    """Brightness/contrast/saturation jitter of the weak set (hue is half of it)."""
    crop_scale: tuple[float, float] = (0.7, 1.0)
    """Area range of S's random resized crop (a zoom by 1/sqrt(area) at the same output size)."""
    zoom_depth: Literal["scale", "keep"] = "scale"
    """What S's zoom does to depth. ``scale``: the LiDAR target is divided by the magnification m
    and S's prediction is multiplied by m on its way back to the canonical frame (Eigen et al.'s
    scale augmentation: a zoomed image looks like a scene m times closer, both by apparent size
    and by the ground plane's row). ``keep``: LiDAR values unchanged (the pre-0.2 behaviour: S is
    taught that the same apparent size means different depths)."""
    rotation_deg: float = 5.0
    """Maximum absolute rotation of S, degrees."""


@dataclass
class TopologyConfig:
    mode: Literal["auto", "colocated", "split"] = "auto"
    """auto: colocated on 1 process, split otherwise. colocated: every rank runs both branches."""
    sup_ranks: int | None = None
    """Ranks in the S group when split (default: half the world). Must divide the U rank count."""


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """Peak learning rate of both branches (AdamW; ``weight_decay: 0`` is Adam)."""
    lr_pose: float | None = None
    """Learning rate of the pose network, its own parameter group in U's optimiser (default: ``lr``)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps, from lr/warmup_steps to lr."""
    schedule: Literal["constant", "step", "cosine"] = "step"
    """After warm-up: constant, step decay (×``decay_factor`` at each milestone) or cosine."""
    milestones: tuple[float, ...] = (0.75,)
    """Step-decay milestones as fractions of ``train.max_steps``."""
    decay_factor: float = 0.1
    """Multiplier applied at each milestone."""
    grad_clip: float | None = None
    """Clip the gradient norm of each branch to this value (``None``: no clipping)."""


@dataclass
class TrainConfig:
    max_steps: int = 200
    """Optimiser steps of each branch."""
    output_dir: str = "runs/default"
    """Run folder: resolved config, checkpoints, exports, logs. The same folder resumes."""
    seed: int = 0
    """Seed of model init (per branch, independent of the placement), data order and augmentation
    (per branch replica)."""
    resume: str = "auto"
    """``auto``: continue from the newest complete checkpoint in ``output_dir``; ``none``; or a path."""
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    """Autocast dtype of the networks; losses always run in fp32."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimiser step (DDP synchronises only on the last)."""
    deepspeed: Literal["none", "zero1", "zero2"] = "none"
    """DeepSpeed ZeRO stage per branch group (CUDA, or CPU over gloo); each group gets its own engine
    over the branch's AdamW and schedule, fp32 weights (``mixed_precision: fp16`` is refused)."""
    log_every: int = 10
    """Steps between scalar logs."""
    image_every: int = 100
    """Steps between depth/confidence image logs (0 disables)."""
    val_every: int = 100
    """Steps between validations (0 disables)."""
    val_batches: int | None = None
    """Cap on validation batches per rank (``None``: the full val set)."""
    ckpt_every: int = 100
    """Steps between checkpoints (a final one is always written)."""
    keep_last: int = 2
    """Complete checkpoints kept; older ones are deleted after a new one is complete."""
    report_to: Literal["none", "wandb", "tensorboard"] = "none"
    """Tracker. W&B honours ``WANDB_MODE=offline``; ``tensorboard`` needs ``pip install tensorboard``."""
    wandb_project: str = "distill-depth"
    """W&B project name."""
    run_name: str | None = None
    """Run name and stable tracker id (default: the output folder's name)."""
    timeout_s: float = 300.0
    """Collective timeout: a dead rank makes the others fail after at most this long; the
    watchdog ends a rank after 2× this without progress."""
    init_s: str | None = None
    """Branch S's initial weights from this run, checkpoint or export folder (a fresh run only:
    a resume restores its own). The optimiser starts fresh: a second stage, not a resume."""
    init_u: str | None = None
    """The same for branch U (its depth and pose networks)."""
    overfit_batches: int = 0
    """Debug/overfit check: repeat the first N micro-batches of the stream forever (0: off)."""
    max_bad_steps: int = 20
    """Non-finite steps in a row (loss, a loss term or a gradient not finite on some rank of a
    branch; each one skips that branch's optimiser update) after which the run checkpoints the last
    good state and stops with an error naming the branch and the term that went non-finite first."""
    channels_last: bool = False
    """The networks (depth nets, pose net) and their input images in channels-last memory layout,
    the one GPU tensor cores prefer (with ``mixed_precision``); on a CPU it measured no faster. The
    same computation to rounding; checkpoints and exports are written in the usual layout."""
    keep_cpu_memory: bool = True
    """On a CPU device, glibc's malloc keeps freed memory for the next step instead of unmapping
    every large block (``distill_depth.train.cpu_memory``): U's step at 640×192 without ~180,000
    page faults, 9 % shorter on 2 cores, the same peak RSS. Process-wide; no effect on a GPU run
    or without glibc."""
    compile: Literal["off", "on", "losses"] = "off"
    """``torch.compile`` (inductor). ``on`` (also YAML ``true``): each network (depth nets, pose
    net) in place, before DDP wraps the branch, so parameter names in checkpoints and exports do
    not change, and the branch's element-wise loss functions (U's photometric error, SSIM,
    auto-mask, confidence NLL and smoothness; S's LiDAR NLL and point filtering). ``losses``: the loss functions only, the part that
    pays on a CPU (U's step ~0.8× as long at 640×192 on 2 cores; the networks measured no faster
    there) and compiles in about a minute. Never augmentation. The first step compiles (a C++
    compiler is needed on a CPU; the networks take minutes there); eval mode (validation) and new
    input shapes compile once more."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    topology: TopologyConfig = field(default_factory=TopologyConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    branches: tuple[str, ...] = ("S", "U")
    """Branches trained: both (mutual distillation) or one (the S-only / U-only baselines)."""

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    return value
