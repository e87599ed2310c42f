"""One typed configuration for every knob, built the same way from the CLI, a YAML file or Python.

>>> cfg = FitConfig()
>>> cfg = apply_overrides(cfg, ["train.lr=0.1", "epochs=3"])
>>> cfg.train.lr, cfg.train.epochs
(0.1, 3)
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bonsai.errors import ConfigError
from bonsai.utils import atomic_write_text, parse_count, parse_duration

PRECISIONS = ("auto", "bf16", "fp16", "fp32")


@dataclass
class DataConfig:
    path: str | None = None  # the dataset (folder, CSV or .npz); recorded so config.yaml re-runs the fit
    val_fraction: float = 0.1  # share of each class held out for model selection and stopping
    # at most about this many held-out images in all (the fraction is lowered to fit; the rest trains): a holdout
    # of 2,000 reads 90% accuracy to +-0.7 points (one standard error), and on a large dataset 10% is far more.
    # None: val_fraction alone
    val_max: int | None = None
    # under a time budget (train.budget), the holdout is also capped at about this many images: validation after
    # every epoch runs on the budget clock, and the images it no longer holds train (each class keeps at least one
    # image). On CIFAR-10 at 15 minutes (45,000 -> 48,000 training images, validation a third as long): +0.52 and
    # +0.20 points in two single runs, within their spread, so kept for the mechanism (README, "A smaller holdout
    # under a budget"). The smaller of this and val_max applies; datasets under about 20,000 training images hold
    # out less anyway. None: val_max alone (a budget run that should hold out more sets this to null)
    budget_val_max: int | None = 2000
    image_size: int | None = None  # working size in pixels; None: median shorter side, capped at max_image_size
    max_image_size: int = 64  # cap for the derived working size (CPU training time grows with its square)
    in_memory: str = "auto"  # auto | yes | no: hold decoded images as one uint8 tensor, or stream from files
    memory_budget_gb: float = 0.0  # largest in-memory dataset; 0 means a quarter of this machine's RAM
    max_bad_fraction: float = 0.05  # fail when more than this share of the training, or of the test, files cannot be read
    workers: int = 0  # DataLoader worker processes for the streaming path


@dataclass
class AugmentConfig:
    flip: bool = True  # random horizontal flip (switch off for digits or text)
    # with flip: mirror each image every other epoch (a random half in the first), as airbench does, instead of by
    # chance; off: no gain measured on CIFAR-10 (README, "Alternating flips and a whitened stem")
    alternate_flip: bool = False
    translate: int | None = None  # random shift in pixels, zero padded; None: image_size // 8

    def pixels(self, image_size: int) -> int:
        """The random translation's range in pixels for images of ``image_size``."""
        return self.translate if self.translate is not None else image_size // 8


@dataclass
class ModelConfig:
    # preset name (resnet8/20/32/56, bonsai), path to an arch.json, or auto: with a budget, the bonsai preset at
    # the widest width multiplier expected to fit train.plan_epochs epochs into it (bonsai.train.plan); else bonsai
    arch: str = "auto"
    # each block's last BN scale starts at 0 (blocks start as the identity); None: yes, except with --prune, where
    # a zero scale sits in the lasso's dead zone from the first step and whole blocks never come alive
    zero_init_residual: bool | None = None
    # the stem's filters start along the principal axes of the training images' patches, in +/- pairs (a whitening
    # first layer derived from the data; bonsai.models.resnet.whiten_stem_); off: random like every other conv
    # (no gain measured on CIFAR-10, see the README)
    whiten_stem: bool = False
    # every stage that halves the resolution does so by a 2x2 max-pool after a full-resolution first conv (the conv-pool
    # layers of airbench and ResNet-9) instead of a strided conv. None: for the network the budget planner sizes
    # (arch=auto, a budget, no train.epochs; +1.0 point on CIFAR-10 under 6 minutes, see the README), not for a named
    # preset. True: an arch.json's stride-2 stages too. False: strided, except where an arch.json stores pooled stages
    pool: bool | None = None


@dataclass
class TrainConfig:
    epochs: int | None = None  # fixed number of epochs (default 20 when neither epochs nor budget is given)
    budget: str | None = None  # wall-clock budget for training + validation, e.g. 90s, 10m, 1h
    patience: int | None = None  # stop after this many epochs without a better validation accuracy
    max_epochs: int = 200  # epoch cap when only patience stops the run; the LR schedule spans it
    # arch=auto with a budget: the planned network must be expected to train on plan_images images in it, but at
    # most plan_epochs epochs (and at least one). On the demo (4,500 training images, 90 s) the 0.5x network's 49
    # epochs beat the 0.75x's 28 and the 1x's 20 (66.2% / 64.4% / 56.1% test): 32 epochs. On CIFAR-10 (45,000,
    # 15 min) the 1x network's 21 epochs (0.95 M images) and the 0.75x's 30 (1.35 M) beat the 0.5x's 47 (2.1 M):
    # 86.80% / 86.72% / 86.08% test: 1 M images
    plan_epochs: float = 32
    plan_images: float = 1e6
    batch_size: int = 256
    lr: float = 0.4  # peak learning rate per 256 examples; scaled linearly with the batch size
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # applied to conv/linear weights only, not to BN parameters or biases
    # label smoothing (airbench uses 0.2): off, as it made no measurable difference. On CIFAR-10
    # under 5 minutes, 0.1 against 0 gave -0.05 +/- 0.15 points over 4 paired repeats (benchmarks/defaults_repeat.py)
    # and +0.03 on average over 5 single runs before
    label_smoothing: float = 0.0
    schedule: str = "onecycle"  # onecycle (linear warm-up, cosine to 0) | step (x0.1 at 50% and 75%) | constant
    warmup: float = 0.1  # share of training spent warming the LR up from 0 (every schedule)
    # progressive resizing: training starts at low_res x the working size and grows linearly (in 4-pixel steps)
    # to the full size over the first low_res_share of training; the rest runs at full size (low_res=1: off).
    # Only with --epochs or --budget: a run stopped by patience alone has no planned length to share out
    low_res: float = 0.5
    low_res_share: float = 0.5
    tta: bool = True  # test-time augmentation: average each image's prediction with its mirror (needs augment.flip)
    # ... and, for the final model's predictions only (not the per-epoch validation, to keep the budget clock
    # cheap), half and half with the image shifted this many pixels down-right and up-left (needs train.tta and a
    # training translation, augment.translate > 0); 0: off
    tta_shift: int = 1
    # lookahead (airbench): every lookahead_every steps the weights and BN statistics move to an exponential
    # average of themselves, ema <- lerp(ema, w, 1 - d), w <- ema, with d = lookahead ** lookahead_every x
    # progress ** 3 (no averaging early, the most at the end); each epoch's last step syncs as well, so a checkpoint
    # needs no extra state; epochs under the pruning penalty skip it (averaging would revive the channels it zeroes).
    # 0: off
    lookahead: float = 0.0
    lookahead_every: int = 5
    precision: str = "auto"  # auto | bf16 | fp16 | fp32; auto: bf16 where the CPU/GPU supports it, else fp32
    channels_last: bool = True
    compile: bool = False  # torch.compile the model (pays off only for long runs)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (under torchrun: cuda is one GPU per rank)
    eval_batch_size: int = 512
    # under torchrun, ranks other than 0 keep their copy of the run (checkpoints, events) in rank_dir/rank<N>;
    # None: a temporary folder removed at the end. Only rank 0 writes the run directory.
    rank_dir: str | None = None
    # a non-finite loss or gradient rolls back to the last checkpoint with the LR times rollback_lr_factor, at most
    # max_rollbacks times in a run; one more and the run stops as diverged, keeping the best model so far
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5


@dataclass
class PruneConfig:
    enabled: bool = False  # PruneTrain: group lasso from the first step, channels removed every `interval` epochs
    lpr: float = 0.2  # lasso penalty ratio: the penalty's share of the loss at the first step (sets lambda)
    interval: int | None = None  # epochs between reconfigurations; None: 5% of the planned epochs (at least 1)
    weighting: str = "flops"  # each group's penalty weight: flops (what the channel costs), size (sqrt), none
    proximal: bool = True  # apply the penalty as a proximal group soft-threshold after each step (else a gradient)
    prox_every: int = 4  # the proximal step runs every this many steps, with that many steps' threshold at once
    threshold: float = 1e-4  # a channel is dead when max |w| of its group is at most this
    depth: bool = True  # each block's residual branch is a group too; a block driven to zero is removed whole
    # the penalty applies in epochs that start before this share of the planned training; the rest trains the pruned
    # network without it, which recovers accuracy on short schedules
    until: float = 0.5
    min_width: int = 8  # no layer drops below this many channels (never zero)
    round_to: int = 8  # kept widths are rounded up to a multiple of this (full SIMD/AMX tiles)
    # what the penalty's groups hold: weights (PruneTrain's: each channel's filter with its BN scale and shift, each
    # input channel, the head's columns, whole residual branches) or bn (each channel's BN scale and shift, and each
    # branch's bn2: a filter before a BN is scale-invariant, so shrinking it only raises its effective learning rate)
    groups: str = "weights"
    # MorphNet's expand step: after the last reconfiguration (the end of prune.until), the widths are scaled by the
    # largest factor that keeps forward FLOPs per image within this target, then topped up group by group (weights
    # carried over: growing keeps the function, shrinking keeps the strongest channels). With adapt.on, the target
    # steers the controller instead. None: keep the pruned widths
    target_flops: float | None = None
    # after a reconfiguration, grow the batch to keep FLOPs per step constant (LR scaled with it). Off by default: on
    # a CPU a larger batch is not faster per image, and on short schedules the fewer steps cost accuracy
    grow_batch: bool = False
    max_batch_scale: float = 4.0  # cap: the batch never exceeds this multiple of train.batch_size


@dataclass
class AdaptConfig:
    """The adaptive controller (``--adapt``; the rule is documented in :mod:`bonsai.train.controller`)."""

    # decide after every epoch: continue / prune / widen / deepen / stop (turns pruning on). null (the default):
    # on under a time budget with the planned network (model.arch auto, no train.epochs) unless pruning or a FLOP
    # target is asked for, where it measured ahead of the planned network trained as is; off otherwise
    on: bool | None = None
    window: int = 3  # epochs over which pruned shares are counted; a prune decision applies the penalty this long
    plateau_epochs: int = 2  # this many epochs without a validation gain of more than min_delta make a plateau
    min_delta: float = 0.002
    min_left: float = 0.2  # no surgery with less than this share of the run left: stop at a plateau instead
    max_gap: float = 0.15  # train accuracy this far above validation at a plateau: prune
    saturated: float = 0.05  # a stage that lost less than this share of channels in the window is saturated: widen
    widen_factor: float = 1.5  # at most 4
    max_growths: int = 3
    # with a time budget and no --flops: the FLOP target is the forward FLOPs per image of a network expected to
    # train as many epochs in the budget as the planner asks of its networks (train.plan_images images, at most
    # train.plan_epochs epochs). With the planned network (no --arch): the planner's pick, started from a narrower
    # multiplier that grows to it after the first epoch, or at the pick when a narrower one would floor widths at 16
    # (bonsai.train.plan.adapt_start). With --arch: from a pace
    # probe of that network (its FLOP rate taken to hold for other sizes). false: no target unless --flops
    budget_target: bool = True
    # with a FLOP target: the share of the run in which the network is moved to the target's size. A network over
    # it trains with the penalty at an LPR set by how much must go (1 - target / FLOPs, capped at max_lpr, never
    # below prune.lpr), then MorphNet's step takes it to the target exactly; one well under it grows to the target
    # after its first epoch (Net2WiderNet). Replaces prune.until when there is a target
    sizing: float = 0.2
    max_lpr: float = 0.62
    # a network shrunk to the target (at the sizing phase's end, or over it later) first loses its weakest residual
    # blocks (smallest last-BN scales and shifts) until it is within the target, then its widths are fitted to the
    # target (which may widen them): on a CPU a block costs more time than its FLOPs, so fewer, wider blocks train
    # faster than a thinned deep network of equal FLOPs. false: widths only
    shed_blocks: bool = True
    # Net2WiderNet's symmetry-breaking noise in every growth while training (--adapt's widenings and MorphNet's
    # expand step): a copied unit's incoming weights get Gaussian noise of this times the copied weights' standard deviation.
    # Without it a copy and its original have equal incoming and outgoing weights, receive equal gradients and stay
    # equal for ever, so the grown network computes no more than the one it grew from. Exact function preservation
    # needs 0 (the surgery tests use 0)
    widen_noise: float = 0.05


@dataclass
class DistillConfig:
    teacher: str | None = None  # a run directory (or exported model) whose soft targets the student learns too
    temperature: float = 4.0  # softens both networks' outputs; the soft loss is scaled by T^2 (Hinton et al.)
    alpha: float = 0.5  # weight of the soft-target loss; the labels' cross-entropy gets 1 - alpha


@dataclass
class FitConfig:
    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    adapt: AdaptConfig = field(default_factory=AdaptConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    seed: int = 0
    out: str | None = None  # run directory; None: runs/<dataset>-<time>
    test_each_epoch: bool = True  # report test accuracy per epoch when test labels exist (never used to decide)
    quiet: bool = False  # no progress bar
    report: bool = True  # write report.html into the run directory at the end of fit
    anytime_predictions: bool = True  # rewrite predictions.csv whenever validation accuracy improves
    log: str = ""  # extra loggers, comma-separated: tensorboard (scalars in RUN/tensorboard/)

    def tta_mirror(self) -> bool:
        """Whether predictions average in the mirrored image: test-time augmentation on, and training flipped."""
        return self.train.tta and self.augment.flip

    def tta_shift(self, image_size: int, tta: bool | None = None) -> int:
        """Pixels of the shifted views in the final predictions: ``train.tta_shift`` where test-time augmentation is
        on (``train.tta``, or ``tta`` when given) and training translated images; else 0."""
        on = self.train.tta if tta is None else tta
        return self.train.tta_shift if on and self.augment.pixels(image_size) > 0 else 0

    def validate(self) -> "FitConfig":
        t, d = self.train, self.data
        _check(t.epochs is None or t.epochs >= 1, "train.epochs must be >= 1")
        if t.budget is not None:
            parse_duration(t.budget)
        _check(t.patience is None or t.patience >= 1, "train.patience must be >= 1")
        _check(t.max_epochs >= 1, "train.max_epochs must be >= 1")
        _check(t.plan_epochs > 0, "train.plan_epochs must be > 0")
        _check(t.plan_images > 0, "train.plan_images must be > 0")
        _check(t.batch_size >= 1, "train.batch_size must be >= 1")
        _check(t.eval_batch_size >= 1, "train.eval_batch_size must be >= 1")
        _check(t.max_rollbacks >= 0, "train.max_rollbacks must be >= 0")
        _check(0 < t.rollback_lr_factor < 1, "train.rollback_lr_factor must be in (0, 1)")
        _check(0 <= self.seed < 2**32, "seed must be in [0, 2**32)")
        _check(d.workers >= 0, "data.workers must be >= 0")
        _check(t.lr > 0, "train.lr must be > 0")
        _check(0 <= t.momentum < 1, "train.momentum must be in [0, 1)")
        _check(t.weight_decay >= 0, "train.weight_decay must be >= 0")
        _check(0 <= t.label_smoothing < 1, "train.label_smoothing must be in [0, 1)")
        _check(t.schedule in ("onecycle", "step", "constant"), "train.schedule must be onecycle, step or constant")
        _check(0 <= t.warmup < 1, "train.warmup must be in [0, 1)")
        _check(0.25 <= t.low_res <= 1, "train.low_res must be in [0.25, 1]")
        _check(0 <= t.low_res_share < 1, "train.low_res_share must be in [0, 1)")
        _check(t.tta_shift >= 0, "train.tta_shift must be >= 0 (pixels; 0: off)")
        _check(0 <= t.lookahead < 1, "train.lookahead must be in [0, 1) (0: off)")
        _check(t.lookahead_every >= 1, "train.lookahead_every must be >= 1")
        _check(t.precision in PRECISIONS, f"train.precision must be one of {', '.join(PRECISIONS)}")
        _check(0 < d.val_fraction < 1, "data.val_fraction must be in (0, 1)")
        _check(d.val_max is None or d.val_max >= 1, "data.val_max must be >= 1 (or null: no cap)")
        _check(d.budget_val_max is None or d.budget_val_max >= 1, "data.budget_val_max must be >= 1 (or null: val_max alone)")
        _check(d.image_size is None or 4 <= d.image_size <= 1024, "data.image_size must be in [4, 1024]")
        _check(4 <= d.max_image_size <= 1024, "data.max_image_size must be in [4, 1024]")
        _check(d.in_memory in ("auto", "yes", "no"), "data.in_memory must be auto, yes or no")
        _check(0 <= d.max_bad_fraction < 1, "data.max_bad_fraction must be in [0, 1)")
        p = self.prune
        _check(0 < p.lpr < 1, "prune.lpr must be in (0, 1)")
        _check(p.weighting in ("flops", "size", "none"), "prune.weighting must be flops, size or none")
        _check(p.groups in ("weights", "bn"), "prune.groups must be weights or bn")
        _check(p.interval is None or p.interval >= 1, "prune.interval must be >= 1")
        _check(0 < p.until <= 1, "prune.until must be in (0, 1]")
        _check(p.prox_every >= 1, "prune.prox_every must be >= 1")
        _check(p.target_flops is None or (p.target_flops > 0 and math.isfinite(p.target_flops)), "prune.target_flops must be a positive number")
        _check(
            not p.target_flops or p.until < 1 or self.adapt.on,
            "prune.target_flops needs prune.until < 1: the expand step follows the last epoch with the penalty",
        )
        _check(p.threshold >= 0, "prune.threshold must be >= 0")
        _check(p.min_width >= 1, "prune.min_width must be >= 1")
        _check(p.round_to >= 1, "prune.round_to must be >= 1")
        _check(p.max_batch_scale >= 1, "prune.max_batch_scale must be >= 1")
        _check(self.augment.translate is None or self.augment.translate >= 0, "augment.translate must be >= 0")
        _check(self.distill.temperature > 0, "distill.temperature must be > 0")
        _check(0 <= self.distill.alpha <= 1, "distill.alpha must be in [0, 1]")
        a = self.adapt
        _check(a.window >= 1, "adapt.window must be >= 1")
        _check(a.plateau_epochs >= 1, "adapt.plateau_epochs must be >= 1")
        _check(a.max_growths >= 0, "adapt.max_growths must be >= 0")
        _check(1 < a.widen_factor <= 4, "adapt.widen_factor must be in (1, 4]")
        _check(a.min_delta >= 0, "adapt.min_delta must be >= 0")
        _check(0 <= a.min_left < 1, "adapt.min_left must be in [0, 1)")
        _check(0 <= a.saturated <= 1, "adapt.saturated must be in [0, 1]")
        _check(0 < a.sizing < 1, "adapt.sizing must be in (0, 1)")
        _check(0 < a.max_lpr < 1, "adapt.max_lpr must be in (0, 1)")
        _check(0 <= a.widen_noise <= 1, "adapt.widen_noise must be in [0, 1]")
        unknown = sorted(set(self.loggers()) - {"tensorboard"})
        _check(not unknown, f"log: unknown logger {', '.join(unknown)} (known: tensorboard)")
        return self

    def loggers(self) -> list[str]:
        return [x.strip() for x in self.log.split(",") if x.strip()]

    @property
    def planned(self) -> bool:
        """Whether the budget planner chooses the network: ``model.arch`` auto under a budget, no epoch count."""
        return self.model.arch == "auto" and self.train.budget is not None and self.train.epochs is None

    @property
    def holdout_max(self) -> int | None:
        """About how many images the validation split holds at most: data.val_max, and under a time budget
        data.budget_val_max as well (None: data.val_fraction alone)."""
        caps = [self.data.val_max, self.data.budget_val_max if self.train.budget is not None else None]
        caps = [c for c in caps if c is not None]
        return min(caps) if caps else None

    @property
    def budget_s(self) -> float | None:
        return None if self.train.budget is None else parse_duration(self.train.budget)

    def resolved(self) -> "FitConfig":
        """A copy with defaults that depend on other fields made explicit (what config.yaml records)."""
        cfg = dataclasses.replace(
            self, train=dataclasses.replace(self.train), model=dataclasses.replace(self.model), prune=dataclasses.replace(self.prune), adapt=dataclasses.replace(self.adapt)
        )
        if cfg.adapt.on is None:
            cfg.adapt.on = cfg.planned and not cfg.prune.enabled and not cfg.prune.target_flops
        if cfg.adapt.on or cfg.prune.target_flops:  # the controller reads what pruning removes; MorphNet shrinks first
            cfg.prune.enabled = True
        if cfg.train.epochs is None and cfg.train.budget is None and cfg.train.patience is None:
            cfg.train.epochs = 20
        if cfg.model.zero_init_residual is None:
            cfg.model.zero_init_residual = not cfg.prune.enabled
        return cfg.validate()


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


# ---- dicts, YAML and key=value overrides -------------------------------------------------------------------


def to_dict(cfg: FitConfig) -> dict:
    return dataclasses.asdict(cfg)


# floats YAML 1.1 (PyYAML) reads as strings: an exponent without a dot or without a sign (1e-3, 5e-4, 1.0e3)
_YAML11_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` (int, float, bool, str, or X | None)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # counts with a suffix, as --flops takes them: prune.target_flops=40M, train.plan_images=1M
        if isinstance(value, str) and (key.endswith("_flops") or key.endswith("_images")):
            return parse_count(value, f"config key {key}:")
        if isinstance(value, str) and _YAML11_FLOAT.fullmatch(value.strip()) and math.isfinite(float(value)):
            return float(value)  # YAML 1.1 reads 1e-3 and 5e-4 as text; 1e999 (inf) stays refused
    elif tp is str:
        if isinstance(value, bool):  # YAML reads yes/no as booleans: data.in_memory=no means the word
            return "yes" if value else "no"
        if isinstance(value, (str, int, float)):
            return str(value)
    name = getattr(tp, "__name__", str(tp))
    raise ConfigError(f"config key {key}: expected {name}, got {value!r}")


def _build(cls: type, d: dict, prefix: str = "") -> Any:
    if not isinstance(d, dict):
        raise ConfigError(f"config section {prefix.rstrip('.') or '(top)'}: expected a mapping, got {d!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((str(k) for k in set(d) - names), key=str)
    if unknown:
        raise ConfigError(f"unknown config key {prefix}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {}
    for k, v in d.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(v, tp, f"{prefix}{k}")
    return cls(**kwargs)


def from_dict(d: dict) -> FitConfig:
    return _build(FitConfig, d).validate()


# Keys added after runs were first written, with the value that reproduces how those runs trained and predicted.
# A run directory's config.yaml lacking them gets these (not the newer defaults) on resume and prediction.
RUN_DEFAULTS_BEFORE = {
    ("model", "pool"): False,
    ("train", "low_res"): 1.0,
    ("train", "tta"): False,
    ("train", "tta_shift"): 0,
    ("prune", "depth"): False,
    ("prune", "prox_every"): 1,
    ("prune", "until"): 1.0,
    ("prune", "grow_batch"): True,
    ("adapt", "shed_blocks"): False,
    ("adapt", "widen_noise"): 0.0,
    ("data", "budget_val_max"): None,  # a budget's holdout was val_fraction (and val_max) alone
    ("adapt", "on"): False,  # runs written before the adapt section existed; later ones say it explicitly
}


def load_yaml(path: str | Path, run: bool = False) -> FitConfig:
    """A config from YAML. ``run``: the file is a run directory's config.yaml, so keys it lacks because it was
    written by an older bonsai take the values that older bonsai used (:data:`RUN_DEFAULTS_BEFORE`)."""
    path = Path(path)
    try:
        d = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file (not UTF-8); a config is YAML") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: a directory; a config is a YAML file") from None
    if d is None:  # an empty file: every default
        d = {}
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys (section: key: value), got a YAML {type(d).__name__}")
    if run and isinstance(d, dict):
        for (section, key), value in RUN_DEFAULTS_BEFORE.items():
            if d.get(section) is None:  # a section an older bonsai did not have at all
                d[section] = {}
            if isinstance(d[section], dict):
                d[section].setdefault(key, value)
    try:
        return from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def save_yaml(cfg: FitConfig, path: str | Path) -> None:
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _resolve_key(key: str) -> list[str]:
    """``train.lr`` -> [train, lr]; a bare field name that lives in exactly one section (``lr``, ``epochs``) too."""
    parts = key.split(".")
    if len(parts) > 1:
        return parts
    top = {f.name: f for f in dataclasses.fields(FitConfig)}
    if key in top:
        return [key]
    default = FitConfig()
    owners = [
        name for name in top
        if dataclasses.is_dataclass(getattr(default, name))
        and key in {g.name for g in dataclasses.fields(getattr(default, name))}
    ]
    if len(owners) == 1:
        return [owners[0], key]
    if len(owners) > 1:
        raise ConfigError(f"config key {key} is ambiguous: write one of {', '.join(o + '.' + key for o in owners)}")
    raise ConfigError(f"unknown config key {key} (see `bonsai config --show`)")


def set_value(cfg: FitConfig, key: str, value: Any) -> FitConfig:
    """A copy of ``cfg`` with ``key`` (dotted or a unique bare field name) set to ``value``, type-checked."""
    d = to_dict(cfg)
    path = _resolve_key(key)
    node = d
    for p in path[:-1]:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key {key}")
        node = node[p]
    if path[-1] not in node:
        raise ConfigError(f"unknown config key {key} (see `bonsai config --show`)")
    node[path[-1]] = value
    return from_dict(d)


def parse_override(item: str) -> tuple[str, Any]:
    """``"key=value"`` -> (key, value), the value read as a YAML scalar (``3``, ``0.1``, ``true``, ``null``)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # not a scalar YAML understands: keep the text; the type check decides
    return key.strip(), value


def apply_overrides(cfg: FitConfig, items: list[str]) -> FitConfig:
    """Apply ``key=value`` strings (see :func:`parse_override`)."""
    for item in items:
        cfg = set_value(cfg, *parse_override(item))
    return cfg
