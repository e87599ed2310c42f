"""``fit(data, cfg) -> Run``: the single path that the CLI and Python both use; ``load(run_dir)`` reopens a run."""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bonsai import config as _config
from bonsai.config import FitConfig, TrainConfig
from bonsai.data.loader import Loader
from bonsai.data.sources import (
    IMAGE_EXTS,
    Dataset,
    Split,
    list_images,
    from_arrays,
    load_dataset,
    read_files,
    read_npz,
    resize_tensor,
    sample_images,
    split_hash,
    split_validation,
)
from bonsai.errors import BonsaiError, DatasetError, Interrupted
from bonsai.models.arch import DEFAULT_ARCH, ArchSpec, pooled, preset
from bonsai.models.resnet import ResNet, build, count_flops, count_params, load_model, whiten_stem_
from bonsai.train.engine import CHECKPOINT, Engine, TrainState, accuracy, make_optimizer, predict_probs, read_checkpoint, resolve_device, resolve_precision, restore
from bonsai.report.html import write_report, write_samples
from bonsai.report.log import append_jsonl, truncate_jsonl
from bonsai.train import distributed
from bonsai.train.controller import Rule
from bonsai.train.plan import adapt_start, budget_flops, plan_arch, required_epochs
from bonsai.train.resources import available_memory, check_disk, fit_batch, run_dir_bytes, train_memory_bytes
from bonsai.utils import STOP_SIGNALS, atomic_write_text, existing_ancestor

log = logging.getLogger("bonsai")

DataLike = str | os.PathLike | tuple | dict | Dataset


@dataclass
class Predictions:
    """Predicted class names and probabilities (one row per image, columns in ``classes`` order)."""

    names: list[str]
    labels: list[str]
    probs: np.ndarray
    classes: list[str]

    def to_csv(self, path: str | Path) -> None:
        """``file,label,<class 1>,...``: one row per image in the given order."""
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["file", "label", *self.classes])
        for name, label, row in zip(self.names, self.labels, self.probs):
            w.writerow([name, label, *(f"{p:.6f}" for p in row)])
        atomic_write_text(path, buf.getvalue())


PREDICT_FILE = "predict.json"  # an exported model's prediction settings (bonsai export writes it)
PREDICT_KEYS = ("precision", "tta", "tta_shift", "tta_shift_asked")  # its keys: the Run attributes of those names


def predict_settings(run: "Run") -> dict:
    """What ``bonsai export`` writes to ``predict.json``: the run's default test-time augmentation and precision."""
    return {k: getattr(run, k) for k in PREDICT_KEYS}


def _predict_settings(path: Path) -> tuple[str, bool, int, int]:
    """(precision, tta, tta_shift, asked shift) from an export's ``predict.json``; without one, an export predicts
    without TTA by default and with the default shift when asked."""
    if not path.is_file():
        return "auto", False, 0, TrainConfig.tta_shift
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BonsaiError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise BonsaiError(f"{path}: damaged (expected a JSON object, got {type(d).__name__})")
    missing = [k for k in PREDICT_KEYS if k not in d]
    if missing:
        raise BonsaiError(f"{path}: damaged (missing {', '.join(missing)})")
    precision, tta, shift, asked = (d[k] for k in PREDICT_KEYS)
    if not isinstance(tta, bool):
        raise BonsaiError(f"{path}: damaged (tta must be true or false, got {tta!r})")
    for key, v in (("tta_shift", shift), ("tta_shift_asked", asked)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise BonsaiError(f"{path}: damaged ({key} must be whole pixels >= 0, got {v!r})")
    if precision not in _config.PRECISIONS:
        raise BonsaiError(f"{path}: damaged (precision must be one of {', '.join(_config.PRECISIONS)}, got {precision!r})")
    return precision, tta, shift, asked


class Run:
    """A finished (or resumable) run directory with its best model loaded."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        if not (self.dir / "arch.json").is_file():
            raise BonsaiError(f"{self.dir}: not a bonsai run or exported model (no arch.json)")
        meta_path = self.dir / "dataset.json"
        try:
            self.meta = json.loads(meta_path.read_text())
        except FileNotFoundError:
            raise BonsaiError(f"{meta_path}: missing; cannot tell class names and image size") from None
        except ValueError as e:  # not JSON, or not UTF-8 text
            raise BonsaiError(f"{meta_path}: not valid JSON ({e})") from None
        self.model: ResNet = load_model(self.dir)
        try:
            self.classes: list[str] = [str(c) for c in self.meta["classes"]]
            self.image_size: int = int(self.meta["image_size"])
            self.channels: int = int(self.meta["channels"])
        except (KeyError, TypeError, ValueError) as e:
            raise BonsaiError(f"{meta_path}: damaged ({type(e).__name__}: {e})") from None
        if len(self.classes) != self.model.spec.num_classes:
            raise BonsaiError(f"{meta_path}: {len(self.classes)} classes, arch.json has {self.model.spec.num_classes}")
        if self.channels != self.model.spec.in_channels:
            raise BonsaiError(f"{meta_path}: {self.channels} channels, arch.json has {self.model.spec.in_channels}")
        summary = self.dir / "summary.json"
        try:
            self.summary: dict = json.loads(summary.read_text()) if summary.is_file() else {}
        except ValueError:  # not JSON, or not UTF-8 text
            self.summary = {}  # a summary is informative only
        cfg_path = self.dir / "config.yaml"
        # predict with the precision and test-time augmentation the run trained and validated with; an exported
        # model carries them in predict.json; an export written before that file existed predicts without TTA
        run_cfg = _config.load_yaml(cfg_path, run=True) if cfg_path.is_file() else None
        if run_cfg is not None:
            self.precision = run_cfg.train.precision
            self.tta = run_cfg.tta_mirror()
            self.tta_shift = run_cfg.tta_shift(self.image_size)
            # the shifts an explicit tta=True asks for: the run's own where it translated
            self.tta_shift_asked = run_cfg.tta_shift(self.image_size, tta=True)
        else:
            self.precision, self.tta, self.tta_shift, self.tta_shift_asked = _predict_settings(self.dir / PREDICT_FILE)

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r}, test_acc={self.summary.get('test_acc')})"

    def predict(
        self, images: Any, batch_size: int = 256, device: str = "auto", precision: str | None = None, tta: bool | None = None,
        tta_shift: int | None = None,
    ) -> Predictions:
        """Classify images: a uint8 array (N,H,W[,C]), an image file, a folder of images, or a list of files.

        ``tta`` (average with the mirrored image) and ``tta_shift`` (average half and half with the image shifted
        this many pixels both ways diagonally) default to what the run's final predictions used (an exported
        model: its ``predict.json``; an export without one predicts without either unless asked). ``tta=True`` asks
        for the mirror and the run's ``train.tta_shift`` (where it trained with translations; an export without
        ``predict.json``: the default shift); ``tta=False`` switches both off.

        >>> run = load("runs/demo")  # doctest: +SKIP
        >>> run.predict("photo.jpg").labels  # doctest: +SKIP
        """
        split = self._as_split(images)
        dev = resolve_device(device)
        loader = Loader(split, batch_size, dev, size=self.image_size, channels=self.channels)
        model = self.model.to(dev, memory_format=torch.channels_last)
        dtype = resolve_precision(precision or self.precision, dev)
        if tta is False:
            shift = 0
        elif tta_shift is not None:
            shift = tta_shift
        elif tta:
            shift = self.tta_shift_asked
        else:
            shift = self.tta_shift
        if shift < 0:
            raise BonsaiError(f"predict: tta_shift must be >= 0 pixels, got {shift}")
        probs = predict_probs(model, loader, dtype, self.tta if tta is None else tta, shift).numpy()
        return Predictions(split.names, [self.classes[i] for i in probs.argmax(1)], probs, self.classes)

    def _as_split(self, images: Any) -> Split:
        if isinstance(images, (np.ndarray, torch.Tensor)):
            x = torch.as_tensor(images)
            if x.dtype != torch.uint8:
                raise BonsaiError(f"predict: images must be uint8 pixels, got {x.dtype}")
            if x.ndim == 3:
                x = x[..., None]
            if x.ndim != 4 or x.shape[-1] != self.channels:
                raise BonsaiError(f"predict: expected (N,H,W,{self.channels}) images, got {tuple(x.shape)}")
            if len(x) == 0:
                raise BonsaiError(f"predict: no images (an array of shape {tuple(x.shape)})")
            x = resize_tensor(x.permute(0, 3, 1, 2).contiguous(), self.image_size)
            return Split(names=[str(i) for i in range(len(x))], y=None, x=x)
        if isinstance(images, (list, tuple)):
            files, root = [Path(p) for p in images], None
        else:
            p = Path(images)
            if not p.exists():
                raise BonsaiError(f"{p}: no such file or folder")
            if p.suffix.lower() == ".npz":
                z = read_npz(p, ("x_test", "x"))
                key = "x_test" if "x_test" in z else "x" if "x" in z else None
                if key is None:
                    raise BonsaiError(f"{p}: expected an array x_test or x")
                try:
                    return self._as_split(z[key])
                except BonsaiError as e:  # the array's dtype or shape, named with the file it came from
                    raise BonsaiError(f"{p} ({key}): {str(e).removeprefix('predict: ')}") from None
            files, root = (list_images(p), p) if p.is_dir() else ([p], p.parent)
        if not files:
            raise BonsaiError(f"{images}: no images found ({', '.join(sorted(IMAGE_EXTS))})")
        split, bad = read_files(files, root, self.image_size, self.channels)
        if bad:
            log.warning("skipped %d unreadable image(s): %s", len(bad), "; ".join(f"{f} ({why})" for f, why in bad[:5]))
        if not len(split):
            raise BonsaiError(f"{images}: none of the images could be read")
        return split


def load(run_dir: str | Path) -> Run:
    """Reopen a run directory (or an exported model folder) for prediction.

    >>> run = bonsai.load("runs/demo")  # doctest: +SKIP
    """
    return Run(run_dir)


# ---- fit -----------------------------------------------------------------------------------------------------


def _make_config(cfg: FitConfig | str | Path | None, overrides: dict[str, Any]) -> FitConfig:
    if cfg is None:
        cfg = FitConfig()
    elif isinstance(cfg, (str, Path)):
        cfg = _config.load_yaml(cfg)
    for k, v in overrides.items():
        cfg = _config.set_value(cfg, k, v)
    return cfg.resolved()


def read_dataset(data: DataLike, cfg: FitConfig, progress: bool = False) -> Dataset:
    """The dataset for ``data`` (a path, arrays, or an already read Dataset), read with ``cfg.data``'s rules."""
    if isinstance(data, Dataset):
        return data
    d = cfg.data
    if isinstance(data, (tuple, dict)):
        if isinstance(data, tuple):  # (x_train, y_train[, x_test[, y_test]])
            data = {k: v for k, v in zip(("x_train", "y_train", "x_test", "y_test"), data) if v is not None}
        return from_arrays({k: np.asarray(v) for k, v in data.items()}, d.image_size, d.max_image_size)
    return load_dataset(data, d.image_size, d.max_image_size, d.in_memory, d.memory_budget_gb, d.max_bad_fraction, progress)


def _default_out(data: DataLike) -> Path:
    name = Path(str(data)).stem if isinstance(data, (str, os.PathLike)) else "arrays"
    return Path("runs") / f"{name or 'data'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_writable(out: Path) -> None:
    """Fail early, before reading data or training, if the run directory could not be created or written."""
    existing = existing_ancestor(out)
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise BonsaiError(f"{out}: cannot create or write the run directory ({existing} is not a writable folder)")


def _make_run_dir(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BonsaiError(f"{out}: cannot create the run directory ({e.strerror or e})") from None


def fit(data: DataLike, cfg: FitConfig | str | Path | None = None, resume: str | Path | None = None, **overrides) -> Run | None:
    """Train on ``data`` and return the finished Run.

    Under ``torchrun`` (or inside a started process group) every rank calls ``fit`` with the same arguments and
    trains its share of each batch with DistributedDataParallel (:mod:`bonsai.train.distributed`); rank 0 writes
    the run directory and returns the Run, the other ranks return None.

    Args:
        data: dataset path (folder, CSV or .npz), or arrays ``(x_train, y_train[, x_test[, y_test]])``.
        cfg: a FitConfig, or a path to a YAML config; None for defaults.
        resume: a run directory to continue from its last checkpoint (its config.yaml is used).
        **overrides: config fields by dotted or unique bare name, e.g. ``epochs=5``, ``arch="resnet20"``.

    >>> run = bonsai.fit("data/", epochs=5, arch="resnet20")  # doctest: +SKIP
    >>> run.summary["val_acc"]  # doctest: +SKIP
    """
    if resume is not None:
        out = Path(resume)
        if not (out / "config.yaml").is_file():
            raise BonsaiError(f"{out}: not a run directory (no config.yaml) to resume")
        cfg = _make_config(_config.load_yaml(out / "config.yaml", run=True), overrides)
        cfg.out = str(out)
    else:
        cfg = _make_config(cfg, overrides)
    if data is None:
        data = cfg.data.path
    if data is None:
        raise BonsaiError("fit needs a dataset: give DATA (or a config that names data.path)")
    dist = distributed.current(cfg.train.device)
    progress = not cfg.quiet and dist.main
    if not dist.main:  # rank 0 speaks for the job
        log.setLevel(logging.ERROR)
    out = Path(cfg.out) if cfg.out else _default_out(data)
    if dist.on:  # a default name carries the time: rank 0's
        out = Path(dist.broadcast_json(str(out)))
    if resume is None and (out / CHECKPOINT).exists():
        raise BonsaiError(f"{out}: already holds a run; use --resume {out} to continue it or choose another --out")
    _check_writable(out)
    ds = read_dataset(data, cfg, progress)
    if dist.on:  # every rank read the data itself: they must have read the same
        mine = {"fingerprint": ds.fingerprint(), "train": len(ds.train), "test": 0 if ds.test is None else len(ds.test)}
        rank0 = dist.broadcast_json(mine)
        if dist.any(mine != rank0):
            raise DatasetError(f"{ds.source}: the ranks read different datasets ({rank0} on rank 0); every machine needs the same files")
    if ds.kind != "arrays":
        cfg.data.path = str(ds.source.resolve())
    cfg.out = str(out)
    device = dist.device(resolve_device(cfg.train.device))
    if dist.on:  # precision=auto resolves per machine; rank 0's choice holds for all
        names = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
        cfg.train.precision = dist.broadcast_json(names[resolve_precision(cfg.train.precision, device)])
    teacher = _teacher(cfg, ds, device)  # before anything is written: a wrong teacher leaves no run behind
    # a batch size given on resuming replaces the one the run had reached (after pruning or an out-of-memory cut)
    new_batch = resume is not None and any(k.split(".")[-1] == "batch_size" for k in overrides)
    args = (cfg, ds, device, teacher, resume, progress, dist, new_batch)
    if dist.main:
        _make_run_dir(out)
        return _fit(out, out, *args)
    if cfg.train.rank_dir is not None:  # ranks other than 0 keep their own copy of the run (see train.rank_dir)
        work = Path(cfg.train.rank_dir) / f"rank{dist.rank}"
        _make_run_dir(work)
        (work / CHECKPOINT).unlink(missing_ok=True)  # a copy from an earlier run would be a wrong rollback point
        return _fit(work, out, *args)
    with tempfile.TemporaryDirectory(prefix=f"bonsai-rank{dist.rank}-") as tmp:
        return _fit(Path(tmp), out, *args)


def _spec(name: str, cfg: FitConfig, ds, planned: bool = False) -> ArchSpec:
    """The preset or arch.json ``name`` for the dataset, pooled where ``model.pool`` asks (None: if ``planned``)."""
    spec = preset(name, len(ds.classes), ds.channels, ds.image_size)
    return pooled(spec) if (planned if cfg.model.pool is None else cfg.model.pool) else spec


WHITEN_IMAGES = 2000  # images whose patches set the whitened stem (model.whiten_stem)


def _whiten_stem(model: ResNet, train_split, ds: Dataset, seed: int, dist: distributed.Dist) -> int:
    """``whiten_stem_`` on the training images; returns how many filters it set. Under torchrun rank 0 decodes the
    sample (a streamed dataset reads it from files) and finds the filters, and the other ranks take them from it,
    bit for bit (JSON carries a float32 exactly), without decoding anything."""
    whitened = 0
    if dist.main:
        whitened = whiten_stem_(model, sample_images(train_split, WHITEN_IMAGES, ds.image_size, ds.channels, seed), WHITEN_IMAGES, seed)
    if dist.on:
        stem = model.stem[0].weight
        whitened, w = dist.broadcast_json([whitened, stem.detach().flatten().tolist()] if dist.main else None)
        stem.data.copy_(torch.tensor(w, dtype=stem.dtype).view_as(stem))
    return whitened


def _fit(work: Path, out: Path, cfg: FitConfig, ds: Dataset, device, teacher, resume, progress: bool, dist: distributed.Dist, new_batch: bool) -> Run | None:
    """fit, once the run directory ``out`` is chosen: ``work`` is where this process writes (``out`` on rank 0)."""

    torch.manual_seed(cfg.seed)
    tr_idx, va_idx = split_validation(ds.train.y, cfg.data.val_fraction, cfg.seed, cfg.holdout_max)
    if len(va_idx) == 0:
        raise DatasetError(f"{ds.source}: no class has two or more images, so none can be held out for validation")
    train_split, val_split = ds.train.subset(tr_idx), ds.train.subset(va_idx)
    meta = ds.meta() | {"val_images": len(val_split), "val_split": split_hash(va_idx), "train_images_used": len(train_split)}
    held = None  # the checkpoint a resumed run continues from, read once
    if resume is not None:  # checked before the run directory's dataset.json and config.yaml are rewritten
        check_same_data(out / "dataset.json", meta, "cannot resume")
        if (out / CHECKPOINT).exists():
            held = read_checkpoint(out / CHECKPOINT)
            if (held[0].num_classes, held[0].in_channels) != (len(ds.classes), ds.channels):
                raise BonsaiError(
                    f"{out / CHECKPOINT}: a network for {held[0].num_classes} classes and {held[0].in_channels} channels; "
                    f"the data has {len(ds.classes)} and {ds.channels}: cannot resume on it"
                )
    atomic_write_text(work / "dataset.json", json.dumps(meta, indent=1) + "\n")
    _config.save_yaml(cfg, work / "config.yaml")
    if dist.main and not (out / "samples.png").is_file():
        _best_effort("the sample images", write_samples, train_split, ds.classes, out / "samples.png", ds.image_size, ds.channels)

    if resume is not None and held is None:
        log.info("%s: killed before its first checkpoint; starting it again from the beginning", out)
        resume = None
    plan = None
    target = None  # --adapt under a time budget: the FLOP target the budget affords (bonsai.train.plan)
    a, t = cfg.adapt, cfg.train
    budget_target = a.on and a.budget_target and cfg.budget_s is not None and t.epochs is None and not cfg.prune.target_flops and resume is None
    if cfg.planned and resume is None:
        base = _spec(DEFAULT_ARCH, cfg, ds, planned=True)
        plan = plan_arch(
            base, len(train_split), cfg.budget_s,
            t.batch_size, device, resolve_precision(t.precision, device), t.channels_last, t.low_res, t.low_res_share,
            required_epochs(t.plan_epochs, t.plan_images, len(train_split)),
        )
        spec = plan.spec
        if budget_target:  # --adapt grows to the planner's pick from a narrower multiplier
            spec, target = adapt_start(plan, base, a.widen_factor, Rule.flops_tolerance)
        if dist.on:  # each rank timed its own probes; rank 0's plan holds for all
            spec = ArchSpec.from_dict(dist.broadcast_json(spec.to_dict()))
            if target is not None:
                target = dist.broadcast_json(target)
        torch.manual_seed(cfg.seed)  # the probes drew random numbers; the run starts from the seed's weights
        log.info(
            "planned %s (widths x%g%s): about %.0f epochs in the budget (probe %.1f s)",
            plan.spec.name, plan.multiplier, ", conv-pool downsampling" if any(s.pool for s in spec.stages) else "", plan.expected_epochs, plan.probe_s,
        )
        if target is not None and target["start_multiplier"] < target["plan_multiplier"]:
            log.info("--adapt: starting from %s (%.1fM FLOPs per image), to grow to the planned %.1fM", spec.name, target["start_flops"] / 1e6, target["target_flops"] / 1e6)
        elif target is not None:
            log.info("--adapt: starting at the pick (%.1fM FLOPs per image): a narrower start would floor widths at 16", target["target_flops"] / 1e6)
    else:
        spec = _spec(DEFAULT_ARCH if cfg.model.arch == "auto" else cfg.model.arch, cfg, ds)
    if budget_target and target is None:
        target = budget_flops(
            spec, len(train_split), cfg.budget_s, t.batch_size, device, resolve_precision(t.precision, device), t.channels_last,
            t.low_res, t.low_res_share, required_epochs(t.plan_epochs, t.plan_images, len(train_split)),
        )
        if dist.on:  # each rank timed its own probe; rank 0's target holds for all
            target = dist.broadcast_json(target)
        torch.manual_seed(cfg.seed)  # the probe drew random numbers; the run starts from the seed's weights
        log.info("--adapt: the budget affords about %.1fM FLOPs per image (the start has %.1fM)", target["target_flops"] / 1e6, target["start_flops"] / 1e6)
    model = build(spec, cfg.model.zero_init_residual, mean=tuple(ds.mean), std=tuple(ds.std))
    whitened = _whiten_stem(model, train_split, ds, cfg.seed, dist) if cfg.model.whiten_stem and resume is None else 0
    state = None
    ckpt_tensors = None
    if resume is not None:
        spec, state, model_t, opt_t = held
        if new_batch:
            state.batch_size = None
        model = ResNet(spec)
        ckpt_tensors = (model_t, opt_t)
        for name in ("metrics.jsonl", "events.jsonl"):  # lines of the epoch that is about to be replayed go
            if dist.main:
                truncate_jsonl(out / name, lambda r: r.get("epoch", 0) <= state.epoch)
            else:
                atomic_write_text(work / name, "")
        log.info("resuming %s after epoch %d", out, state.epoch)
    else:
        for name in ("metrics.jsonl", "events.jsonl"):
            atomic_write_text(work / name, "")
        if plan is not None:
            append_jsonl(work / "events.jsonl", plan.event())
        if target is not None:
            append_jsonl(work / "events.jsonl", target)
            state = TrainState(target_flops=target["target_flops"])
        if whitened:
            append_jsonl(work / "events.jsonl", {"event": "whiten_stem", "epoch": 0, "filters": whitened})
    model = model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    opt = make_optimizer(model, cfg)
    if ckpt_tensors is not None:
        restore(model, opt, *ckpt_tensors, source=str(out / CHECKPOINT))

    n_test = 0 if ds.test is None else len(ds.test)
    check_disk(work, run_dir_bytes(sum(t.numel() for t in model.state_dict().values()), n_test, len(ds.classes)))
    batch = dist.min_int(_memory_batch(model, cfg, device, work, fresh=resume is None))
    if batch < dist.world:
        raise BonsaiError(f"batch {batch} is smaller than the {dist.world} ranks: each rank needs at least one image per step")

    translate = cfg.augment.pixels(ds.image_size)
    common = dict(device=device, channels_last=cfg.train.channels_last, size=ds.image_size, channels=ds.channels, workers=cfg.data.workers)
    shard = dict(rank=dist.rank, world=dist.world)
    train_loader = Loader(train_split, batch, train=True, translate=translate, flip=cfg.augment.flip, alternate_flip=cfg.augment.alternate_flip, seed=cfg.seed, **common, **shard)

    def eval_loaders(**shard) -> tuple[Loader, Loader | None]:
        val = Loader(val_split, cfg.train.eval_batch_size, **common, **shard)
        return val, Loader(ds.test, cfg.train.eval_batch_size, **common, **shard) if ds.test is not None else None

    val_loader, test_loader = eval_loaders(**shard)

    def write_predictions(probs: torch.Tensor) -> None:
        p = probs.numpy()
        Predictions(ds.test.names, [ds.classes[i] for i in p.argmax(1)], p, ds.classes).to_csv(work / "predictions.csv")

    engine = Engine(
        model, cfg, work, train_loader, val_loader, test_loader, device, state=state, opt=opt, teacher=teacher,
        on_best=write_predictions if cfg.anytime_predictions else None, dist=dist,
    )
    state = engine.run(progress=progress)
    if not dist.main:
        return None
    if dist.on:  # the final predictions are rank 0's alone, over whole splits
        val_loader, test_loader = eval_loaders()
    return _finish(out, cfg, ds, state, val_loader, test_loader, device, dist.world)


def _teacher(cfg: FitConfig, ds: Dataset, device: torch.device) -> ResNet | None:
    """The distillation teacher named by distill.teacher (a run directory or exported model), frozen."""
    if cfg.distill.teacher is None:
        return None
    teacher = Run(cfg.distill.teacher)
    cfg.distill.teacher = str(teacher.dir.resolve())  # config.yaml re-runs and resumes from anywhere
    if teacher.classes != ds.classes or teacher.channels != ds.channels:
        raise BonsaiError(
            f"{teacher.dir}: the teacher predicts {len(teacher.classes)} classes from {teacher.channels}-channel "
            f"images; this dataset has {len(ds.classes)} classes ({ds.channels} channels) and they must match, names included"
        )
    if teacher.image_size != ds.image_size:
        raise BonsaiError(
            f"{teacher.dir}: the teacher works on {teacher.image_size}px images, this dataset on {ds.image_size}px; "
            f"set data.image_size={teacher.image_size} to train at the teacher's size"
        )
    model = teacher.model.to(device, memory_format=torch.channels_last if cfg.train.channels_last else torch.contiguous_format)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def _memory_batch(model: ResNet, cfg: FitConfig, device: torch.device, out: Path, fresh: bool) -> int:
    """train.batch_size, or a smaller one when its estimated step would not fit in the memory available."""
    half = resolve_precision(cfg.train.precision, device) is not None
    want, params, free = cfg.train.batch_size, count_params(model), available_memory(device)
    batch = fit_batch(model.spec, want, half, params, free)
    if batch < want:
        need = train_memory_bytes(model.spec, want, half, params)
        log.warning(
            "batch %d would need about %.1f GB for a training step and %.1f GB are available: training at batch %d",
            want, need / 2**30, free / 2**30, batch,
        )
        if fresh:
            event = {"epoch": 0, "event": "batch_capped", "batch_size_wanted": want, "batch_size": batch, "estimated_bytes": need, "available_bytes": free}
            append_jsonl(out / "events.jsonl", event)
    return batch


def check_same_data(path: Path, meta: dict, consequence: str) -> None:
    """The data described by ``meta`` (:meth:`Dataset.meta`, with ``val_images`` where the split is drawn) must be
    the run's (its ``dataset.json`` at ``path``): the same images, classes and size, and the same holdout (its size
    and a hash of its indices, ``val_split``), or its validation split and labels would change. A resumed run and
    ``bonsai compress`` both check it;
    keys missing on either side are not compared; ``consequence`` ends the error."""
    try:
        old = json.loads(path.read_text())
    except FileNotFoundError:
        return  # killed before dataset.json was written: nothing to compare with
    except ValueError as e:  # written atomically, so damaged by hand: the data cannot be checked
        raise BonsaiError(f"{path}: damaged ({e}); cannot check that the dataset is the one this run started with") from None
    if not isinstance(old, dict):
        raise BonsaiError(f"{path}: damaged (not a JSON object); cannot check that the dataset is the one this run started with")
    for key in ("fingerprint", "classes", "channels", "image_size"):
        if key in old and key in meta and old[key] != meta[key]:
            raise BonsaiError(f"{path}: the dataset differs from the one this run started with ({key} changed); {consequence}")
    # the fingerprint hashes names and labels; an array dataset's names are row numbers, so other pixels under the
    # same labels show only in the per-channel statistics (exact over its training images, which are in memory)
    arrays = old.get("kind") == meta.get("kind") and meta.get("kind") in ("npz", "arrays")
    for key in ("mean", "std") if arrays else ():
        a, b = old.get(key), meta.get(key)
        if isinstance(a, list) and isinstance(b, list) and (len(a) != len(b) or not all(_close(u, v) for u, v in zip(a, b))):
            raise BonsaiError(f"{path}: the dataset differs from the one this run started with (its pixels' {key} changed); {consequence}")
    if "val_images" in old and "val_images" in meta and old["val_images"] != meta["val_images"]:
        # the holdout follows data.val_fraction, data.val_max and, under a budget, data.budget_val_max: another
        # split validates on other images, or on images the run has trained on
        raise BonsaiError(
            f"{path}: the run held out {old['val_images']} validation images, these settings hold out {meta['val_images']} "
            f"(data.val_fraction, data.val_max, data.budget_val_max or --budget changed); {consequence}"
        )
    if "val_split" in old and "val_split" in meta and old["val_split"] != meta["val_split"]:
        # as many images, other ones: validation would score images the run has trained on
        raise BonsaiError(f"{path}: these settings draw another validation split than the run's (seed or data.val_fraction changed, or config.yaml was edited); {consequence}")


def _close(a, b) -> bool:
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-4, abs_tol=1e-3)
    except (TypeError, ValueError):
        return False


def _best_effort(what: str, fn, *args) -> None:
    """Run a step whose failure must not lose a finished training run: a warning instead of an error."""
    try:
        fn(*args)
    except Exception as e:  # noqa: BLE001 - reports and pictures never cost the user the trained model
        log.warning("could not write %s: %s", what, e)


def _finish(out: Path, cfg: FitConfig, ds: Dataset, state: TrainState, val_loader: Loader, test_loader: Loader | None, device, world: int = 1) -> Run:
    """Predict the test set with the best model; write predictions.csv and summary.json."""
    if not (out / "model.safetensors").is_file():
        if state.stop_reason in STOP_SIGNALS:
            raise Interrupted(
                f"{out}: stopped by {state.stop_reason.upper()} before the first epoch finished; "
                f"continue with `bonsai fit --resume {out}`",
                STOP_SIGNALS[state.stop_reason],
            )
        raise BonsaiError(f"{out}: training produced no usable model ({state.stop_reason or 'no epoch finished'})")
    run = Run(out)
    model = run.model.to(device, memory_format=torch.channels_last)
    dtype = resolve_precision(cfg.train.precision, device)
    tta, shift = run.tta, run.tta_shift
    probs_v = predict_probs(model, val_loader, dtype, tta, shift)
    summary = {
        "stop_reason": state.stop_reason,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch,
        # the best model's accuracy with the final predictions' views
        "val_acc": accuracy(probs_v, val_loader.split.y) if len(val_loader.split) else state.best_val,
        # as measured after that epoch (with the mirror only); None: the network shrank after the last validation
        "best_epoch_val_acc": state.best_val if state.best_val >= 0 else None,
        "test_acc": None,
        "train_time_s": round(state.train_time_s, 2),
        "clock_s": round(state.clock_s, 2),
        "train_flops": state.train_flops,
        # achieved training FLOP/s: 3x the network's forward FLOPs per image (plus a teacher's forward pass when
        # distilling), at the size each step used, over the time spent in training steps
        "train_gflops_per_s": round(state.train_flops / max(state.train_time_s, 1e-9) / 1e9, 2),
        "tta": tta,
        "tta_shift": shift,
        "flops_per_image": count_flops(model.spec),
        "params": count_params(model),
        "arch": model.spec.name,
        "widths": model.spec.widths(),
        "device": str(device),
        "precision": str(dtype or "fp32").replace("torch.", ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "world_size": world,  # processes that trained (torchrun); threads is per process
    }
    confusion = {"classes": ds.classes, "val": _confusion(probs_v, val_loader.split.y, len(ds.classes))}
    if test_loader is not None:
        t0 = time.perf_counter()
        probs_t = predict_probs(model, test_loader, dtype, tta, shift)
        probs = probs_t.numpy()
        summary["predict_s"] = round(time.perf_counter() - t0, 2)
        preds = Predictions(ds.test.names, [ds.classes[i] for i in probs.argmax(1)], probs, ds.classes)
        preds.to_csv(out / "predictions.csv")
        if ds.test.y is not None:
            summary["test_acc"] = accuracy(probs_t, ds.test.y)
            confusion["test"] = _confusion(probs_t, ds.test.y, len(ds.classes))
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "confusion.json", json.dumps(confusion) + "\n")
    if cfg.report:
        _best_effort("report.html", write_report, out)
    run.summary = summary
    return run


def _confusion(probs: torch.Tensor, y: torch.Tensor, n: int) -> list[list[int]]:
    """counts[true][predicted]"""
    flat = y.cpu() * n + probs.argmax(1)
    return torch.bincount(flat, minlength=n * n).reshape(n, n).tolist()
