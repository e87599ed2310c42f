"""The training engine: epochs of SGD under autocast, evaluation, stopping rules, and resumable checkpoints."""

from __future__ import annotations

import copy
import gc
import json
import logging
import math
import signal
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn
from torch.nn import functional as F

from bonsai.config import FitConfig
from bonsai.data.augment import resize_batch, shift_batch
from bonsai.data.loader import Loader
from bonsai.errors import BonsaiError
from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import ResNet, count_flops, count_params, load_state, save_model
from bonsai.report.log import append_jsonl
from bonsai.surgery.channels import channel_groups, remove_channels_
from bonsai.surgery.depth import branch_constant, dead_blocks, layout, remove_blocks_
from bonsai.surgery.grow import deepen_, widen_
from bonsai.surgery.morphnet import block_strength, blocks_to_shed, fit_widths, resize_, set_field, spec_flops, without_blocks
from bonsai.train.controller import Decision, Rule, Signals, decide
from bonsai.surgery.prune import GroupLasso, plan_keep
from bonsai.train.distill import distillation_loss
from bonsai.train.distributed import Dist
from bonsai.train.resources import available_memory, fit_batch
from bonsai.train.schedule import Clock, lr_factor, train_size
from bonsai.utils import atomic_write_bytes

log = logging.getLogger("bonsai")

CHECKPOINT = "checkpoint.safetensors"
_FORMAT = "bonsai-checkpoint-1"


# ---- device and precision ----------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BonsaiError(f"train.device={name}: CUDA is not available on this machine")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise BonsaiError(f"train.device={name}: not a device bonsai trains on; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BonsaiError(f"train.device={name}: this machine has {torch.cuda.device_count()} CUDA device(s), numbered from 0")
    return device


def _cpu_has_bf16() -> bool:
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((probe and probe()) or (amx and amx()))


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "fp32":
        return None
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.bfloat16 if _cpu_has_bf16() else None
    if name == "fp16" and device.type == "cpu":
        raise BonsaiError("train.precision=fp16 is for CUDA; use bf16 or fp32 on the CPU")
    return torch.bfloat16 if name == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


# ---- state ------------------------------------------------------------------------------------------------


def is_out_of_memory(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError (``DefaultCPUAllocator: not enough memory``)."""
    if isinstance(e, torch.OutOfMemoryError):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(k in msg for k in ("not enough memory", "out of memory", "can't allocate memory"))


class Diverged(Exception):
    """A training step produced a non-finite loss or gradient; nothing of that step was applied."""


@dataclass
class TrainState:
    """Everything besides tensors that a resumed run needs (stored in the checkpoint's metadata)."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    clock_s: float = 0.0  # the budget clock: training steps + validation + checkpoints + anytime predictions
    train_time_s: float = 0.0  # training steps only
    images_seen: int = 0
    train_flops: float = 0.0  # 3 x forward FLOPs per image seen (backward counted as twice the forward)
    best_val: float = -1.0
    best_epoch: int = 0
    stale_epochs: int = 0  # epochs since the validation accuracy last improved
    stop_reason: str = ""
    batch_size: int | None = None  # current training batch (grows after pruning); None: train.batch_size
    lasso_lambda: float | None = None  # PruneTrain's lambda, fixed at the first step
    start_flops: int | None = None  # forward FLOPs per image of the network the run started with
    grad_scale: float | None = None  # fp16 loss scale (CUDA only), so a resumed run does not re-learn it
    rollbacks: int = 0  # divergences recovered from by rolling back to the last checkpoint
    lr_scale: float = 1.0  # product of the LR cuts made by rollbacks
    reserve_s: float = 0.0  # seconds kept back from the budget for predicting the test set at the end
    block_ids: list[list[int]] | None = None  # per stage, the ids of its blocks (starting network: 0..depth-1)
    # --adapt: the controller's memory
    val_hist: list[float] = field(default_factory=list)  # validation accuracy per epoch
    train_hist: list[float | None] = field(default_factory=list)  # training accuracy per epoch (None: low resolution)
    pruned_log: list[list] = field(default_factory=list)  # per reconfiguration: [epoch, channels per stage before, after]
    penalized_epochs: list[int] = field(default_factory=list)  # epochs whose steps applied the penalty
    penalty_until: int = 0  # a prune decision applies the penalty through this epoch
    growths: int = 0  # widen / deepen decisions carried out
    grown_at: int = 0  # the epoch after which the last growth was made (0: none)
    shrunk_at: int = 0  # the epoch after which MorphNet's step last shrank the network (0: never)
    block_next: list[int] = field(default_factory=list)  # per stage, the id an inserted block gets (see block_ids)
    target_flops: float | None = None  # the FLOP target a time budget affords (adapt.budget_target), fixed at the start
    sized: bool = False  # the sizing phase's closing step to the target has run
    # [epoch, whether it is before prune.until], fixed at the end of the epoch before (see Engine._penalty_on) and
    # kept in the checkpoint, so a resumed run agrees with the reconfiguration its last epoch already planned
    next_penalty: list | None = None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv/linear weights only; BN scales/shifts and biases are not decayed."""
    decay, no_decay = [], []
    for p in model.parameters():
        (decay if p.ndim > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, cfg: FitConfig) -> torch.optim.SGD:
    t = cfg.train
    return torch.optim.SGD(
        param_groups(model, t.weight_decay), lr=t.lr, momentum=t.momentum, nesterov=t.nesterov and t.momentum > 0
    )


# ---- checkpoints -------------------------------------------------------------------------------------------


def save_checkpoint(path: Path, model: ResNet, opt: torch.optim.Optimizer, state: TrainState) -> None:
    """One file, written atomically: weights, momentum buffers by parameter name, arch and state as metadata."""
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            buf = opt.state.get(p, {}).get("momentum_buffer")
            if buf is not None:
                tensors[f"opt.{names[id(p)]}.momentum_buffer"] = buf.detach().contiguous().cpu()
    meta = {"format": _FORMAT, "arch": json.dumps(model.spec.to_dict()), "state": json.dumps(asdict(state))}
    try:
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as e:
        after = (
            f"the previous one is intact, and `bonsai fit --resume {path.parent}` continues from it"
            if path.is_file()
            else "no checkpoint was written yet"
        )
        raise BonsaiError(f"{path}: cannot write the checkpoint ({e.strerror or e}); {after}") from None


def read_checkpoint(path: Path) -> tuple[ArchSpec, TrainState, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(spec, state, model tensors, momentum buffers by parameter name); no pickle involved."""
    if not path.is_file():
        raise BonsaiError(f"{path}: no checkpoint to resume from")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any decoding failure is one clear error
        raise BonsaiError(f"{path}: unreadable checkpoint ({e})") from None
    if meta.get("format") != _FORMAT:
        raise BonsaiError(f"{path}: not a bonsai checkpoint")
    try:
        spec = ArchSpec.from_dict(json.loads(meta["arch"]), source=f"{path} (arch)")
        state = TrainState(**json.loads(meta["state"]))
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise BonsaiError(f"{path}: damaged checkpoint metadata ({e})") from None
    model_t = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    opt_t = {k[4 : -len(".momentum_buffer")]: v for k, v in tensors.items() if k.startswith("opt.")}
    return spec, state, model_t, opt_t


def restore(model: ResNet, opt: torch.optim.Optimizer, model_t: dict, opt_t: dict, source: str) -> None:
    load_state(model, model_t, source)
    params = dict(model.named_parameters())
    for name, buf in opt_t.items():
        if name not in params or params[name].shape != buf.shape:
            raise BonsaiError(f"{source}: momentum buffer {name} does not match the model")
        opt.state[params[name]]["momentum_buffer"] = buf.to(params[name].device).clone()


# ---- evaluation ---------------------------------------------------------------------------------------------


def predict_probs(model: nn.Module, loader: Loader, dtype: torch.dtype | None, tta: bool = False, shift: int = 0) -> torch.Tensor:
    """Softmax probabilities (N, classes), float32 on the CPU, in the loader's order; see :func:`predict_views`."""
    return predict_views(model, loader, dtype, tta, shift).probs


class Views(NamedTuple):
    """What :func:`predict_views` returns."""

    probs: torch.Tensor  # with the test-time views asked for
    plain: torch.Tensor  # of the plain view alone: each image's first forward pass, as without any views
    plain_s: float  # seconds spent loading the images and on their plain view: what a pass without views costs


@torch.no_grad()
def predict_views(model: nn.Module, loader: Loader, dtype: torch.dtype | None, tta: bool = False, shift: int = 0) -> Views:
    """Softmax probabilities (N, classes), float32 on the CPU, in the loader's order, with the test-time views
    asked for and of the plain view alone (free: it is the first of the views), and the plain view's seconds.

    Test-time augmentation: with ``tta``, each image's probabilities are averaged with its left-right mirror's
    (twice the work). With ``shift`` > 0, the result is averaged half and half with the same prediction for the
    image shifted by ``shift`` pixels down-right and up-left (zero filled, as training's random translation fills),
    as in airbench's flip-and-translate TTA: three times the work again.
    """
    was_training = model.training
    model.eval()
    out, plain = [], []
    plain_s = 0.0

    def views(xb: torch.Tensor, p: torch.Tensor | None = None) -> torch.Tensor:
        p = F.softmax(model(xb).float(), dim=1) if p is None else p
        return 0.5 * (p + F.softmax(model(xb.flip(3)).float(), dim=1)) if tta else p

    more = tta or shift > 0
    t = time.perf_counter()
    for xb, _ in loader.batches():  # the clock runs from the end of the last batch: loading this one counts
        with autocast(loader.device, dtype):
            p0 = F.softmax(model(xb).float(), dim=1)
            plain.append(p0.cpu())  # on a GPU the copy waits for the pass, so the time below is the pass's
            plain_s += time.perf_counter() - t
            if more:
                p = views(xb, p0)
                if shift > 0:
                    p = 0.5 * p + 0.25 * (views(shift_batch(xb, shift, shift)) + views(shift_batch(xb, -shift, -shift)))
                out.append(p.cpu())
        t = time.perf_counter()
    model.train(was_training)
    if not plain:
        empty = torch.zeros(0, model.spec.num_classes)
        return Views(empty, empty, plain_s)
    first = torch.cat(plain)
    return Views(torch.cat(out) if more else first, first, plain_s)


def lookahead_state(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(tensor, average) pairs for every floating-point weight and buffer of ``model``; the averages start as copies."""
    return [(t, t.detach().clone()) for t in model.state_dict().values() if t.is_floating_point()]


@torch.no_grad()
def lookahead_(pairs: list[tuple[torch.Tensor, torch.Tensor]], decay: float) -> None:
    """One lookahead step: each average moves to ``lerp(average, tensor, 1 - decay)`` and the tensor (the model's own
    storage) takes the average's value."""
    for t, avg in pairs:
        avg.lerp_(t.detach(), 1.0 - decay)
        t.copy_(avg)


def tta_views(tta: bool, shift: int) -> int:
    """Forward passes per image that :func:`predict_probs` makes with these settings."""
    return (2 if tta else 1) * (3 if shift > 0 else 1)


def accuracy(probs: torch.Tensor, y: torch.Tensor) -> float:
    return float((probs.argmax(1) == y.cpu()).float().mean()) if len(y) else float("nan")


# ---- the loop -------------------------------------------------------------------------------------------------


def _finite_or_none(v):
    """JSON has no NaN: a non-finite number is logged as null."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _stage_channels(spec: ArchSpec) -> list[int]:
    """Channels per stage: its residual width plus every block's inner width (what pruning can remove)."""
    return [s.width + sum(s.inner) for s in spec.stages]


def _fmt_s(s: float) -> str:
    s = max(0, int(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class Engine:
    """Trains ``model`` on ``train`` with ``cfg``, validating on ``val``, writing into ``run_dir``.

    The run directory gets one ``metrics.jsonl`` line and a ``checkpoint.safetensors`` per epoch, and the best
    model so far (by validation accuracy) as ``arch.json`` + ``model.safetensors``.
    """

    def __init__(
        self,
        model: ResNet,
        cfg: FitConfig,
        run_dir: Path,
        train: Loader,
        val: Loader,
        test: Loader | None,
        device: torch.device,
        state: TrainState | None = None,
        opt: torch.optim.Optimizer | None = None,
        teacher: nn.Module | None = None,
        on_best=None,
        dist: Dist | None = None,
    ):
        self.model, self.cfg, self.run_dir = model, cfg, run_dir
        self.dist = dist or Dist()  # data-parallel ranks (bonsai.train.distributed); one process: no communication
        self.train_loader, self.val_loader, self.test_loader = train, val, test
        self.device = device
        self.dtype = resolve_precision(cfg.train.precision, device)
        self.opt = opt or make_optimizer(model, cfg)
        self.state = state or TrainState()
        self.step_fn: nn.Module | None = None  # what a training step calls; see _wrap
        self._wrap()
        fp16 = self.dtype == torch.float16
        init_scale = self.state.grad_scale or 2.0**16
        self.scaler = torch.amp.GradScaler(device.type, init_scale=init_scale, enabled=fp16)
        # the plan is counted in images, so a batch that grows after pruning keeps the LR schedule on track
        self.images_per_epoch0 = train.images_per_epoch  # at the configured batch, before any growth
        self.batch0 = train.batch_size  # the starting batch, after the memory cap and the data's size
        if self.state.batch_size is not None:
            train.batch_size = self.state.batch_size
        self.flops = count_flops(model.spec)
        self.teacher = teacher  # distillation: its soft targets join the loss; its forward passes count as FLOPs
        self.teacher_flops = 0 if teacher is None else count_flops(teacher.spec, model.spec.image_size)
        self._penalized = False  # whether the last epoch's steps applied the group-lasso penalty
        if self.state.start_flops is None:
            self.state.start_flops = self.flops
        self.lasso = GroupLasso(self._lpr(), self.state.lasso_lambda, cfg.prune.weighting, cfg.prune.depth, cfg.prune.groups) if cfg.prune.enabled else None
        self._signal: str | None = None  # "sigint" / "sigterm" once one arrives during run()
        self._cut_short = False  # the signal ended an epoch before its last step
        self._morph_rejected: tuple[int, float] | None = None  # (epoch, target) of the last MorphNet step no widths fit
        self._last_val: float | None = None  # the last epoch's validation accuracy, for the progress bar
        # this epoch's per-epoch test pass (off the budget clock), when there was one: its plain view's
        # probabilities and that view's seconds, from which the anytime predictions are taken and charged
        self._test_plain: tuple[torch.Tensor, float] | None = None
        self.on_best = on_best  # called with the test set's plain-view probabilities whenever validation accuracy improves
        self.tensorboard = None
        if "tensorboard" in cfg.loggers():
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise BonsaiError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
            # a resumed run drops the scalars of the epochs it is about to replay
            self.tensorboard = SummaryWriter(str(run_dir / "tensorboard"), purge_step=self.state.epoch + 1)
        self.budget = cfg.budget_s
        self._flops_cache: dict[tuple, int] = {}
        # progressive resizing needs a planned length (epochs or a budget): with only patience to stop the run,
        # the plan spans max_epochs, and most of a run cut short would never see full-size images
        self.low_res = cfg.train.low_res if cfg.train.epochs is not None or self.budget is not None else 1.0
        self._last_size = model.spec.image_size  # the input size of the last training step
        self._comm_per_step = 0.0  # gradient bytes all-reduced per step in the last epoch (distributed)
        # test-time augmentation mirrors images, so it is only right for data trained with random flips
        self.tta = cfg.tta_mirror()  # per-epoch validation: the mirror only
        # the final predictions add the shifted views (bonsai.api._finish); the budget keeps back time for them
        self._final_cost = tta_views(self.tta, cfg.tta_shift(model.spec.image_size)) / tta_views(self.tta, 0)

    def _wrap(self) -> None:
        """The callable that training steps run: the model, in DDP when distributed, compiled when asked. Built
        again after every surgery (DDP fixes its parameters when it is built)."""
        if self.dist.on and self.step_fn is not None:
            # the old wrapper's reducer holds each parameter's gradient accumulator, which remembers the old shape:
            # it must be gone before the new wrapper asks for the accumulators, or backward fails after surgery
            self.step_fn = None
            gc.collect()
        net = self.dist.wrap(self.model)
        self.step_fn = torch.compile(net) if self.cfg.train.compile else net

    def _now(self, clock: Clock) -> float:
        """The budget clock, the same on every rank (their maximum): every decision that reads time reads this."""
        return self.dist.max(clock.now())[0] if self.dist.on else clock.now()

    def _signalled(self) -> bool:
        """Whether a stop signal arrived on any rank; all ranks then stop at the same step."""
        got = self.dist.signal(self._signal)
        if got is not None:
            self._signal = got  # every rank stops with the same reason, whichever rank received it
        return got is not None

    @property
    def peak_lr(self) -> float:
        """Peak LR: train.lr is per 256 examples, scaled linearly with the batch size in use."""
        return self.cfg.train.lr * self.train_loader.batch_size / 256 * self.state.lr_scale

    # -- planning

    def _planned_epochs(self) -> int | None:
        t = self.cfg.train
        if t.epochs is not None:
            return t.epochs
        return None if self.budget is not None else t.max_epochs

    def _progress(self, clock: Clock) -> float:
        if self.budget is not None and self.cfg.train.epochs is None:
            return self._now(clock) / max(self.budget - self.state.reserve_s, 1e-9)
        return self.state.images_seen / (self._planned_epochs() * self.images_per_epoch0)

    def _out_of_time(self, clock: Clock) -> bool:
        return self.budget is not None and self._now(clock) >= self.budget - self.state.reserve_s

    def _flops_at(self, size: int, teacher: bool = False) -> int:
        """Forward FLOPs per image at input ``size`` of the network (or of the teacher; 0 without one). Cached by
        size and current FLOPs, so a pruned network is counted afresh."""
        if teacher and self.teacher is None:
            return 0
        full = self.teacher_flops if teacher else self.flops
        if size == self.model.spec.image_size:
            return full
        net = self.teacher if teacher else self.model
        key = (teacher, size, layout(net)) if isinstance(net, ResNet) else (teacher, size, full)
        if key not in self._flops_cache:
            self._flops_cache[key] = count_flops((self.teacher if teacher else self.model).spec, size)
        return self._flops_cache[key]

    # -- one epoch

    def _train_epoch(self, epoch: int, clock: Clock, bar) -> tuple[float, float, int, bool]:
        """One epoch of steps. Returns (mean loss, accuracy, images seen, stopped by the budget). Raises
        :class:`Diverged` before applying a step whose loss or gradient is not finite."""
        model, opt, st = self.model, self.opt, self.state
        model.train()
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device, dtype=torch.long)
        seen, stopped = 0, False
        smoothing = self.cfg.train.label_smoothing
        check_grads = not self.scaler.is_enabled()  # fp16's scaler skips non-finite steps by itself
        # the penalty applies to whole epochs that start before prune.until (adapt.sizing) of the planned training
        lasso = self.lasso if self.lasso is not None and self._penalty_on(epoch, clock) else None
        self._penalized = lasso is not None
        comm0, steps = self.dist.comm_bytes, 0
        t = self.cfg.train
        with clock:
            t0 = clock.now()
            # started from each epoch's (synced) weights; not under the pruning penalty, whose zeros it would undo
            ahead = lookahead_state(model) if t.lookahead > 0 and lasso is None else None
            try:
                for i, (xb, yb) in enumerate(self.train_loader.batches(epoch)):
                    progress = self._progress(clock)
                    lr = self.peak_lr * lr_factor(progress, self.cfg.train.schedule, self.cfg.train.warmup)
                    size = train_size(progress, xb.shape[-1], self.low_res, self.cfg.train.low_res_share)
                    if size != xb.shape[-1]:  # progressive resizing: the early steps see smaller images
                        xb = resize_batch(xb, size)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    with autocast(self.device, self.dtype):
                        logits = self.step_fn(xb)
                        if self.teacher is None:
                            loss = F.cross_entropy(logits.float(), yb, label_smoothing=smoothing)
                        else:
                            with torch.no_grad():
                                soft = self.teacher(xb).float()
                            d = self.cfg.distill
                            loss = distillation_loss(logits.float(), soft, yb, d.temperature, d.alpha, smoothing)
                    if self.dist.any(not bool(torch.isfinite(loss))):
                        raise Diverged(f"loss {float(loss.detach())} at step {st.step + 1}")
                    opt.zero_grad(set_to_none=True)
                    if self.dist.on and len(yb) * self.dist.world != self.train_loader.batch_size:
                        # DDP averages the ranks' mean losses with equal weight: a rank holding more of an uneven
                        # batch counts for more, so that the gradient is the batch mean's
                        self.scaler.scale(loss * (len(yb) * self.dist.world / self.train_loader.batch_size)).backward()
                    else:
                        self.scaler.scale(loss).backward()
                    if check_grads:
                        norm = nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                        if not bool(torch.isfinite(norm)):
                            raise Diverged(f"gradient norm {float(norm)} at step {st.step + 1}")
                    if lasso is not None:
                        if lasso.lam is None:
                            st.lasso_lambda = lasso.set_lambda(self.dist.mean(float(loss.detach())), model)
                            append_jsonl(self.run_dir / "events.jsonl", {"epoch": epoch, "event": "lasso", "lpr": lasso.lpr, "lambda": st.lasso_lambda})
                        if not self.cfg.prune.proximal:
                            self.scaler.unscale_(opt)  # the penalty's gradient is added at true scale
                            lasso.add_grad_(model)
                    scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
                    self.scaler.step(opt)
                    self.scaler.update()
                    skipped = self.scaler.is_enabled() and self.scaler.get_scale() < scale  # fp16 overflow: no step
                    every = self.cfg.prune.prox_every
                    if lasso is not None and self.cfg.prune.proximal and not skipped and (st.step + 1) % every == 0:
                        lasso.prox_(model, opt, steps=every)
                    n = len(yb)  # this rank's images; the step's (global) batch is the loader's batch size
                    loss_sum += loss.detach() * n
                    correct += (logits.argmax(1) == yb).sum()
                    seen += n
                    st.step += 1
                    steps += 1
                    if ahead is not None and steps % t.lookahead_every == 0:
                        lookahead_(ahead, self._lookahead_decay(progress))
                    batch = self.train_loader.batch_size if self.dist.on else n
                    st.images_seen += batch
                    st.train_flops += (3.0 * self._flops_at(size) + self._flops_at(size, teacher=True)) * batch
                    self._last_size = size
                    if bar is not None:
                        bar.update(1)
                        if i % 10 == 0:
                            rate = seen / max(clock.now() - t0, 1e-9)
                            acc = float(correct) / seen
                            val = "" if self._last_val is None else f" val {self._last_val:.1%}"
                            bar.set_postfix_str(
                                f"loss {float(loss.detach()):.3f} acc {acc:.1%}{val} lr {lr:.3f} {rate:.0f} img/s "
                                f"{self._flops_at(size) / 1e6:.1f}M FLOPs/img at {size}px",
                                refresh=False,
                            )
                    if self._out_of_time(clock):
                        stopped = True
                        break
                    if self._signalled():  # Ctrl-C / SIGTERM: this step is done; stop here
                        self._cut_short = i + 1 < len(self.train_loader)
                        break
                if ahead is not None and steps % t.lookahead_every:  # the epoch ends synced: nothing to checkpoint
                    lookahead_(ahead, self._lookahead_decay(progress))
            finally:  # a diverged epoch's time was spent too
                st.train_time_s += clock.now() - t0
        self._comm_per_step = (self.dist.comm_bytes - comm0) / max(steps, 1)
        if self.dist.on:  # the epoch's loss and accuracy over all ranks' images; BN statistics averaged
            loss_total, correct_total, seen = self.dist.sum(float(loss_sum), float(correct), seen)
            loss_sum, correct, seen = torch.tensor(loss_total), torch.tensor(correct_total), int(seen)
            self.dist.average_buffers(self.model)
        if seen == 0:
            return float("nan"), float("nan"), seen, stopped
        return float(loss_sum) / seen, float(correct) / seen, seen, stopped

    # -- PruneTrain reconfiguration

    def _lookahead_decay(self, progress: float) -> float:
        """airbench's schedule: no averaging at the start, ``lookahead ** every`` at the end (cubic in progress)."""
        t = self.cfg.train
        return t.lookahead**t.lookahead_every * min(progress, 1.0) ** 3

    def _prune_interval(self, planned: int | None, clock_s: float) -> int:
        if self.cfg.prune.interval is not None:
            return self.cfg.prune.interval
        if planned is None:  # budget: estimate the epochs that fit from the pace so far
            planned = max(1, int(self.budget / max(clock_s / self.state.epoch, 1e-9)))
        return max(1, round(0.05 * planned))

    @property
    def target_flops(self) -> float | None:
        """The FLOP target: the user's (``--flops``), else, under --adapt, the one the time budget affords."""
        return self.cfg.prune.target_flops or (self.state.target_flops if self.cfg.adapt.on else None)

    def _sizing(self) -> bool:
        """--adapt with a FLOP target: the network is moved to the target's size over the first ``adapt.sizing`` of
        the run, which replaces ``prune.until``."""
        return self.cfg.adapt.on and self.target_flops is not None

    def _until(self) -> float:
        """The share of the run whose epochs apply the penalty by schedule. With a sizing phase: ``adapt.sizing``
        when the network started over the target, else none (it grows instead; the controller's prune decisions
        still apply the penalty)."""
        if not self._sizing():
            return self.cfg.prune.until
        return self.cfg.adapt.sizing if self.state.start_flops > self.target_flops * (1 + Rule.flops_tolerance) else 0.0

    def _lpr(self) -> float:
        """The penalty's LPR: ``prune.lpr``; in a sizing phase from over the target, the share of FLOPs that must go
        (``1 - target / FLOPs``) capped at ``adapt.max_lpr``, and never below ``prune.lpr``. On 10-epoch resnet32 runs
        with the penalty over the first 20%, LPR 0.6-0.65 removed 65-79% of the FLOPs (README, PruneTrain)."""
        lpr = self.cfg.prune.lpr
        if self._sizing() and not self.state.sized and self.state.start_flops > self.target_flops:
            lpr = max(lpr, min(self.cfg.adapt.max_lpr, 1 - self.target_flops / self.state.start_flops))
        return lpr

    def _penalty_on(self, epoch: int, clock: Clock) -> bool:
        """Whether epoch ``epoch`` applies the penalty: it starts before ``prune.until`` of the planned training, or
        the controller asked for pruning through it. Decided once per epoch, at the end of the one before (see
        ``_run``), so that the reconfiguration that follows the last penalised epoch and the next epoch agree even
        when the surgery's own time moves a budget's progress past ``until``."""
        nxt = self.state.next_penalty
        if nxt is not None and nxt[0] == epoch:
            return bool(nxt[1]) or epoch <= self.state.penalty_until
        return self._progress(clock) < self._until() or epoch <= self.state.penalty_until

    def _reconfigure_due(self, epoch: int, planned: int | None, clock: Clock) -> bool:
        """After every ``interval``-th epoch that had the penalty, and after the last such epoch (the next one has
        none); never after the final epoch, whose network is the result either way."""
        if not self._penalized or self.state.stop_reason or (planned is not None and epoch >= planned):
            return False
        return epoch % self._prune_interval(planned, self._now(clock)) == 0 or not self._penalty_on(epoch + 1, clock)

    def _reconfigure(self, epoch: int, progress: bool) -> None:
        """Remove dead blocks and dead channels, grow the batch if prune.grow_batch, log the event."""
        p, st, loader = self.cfg.prune, self.state, self.train_loader
        bn_only = p.groups == "bn"
        blocks = dead_blocks(self.model, p.threshold, constant=True, bn_only=bn_only) if p.depth else []
        if self.dist.on:  # every rank carries out rank 0's plan
            blocks = [tuple(b) for b in self.dist.broadcast_json(blocks)]
        # the surgery is tried on a copy first: a result with non-finite weights or outputs is rejected
        self.opt.zero_grad(set_to_none=True)  # stale after the epoch; not worth copying
        trial = copy.deepcopy(self.model)
        remove_blocks_(trial, blocks)
        group_widths = {g.name: g.width for g in channel_groups(trial)}
        keep = plan_keep(trial, p.threshold, p.min_width, p.round_to, bn_only)
        if self.dist.on:
            keep = {k: torch.tensor(v, dtype=torch.long) for k, v in self.dist.broadcast_json({k: v.tolist() for k, v in keep.items()}).items()}
        if not keep and not blocks:  # nothing to remove: recorded all the same, as a measurement for --adapt
            st.pruned_log.append([epoch, _stage_channels(self.model.spec), _stage_channels(self.model.spec)])
            return
        widths_before, flops_before, batch_before = self.model.spec.widths(), self.flops, loader.batch_size
        depths_before = [s.depth for s in self.model.spec.stages]
        remove_channels_(trial, keep)
        try:
            problem = self._broken(trial)
        except RuntimeError as e:
            if not is_out_of_memory(e):
                raise
            problem = "out of memory while checking the result"
        if self.dist.on:  # each rank checked its own validation images: a problem on any rank rejects it on all
            bad = self.dist.any(problem is not None)
            problem = self.dist.broadcast_json(problem) or ("non-finite outputs on another rank" if bad else None)
        del trial
        if problem is not None:
            append_jsonl(self.run_dir / "events.jsonl", {"epoch": epoch, "event": "surgery_rejected", "surgery": "prune", "reason": problem})
            log.warning("pruning after epoch %d rejected (%s); training goes on with the network as it was", epoch, problem)
            return
        channels_before = _stage_channels(self.model.spec)
        removed_ids = self._block_names(blocks)
        # a stuck block's branch added a constant; removing it drops that constant (about 0 for an all-zero branch)
        dropped = max((float(branch_constant(self.model.stages[s][b]).abs().max()) for s, b in blocks), default=0.0)
        self._remove_blocks(blocks)
        remove_channels_(self.model, keep, self.opt)
        self._after_surgery()
        st.pruned_log.append([epoch, channels_before, _stage_channels(self.model.spec)])
        if p.grow_batch:
            b0 = self.batch0  # the batch training started with (after any memory cap)
            target = b0 * st.start_flops / self.flops  # the batch that costs what the first model's batch cost
            cap = min(b0 * p.max_batch_scale, len(loader.split))
            grown = int(min(target, cap)) // 8 * 8
            # never past what the memory estimate allows for the smaller network
            half = self.dtype is not None
            grown = self.dist.min_int(fit_batch(self.model.spec, grown, half, count_params(self.model), available_memory(self.device))) if grown > batch_before else grown
            loader.batch_size = max(batch_before, grown)
        st.batch_size = loader.batch_size
        event = {
            "epoch": epoch,
            "event": "prune",
            "widths_before": widths_before,
            "widths_after": self.model.spec.widths(),
            "flops_before": flops_before,
            "flops_after": self.flops,
            "params_after": count_params(self.model),
            "batch_size_before": batch_before,
            "batch_size": loader.batch_size,
            "peak_lr": self.peak_lr,
            "removed": {name: group_widths[name] - len(idx) for name, idx in keep.items()},
            "blocks_removed": removed_ids,
            "dropped_constant": dropped,  # the largest |constant| a removed block's branch was adding (stuck blocks)
            "depths_before": depths_before,
            "depths_after": [s.depth for s in self.model.spec.stages],
        }
        append_jsonl(self.run_dir / "events.jsonl", event)
        if progress:
            from tqdm import tqdm

            tqdm.write(
                f"prune after epoch {epoch}: FLOPs/image {flops_before / 1e6:.1f}M -> {self.flops / 1e6:.1f}M, "
                + (f"{len(blocks)} blocks removed, " if blocks else "")
                + f"batch {batch_before} -> {loader.batch_size}"
            )

    def _block_ids(self) -> list[list[int]]:
        """Per stage, the ids of its blocks: the starting network's are 0..depth-1, inserted ones get new ids."""
        return self.state.block_ids or [list(range(s.depth)) for s in self.model.spec.stages]

    def _block_names(self, blocks: list[tuple[int, int]]) -> list[str]:
        """Blocks ``(stage, block)`` of the network now, named as in the starting network (``s<stage>b<id>``)."""
        ids = self._block_ids()
        return [f"s{s}b{ids[s][b]}" for s, b in blocks]

    def _remove_blocks(self, blocks: list[tuple[int, int]]) -> None:
        """Remove blocks ``(stage, block)`` with their optimizer state, and keep the block ids in step."""
        st = self.state
        ids = self._block_ids()
        remove_blocks_(self.model, blocks, self.opt)
        if blocks:
            if not st.block_next:  # the first removal: ids so far are the starting network's
                st.block_next = [len(stage) for stage in ids]
            st.block_ids = [[i for b, i in enumerate(stage) if (s, b) not in blocks] for s, stage in enumerate(ids)]

    def _adapt(self, epoch: int, clock: Clock, progress: bool) -> None:
        """Ask the controller (:mod:`bonsai.train.controller`) and carry out its decision; log it with its reason.

        prune: the penalty applies for the next ``adapt.window`` epochs. widen: every channel group of the chosen
        stages (residual and inner widths) grows by ``adapt.widen_factor`` with Net2WiderNet. deepen: an identity
        block is appended to the chosen stage. Both keep the network's function (widening up to its symmetry-breaking
        noise, ``adapt.widen_noise``), and copy momentum with the weights, so the LR schedule and batch continue
        unchanged. stop: the run ends here."""
        a, st = self.cfg.adapt, self.state
        # The pruned shares are unknown unless every epoch of the window applied the penalty (a channel the lasso
        # has had one epoch to reach is no evidence that its stage uses its width) and the window lies wholly after
        # the last growth (the grown network has not been measured before). The reading is taken from a
        # reconfiguration at this epoch, run now if the schedule did not run one.
        shares: list[float] | None = None
        window = range(epoch - a.window + 1, epoch + 1)
        if epoch >= a.window and epoch - a.window >= st.grown_at and all(e in st.penalized_epochs for e in window):
            if not any(r[0] == epoch for r in st.pruned_log):
                self._reconfigure(epoch, progress)
        else:
            window = None
        if window is not None and any(r[0] == epoch for r in st.pruned_log):  # None: the surgery was rejected
            now = _stage_channels(self.model.spec)
            shares = []
            recent = [r for r in st.pruned_log if r[0] > epoch - a.window]
            for i, n in enumerate(now):
                removed = sum(max(r[1][i] - r[2][i], 0) for r in recent if i < len(r[1]))
                before = recent[0][1][i] if recent and i < len(recent[0][1]) else n
                shares.append(removed / max(before, 1))
        rule = Rule(a.plateau_epochs, a.min_delta, a.min_left, a.max_gap, a.saturated, a.widen_factor, a.max_growths)
        # after a growth, the plateau is judged on the grown network's epochs only (growth keeps the function, so
        # the old plateau would carry straight over); after MorphNet's step shrank it (blocks shed, the strongest
        # channels kept: the function changes), on the shrunk network's, or its dip would read as a plateau
        hist = slice(max(st.grown_at, st.shrunk_at), None)
        left = max(0.0, 1 - self._progress(clock))
        target = self.target_flops
        sizing = self._sizing() and not st.sized
        anneals = self.budget is not None and self.cfg.train.epochs is None
        signals = Signals(st.val_hist[hist], st.train_hist[hist], shares, self.flops, left, st.growths, target, sizing, anneals, len(self.model.spec.stages))
        decision = decide(signals, rule)
        if self.dist.on:  # every rank carries out rank 0's decision
            decision = Decision(**self.dist.broadcast_json(vars(decision)))
        flops_before, widths_before = self.flops, self.model.spec.widths()
        if decision.action == "prune":
            over = target is not None and self.flops > target * (1 + rule.flops_tolerance)
            if over and self._sizing():
                # in the sizing phase its scheduled penalty is removing channels and its end takes the network to
                # the target; after it, the network is shrunk to the target now (_morph: its weakest blocks first
                # with adapt.shed_blocks, then its widths, keeping the strongest channels)
                shrunk = st.sized and self._morph(epoch, progress, target, "over the target after the sizing phase", a.shed_blocks)
                if st.sized and not shrunk and st.penalty_until <= epoch:  # no width fits: the penalty instead
                    st.penalty_until = epoch + a.window
            elif st.penalty_until <= epoch:  # a measurement already under way is not pushed back
                st.penalty_until = epoch + a.window
        elif decision.action == "widen" and decision.to_target:
            if self._morph(epoch, progress, target, "well under the target in the sizing phase"):
                st.growths += 1
                st.grown_at = epoch
            else:
                decision = Decision("continue", f"{decision.reason}, but no widths fit it")
        elif decision.action in ("widen", "deepen"):
            grown = copy.deepcopy(self.model.spec)  # the result, checked against the FLOP target before any surgery
            widths = {}
            if decision.action == "widen":  # every channel group of the chosen stages, once (a group may span two)
                r = self.cfg.prune.round_to
                for g in channel_groups(self.model):
                    if any(f[0] != "stem" and f[1] in decision.stages for f in g.spec_fields):
                        widths[g.name] = -(-math.ceil(g.width * a.widen_factor) // r) * r
                        for f in g.spec_fields:
                            set_field(grown, f, widths[g.name])
            else:
                for s in decision.stages:
                    grown.stages[s].inner.append(grown.stages[s].width)
            if target and spec_flops(grown) > target * (1 + rule.flops_tolerance):
                why = f"{decision.action} would take FLOPs to {spec_flops(grown) / 1e6:.1f}M, above the target {target / 1e6:.1f}M"
                if signals.anneals:  # a time budget's schedule runs to its end
                    decision = Decision("continue", why)
                else:
                    decision = Decision("stop", why)
                    st.stop_reason = "controller"
            else:
                self.opt.zero_grad(set_to_none=True)
                gen = torch.Generator().manual_seed(st.step)
                for name, width in widths.items():
                    widen_(self.model, name, width, self.opt, noise=a.widen_noise, generator=gen)
                for s in decision.stages if decision.action == "deepen" else ():
                    ids = self._block_ids()
                    if not st.block_next:  # nothing removed yet: ids are never reused, so a report row stays one block
                        st.block_next = [len(i) for i in ids]
                    deepen_(self.model, s, len(self.model.stages[s]), opt=self.opt)
                    ids[s].append(st.block_next[s])
                    st.block_next[s] += 1
                    st.block_ids = ids
                st.growths += 1
                st.grown_at = epoch
                self._after_surgery()
        elif decision.action == "stop":
            st.stop_reason = "controller"
        event = {
            "epoch": epoch,
            "event": "adapt",
            **decision.event(),
            "signals": {"pruned_share": None if shares is None else [round(x, 3) for x in shares], "left": round(signals.left, 3), "target_flops": target, "sizing": sizing},
        }
        if decision.action in ("widen", "deepen"):
            event |= {"widths_before": widths_before, "widths_after": self.model.spec.widths(), "flops_before": flops_before, "flops_after": self.flops}
        append_jsonl(self.run_dir / "events.jsonl", event)
        if progress and decision.action != "continue":
            from tqdm import tqdm

            tqdm.write(f"adapt after epoch {epoch}: {decision.action} {decision.stages or ''} ({decision.reason})")

    def _after_surgery(self) -> bool:
        """What every surgery needs afterwards: FLOPs counted afresh, the lasso's cached groups dropped, and a batch
        that still fits in memory for the new shape (growth can make the network larger). A network that shrank
        starts the best-by-validation choice afresh and is saved as the model to hand back at once (a run stopped
        before its next validation hands it back too): the model handed back is never one from before a shrink (a
        prune or a FLOP target would be undone). One that grew may still hand back the smaller network it grew
        from while that stays better on validation. Returns whether the network shrank."""
        before, self.flops = self.flops, count_flops(self.model.spec)
        shrank = self.flops < before
        if shrank:
            st = self.state
            st.best_val, st.best_epoch = -1.0, st.epoch  # -1: not validated since (summary.json: null)
            save_model(self.model, self.run_dir)
        if self.lasso is not None:
            self.lasso.invalidate()
        loader = self.train_loader
        capped = fit_batch(self.model.spec, loader.batch_size, self.dtype is not None, count_params(self.model), available_memory(self.device))
        capped = self.dist.min_int(capped)
        if capped < self.dist.world:
            raise BonsaiError(f"{self.run_dir}: the network after the surgery leaves memory for a batch of {capped}, fewer than the {self.dist.world} ranks")
        if capped < loader.batch_size:
            append_jsonl(self.run_dir / "events.jsonl", {"epoch": self.state.epoch, "event": "batch_capped", "batch_size_wanted": loader.batch_size, "batch_size": capped})
            loader.batch_size = capped
        self.state.batch_size = loader.batch_size
        if self.dist.on:  # checked before the new wrapper copies rank 0's weights over the others'
            self.dist.check_same(self.model, self.opt, f"the surgery after epoch {self.state.epoch}")
            self._wrap()
        return shrank

    def _end_sizing(self, epoch: int, progress: bool) -> None:
        """The sizing phase is over: MorphNet's step takes the network to the target, either way (a growth counts
        as one, so the plateau is judged afresh), and the penalty's lambda goes back to ``prune.lpr``'s for the
        controller's later prune decisions (lambda is proportional to ``lpr / (1 - lpr)`` at the first step's loss)."""
        st = self.state
        sizing_lpr = self._lpr()
        st.sized = True
        before = self.flops
        if abs(self.flops - self.target_flops) > Rule.flops_tolerance * self.target_flops and self._morph(epoch, progress, self.target_flops, "the sizing phase ends", self.cfg.adapt.shed_blocks):
            if self.flops > before:
                st.growths += 1
                st.grown_at = epoch
        lpr = self.cfg.prune.lpr
        if self.lasso is not None and st.lasso_lambda is not None and sizing_lpr != lpr:
            st.lasso_lambda *= (lpr / (1 - lpr)) / (sizing_lpr / (1 - sizing_lpr))
            self.lasso.lpr, self.lasso.lam = lpr, st.lasso_lambda
            append_jsonl(self.run_dir / "events.jsonl", {"epoch": epoch, "event": "lasso", "lpr": lpr, "lambda": st.lasso_lambda})

    def _morph(self, epoch: int, progress: bool, target_flops: float, why: str = "the last reconfiguration", shed: bool = False) -> bool:
        """Scale every width by the largest factor that keeps FLOPs within ``target_flops`` and top it up
        (MorphNet's expand step, :func:`~bonsai.surgery.morphnet.fit_widths`), widening with Net2WiderNet (the
        same function up to ``adapt.widen_noise``, momentum carried) or keeping the strongest channels. With
        ``shed`` (``--adapt``'s shrinks, when ``adapt.shed_blocks``), a network over the target first loses its
        weakest blocks until it is within it (:func:`~bonsai.surgery.morphnet.blocks_to_shed`); the widths are then
        fitted to the target, which may widen them. A rejected step is not tried again at the same epoch. Returns
        whether the network changed."""
        p = self.cfg.prune
        spec = self.model.spec
        if self._morph_rejected == (epoch, target_flops):  # the sizing phase's end tried it this epoch: once is enough
            return False
        blocks = blocks_to_shed(self.model, target_flops) if shed and self.flops > target_flops else []
        if self.dist.on:  # every rank carries out rank 0's plan
            blocks = [tuple(b) for b in self.dist.broadcast_json(blocks)]
        try:
            target, omega = fit_widths(without_blocks(spec, blocks), target_flops, p.round_to, p.min_width)
        except BonsaiError as e:
            self._morph_rejected = (epoch, target_flops)
            append_jsonl(self.run_dir / "events.jsonl", {"epoch": epoch, "event": "surgery_rejected", "surgery": "morph", "reason": str(e)})
            log.warning("no width multiplier after epoch %d: %s", epoch, e)
            return False
        if not blocks and target.widths() == spec.widths():
            return False
        widths_before, flops_before, depths_before = spec.widths(), self.flops, [s.depth for s in spec.stages]
        self.opt.zero_grad(set_to_none=True)
        names = self._block_names(blocks)
        strengths = [round(block_strength(self.model.stages[s][b]), 6) for s, b in blocks]
        self._remove_blocks(blocks)
        resize_(self.model, target, self.opt, generator=torch.Generator().manual_seed(self.state.step), noise=self.cfg.adapt.widen_noise)
        if self._after_surgery():
            self.state.shrunk_at = epoch
        event = {
            "epoch": epoch,
            "event": "morph",
            "omega": round(omega, 4),
            "target_flops": target_flops,
            "why": why,
            "widths_before": widths_before,
            "widths_after": self.model.spec.widths(),
            "flops_before": flops_before,
            "flops_after": self.flops,
            "params_after": count_params(self.model),
            "blocks_removed": names,
            # each removed block's level (root mean square of its last BN's scales and shifts; 0: it added nothing)
            "blocks_strength": strengths,
            "depths_before": depths_before,
            "depths_after": [s.depth for s in self.model.spec.stages],
        }
        append_jsonl(self.run_dir / "events.jsonl", event)
        if progress:
            from tqdm import tqdm

            tqdm.write(
                f"morph after epoch {epoch}: " + (f"{len(blocks)} weakest blocks removed, " if blocks else "")
                + f"widths x{omega:.3f}, FLOPs/image {flops_before / 1e6:.1f}M -> {self.flops / 1e6:.1f}M"
            )
        return True

    @torch.no_grad()
    def _broken(self, model: ResNet) -> str | None:
        """Why ``model`` (the result of a surgery) is unusable, or None: a non-finite weight or buffer, or a
        non-finite output on one validation batch."""
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                return f"non-finite values in {name}"
        batch = next(iter(self.val_loader.batches()), None)
        if batch is None:
            return None  # no validation images: the weights' check above is all there is
        xb = batch[0][:32]
        was_training = model.training
        model.eval()
        try:
            with autocast(self.device, self.dtype):
                out = model(xb)
        finally:
            model.train(was_training)
        if not bool(torch.isfinite(out).all()):
            return "non-finite outputs on a validation batch"
        return None

    def _evaluate(self, loader: Loader | None) -> float | None:
        if loader is None or loader.split.y is None or len(loader.split) == 0:
            return None
        keep = loader is self.test_loader and self.on_best is not None  # for the anytime predictions (_anytime)
        probs, plain, plain_s = self._predict(loader, self.tta, keep)
        if keep:
            self._test_plain = plain, plain_s
        return accuracy(probs, loader.split.y)

    def _anytime(self, clock: Clock) -> float:
        """Rewrite the anytime predictions (``on_best``) with the test set's plain-view probabilities; returns the
        budget-clock seconds they cost. Without a per-epoch test pass (no test labels, ``test_each_epoch=false``)
        the test set is predicted here, on the clock. With one, its plain view is reused (the same numbers) and
        the clock is charged the time that view took in it (loading the images and their first forward pass), as
        that pass ran off the clock: so a run trains as long whether or not its test set has labels."""
        t0 = clock.now()
        if self._test_plain is not None:
            probs, plain_s = self._test_plain
            clock.charge(plain_s)
        else:
            probs = self._predict(self.test_loader, False)[0]
        self.on_best(probs)
        return clock.now() - t0

    def _predict(self, loader: Loader, tta: bool, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor | None, float]:
        """Class probabilities for ``loader``'s images with the mirror if ``tta``; with ``plain``, those of the
        plain view alone too (else None); and the plain view's seconds (see :func:`predict_views`). An
        out-of-memory error halves the batch and retries."""
        while True:
            try:
                v = predict_views(self.model, loader, self.dtype, tta)
                n = len(loader.split)
                return self.dist.gather_rows(v.probs, n), (self.dist.gather_rows(v.plain, n) if plain else None), v.plain_s
            except RuntimeError as e:
                if not is_out_of_memory(e):
                    raise
                if self.dist.on:  # the other ranks are not retrying with it
                    raise BonsaiError(f"rank {self.dist.rank}: out of memory evaluating at batch {loader.batch_size}; resume the run under torchrun with --resume and a smaller train.eval_batch_size") from None
                if loader.batch_size <= 1:
                    raise BonsaiError(f"{self.run_dir}: out of memory evaluating even at batch size 1") from None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            loader.batch_size //= 2
            log.warning("out of memory while evaluating: evaluation batch halved to %d", loader.batch_size)

    # -- the run

    def run(self, progress: bool = True) -> TrainState:
        """Train until a stopping rule fires. Ctrl-C or SIGTERM ends the current step, keeps the last checkpoint
        (at most the current epoch's work is lost; ``--resume`` continues) and stops with ``stop_reason``
        ``sigint``/``sigterm``; a second signal acts at once as usual."""
        if threading.current_thread() is not threading.main_thread():
            try:
                return self._run(progress)
            finally:
                if self.tensorboard is not None:
                    self.tensorboard.close()
        defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

        def on_signal(signum, _frame) -> None:
            self._signal = "sigint" if signum == signal.SIGINT else "sigterm"
            signal.signal(signum, defaults[signum])
            log.warning("%s received: stopping after this step (send it again to stop at once)", self._signal.upper())

        previous = {}
        for sig in defaults:
            if signal.getsignal(sig) is not signal.SIG_IGN:  # a job started to ignore Ctrl-C keeps ignoring it
                previous[sig] = signal.signal(sig, on_signal)
        try:
            return self._run(progress)
        finally:
            if self.tensorboard is not None:
                self.tensorboard.close()
            for sig, handler in previous.items():
                if handler is not None:  # None: a handler not set from Python, which cannot be put back
                    signal.signal(sig, handler)

    def _restore_last_checkpoint(self, clock: Clock, **changes) -> None:
        """Model, optimizer and progress back to the last checkpoint; what was really spent (time, FLOPs), the
        retries and LR cuts so far, and lambda (fixed at the first step) are kept; ``changes`` are set on top."""
        st = self.state
        path = self.run_dir / CHECKPOINT
        spec, ck, model_t, opt_t = read_checkpoint(path)
        if (spec.widths(), [t.depth for t in spec.stages]) != (self.model.spec.widths(), [t.depth for t in self.model.spec.stages]):
            raise BonsaiError(f"{path}: the checkpoint's architecture differs from the network in training; cannot roll back")
        self.opt.zero_grad(set_to_none=True)
        self.opt.state.clear()
        restore(self.model, self.opt, model_t, opt_t, source=str(path))
        keep = {
            "train_time_s": st.train_time_s,
            "train_flops": st.train_flops,
            "clock_s": clock.now(),
            "rollbacks": st.rollbacks,
            "lr_scale": st.lr_scale,
            "lasso_lambda": st.lasso_lambda,
        }
        for f in fields(TrainState):
            setattr(st, f.name, getattr(ck, f.name))
        for k, v in (keep | changes).items():
            setattr(st, k, v)
        if self.scaler.is_enabled():  # a step cut short may have left the scaler between unscale_ and update
            self.scaler = torch.amp.GradScaler(self.device.type, init_scale=st.grad_scale or 2.0**16)
        st.stop_reason = ""  # a reason saved with the checkpoint (budget, plateau) was re-checked when resuming
        if st.batch_size is not None:  # else the loader keeps the batch it was given (capped to the data)
            self.train_loader.batch_size = st.batch_size
        if self.dist.on:  # every rank read its own copy of the checkpoint
            self.dist.check_same(self.model, self.opt, f"restoring {path.name}")
            self._wrap()

    def _rollback(self, epoch: int, clock: Clock, reason: str) -> bool:
        """Back to the last checkpoint with a lower LR after a divergence; False once the retries are spent."""
        st, t = self.state, self.cfg.train
        if st.rollbacks >= t.max_rollbacks:
            log.warning("training diverged in epoch %d (%s) after %d rollback(s); keeping the best model so far", epoch, reason, st.rollbacks)
            return False
        self._restore_last_checkpoint(clock, rollbacks=st.rollbacks + 1, lr_scale=st.lr_scale * t.rollback_lr_factor)
        event = {"epoch": epoch, "event": "rollback", "reason": reason, "to_epoch": st.epoch, "lr_scale": st.lr_scale, "rollbacks": st.rollbacks}
        append_jsonl(self.run_dir / "events.jsonl", event)
        log.warning("training diverged in epoch %d (%s): rolled back to epoch %d, LR x%g", epoch, reason, st.epoch, st.lr_scale)
        return True

    def _out_of_memory(self, epoch: int, clock: Clock) -> None:
        """After an out-of-memory error in a training step: back to the last checkpoint with half the batch (the
        LR follows the batch). Raises BonsaiError when the batch is already 1."""
        loader = self.train_loader
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        before = loader.batch_size
        if self.dist.on:  # not recoverable in lockstep: the other ranks are waiting in a collective
            raise BonsaiError(f"rank {self.dist.rank}: out of memory in a training step at batch {before}; resume the run under torchrun with --resume and batch_size={before // 2}")
        if before <= 1:
            raise BonsaiError(f"{self.run_dir}: out of memory in a training step even at batch size 1; use a smaller arch or data.image_size")
        self._restore_last_checkpoint(clock, batch_size=before // 2)
        loader.batch_size = before // 2
        st = self.state
        event = {"epoch": epoch, "event": "out_of_memory", "batch_size_before": before, "batch_size": loader.batch_size, "to_epoch": st.epoch}
        append_jsonl(self.run_dir / "events.jsonl", event)
        log.warning("out of memory in epoch %d at batch %d: back to epoch %d with batch %d", epoch, before, st.epoch, loader.batch_size)

    def _run(self, progress: bool) -> TrainState:
        from tqdm import tqdm

        st, cfg = self.state, self.cfg
        clock = Clock(st.clock_s)
        planned = self._planned_epochs()
        metrics_path = self.run_dir / "metrics.jsonl"
        n_test = 0 if self.test_loader is None else len(self.test_loader.split)
        epoch = st.epoch
        if st.stop_reason not in ("diverged", "controller"):
            st.stop_reason = ""  # a resumed run re-checks its (possibly raised) epochs, budget and patience
        if not (self.run_dir / CHECKPOINT).is_file():  # the starting point, for a rollback in the first epoch
            save_checkpoint(self.run_dir / CHECKPOINT, self.model, self.opt, st)
        while True:
            if st.stop_reason:
                break
            if self._out_of_time(clock):
                st.stop_reason = "budget"
                break
            if planned is not None and epoch >= planned:
                st.stop_reason = "epochs" if cfg.train.epochs is not None else "max_epochs"
                break
            if self._signalled():  # arrived after the last epoch's steps: that epoch was completed
                st.stop_reason = self._signal
                break
            epoch += 1
            bar = None
            if progress:
                total = f"/{planned}" if planned else ""
                bar = tqdm(total=len(self.train_loader), desc=f"epoch {epoch}{total}", unit="step", leave=False, disable=None)
            epoch_t0 = clock.now()
            diverged = oom = None
            try:
                train_loss, train_acc, seen, stopped = self._train_epoch(epoch, clock, bar)
            except Diverged as e:
                diverged = str(e)
            except RuntimeError as e:  # torch.OutOfMemoryError is one
                if not is_out_of_memory(e):
                    raise
                oom = True  # handled outside the except block, so the failed step's tensors are freed first
            if diverged is not None or oom:
                if bar is not None:
                    bar.close()
                if oom:
                    self._out_of_memory(epoch, clock)
                elif not self._rollback(epoch, clock, diverged):
                    st.stop_reason = "diverged"
                epoch = st.epoch
                continue
            if bar is not None:
                bar.close()
            if self._cut_short:  # a signal ended the epoch early: it is dropped, the last checkpoint stays
                st.stop_reason = self._signal
                break
            with clock:
                v0 = self._now(clock)
                val_acc = self._evaluate(self.val_loader)
                val_s = self._now(clock) - v0
            # keep back enough budget to predict the validation and test sets once at the end with the final
            # predictions' views, on one process (measured on this epoch's validation, plus 2%)
            per_image = val_s / max(len(self.val_loader.split), 1) * self._final_cost * self.dist.world
            st.reserve_s = per_image * (n_test + len(self.val_loader.split)) + 0.02 * (self.budget or 0)
            test_acc = self._evaluate(self.test_loader) if cfg.test_each_epoch else None
            st.epoch = epoch
            if not math.isfinite(train_loss):
                st.stop_reason = "diverged"
                log.warning("training diverged in epoch %d (loss %s); keeping the best model so far", epoch, train_loss)
            # a diverged epoch is never the best one, whatever its (meaningless) accuracy
            improved = val_acc is not None and val_acc > st.best_val and math.isfinite(train_loss)
            anytime_s = None  # the budget-clock seconds of this epoch's anytime predictions, if it wrote them
            with clock:
                if improved:
                    st.best_val, st.best_epoch, st.stale_epochs = val_acc, epoch, 0
                    save_model(self.model, self.run_dir)
                    if self.on_best is not None and self.test_loader is not None and len(self.test_loader.split):
                        # anytime predictions: a run cut short (kill, budget) leaves the best model's predictions
                        anytime_s = self._anytime(clock)
                else:
                    st.stale_epochs += 1
                self._test_plain = None  # this epoch's: never an anytime prediction of a later epoch
                if st.stop_reason:  # diverged: that reason stands
                    pass
                elif stopped or self._out_of_time(clock):
                    st.stop_reason = "budget"
                elif cfg.train.patience is not None and st.stale_epochs >= cfg.train.patience:
                    st.stop_reason = "plateau"
                record = {
                    "epoch": epoch,
                    "train_time_s": round(st.train_time_s, 3),
                    "clock_s": round(clock.now(), 3),
                    "train_loss": round(train_loss, 5),
                    "train_acc": round(train_acc, 5),
                    "val_acc": val_acc,
                    "test_acc": test_acc,
                    "lr": self.opt.param_groups[0]["lr"],
                    "batch_size": self.train_loader.batch_size,
                    "anytime_s": None if anytime_s is None else round(anytime_s, 4),
                    "images_per_s": round(seen / max(clock.now() - epoch_t0 - val_s - (anytime_s or 0.0), 1e-9), 1),
                    "flops_per_image": self.flops,
                    "train_image_size": self._last_size,  # the input size of the epoch's last step
                    "params": count_params(self.model),
                    "train_flops": st.train_flops,
                    "widths": self.model.spec.widths(),
                }
                if self.dist.on:  # gradient bytes each rank all-reduced per step (DDP's buckets, as counted)
                    record |= {"world_size": self.dist.world, "comm_bytes_per_step": round(self._comm_per_step)}
                if self.lasso is not None:
                    record["lasso"] = self._penalized  # whether this epoch's steps applied the group-lasso penalty
                if st.block_ids is not None or (self.lasso is not None and (self.lasso.depth or cfg.adapt.on)):
                    # which blocks are there: the starting network's are 0..depth-1, inserted ones get new ids
                    record["block_ids"] = self._block_ids()
                append_jsonl(metrics_path, {k: _finite_or_none(v) for k, v in record.items()})
                if cfg.adapt.on:
                    st.val_hist.append(float(val_acc) if val_acc is not None else 0.0)
                    # training accuracy is comparable with validation accuracy only at the working size: during
                    # progressive resizing the network trains at a lower resolution than it is validated at
                    full = self._last_size == self.model.spec.image_size
                    st.train_hist.append(float(train_acc) if full else None)
                    if self._penalized:
                        st.penalized_epochs.append(epoch)
                self._last_val = val_acc
                if self.tensorboard is not None:
                    for k, v in record.items():
                        if k != "epoch" and isinstance(v, (int, float)) and v is not None and math.isfinite(v):
                            self.tensorboard.add_scalar(k, v, epoch)
                    self.tensorboard.flush()
                # read once: the next epoch's penalty and the end of the sizing phase must agree, though the
                # surgery below moves a budget's clock on
                done = self._progress(clock)
                st.next_penalty = [epoch + 1, done < self._until()]
                if self._reconfigure_due(epoch, planned, clock):
                    self._reconfigure(epoch, progress)
                    if self.cfg.prune.target_flops and not self.cfg.adapt.on and not self._penalty_on(epoch + 1, clock):
                        self._morph(epoch, progress, self.cfg.prune.target_flops)  # the last reconfiguration: MorphNet's expand step
                if self._sizing() and not st.sized and done >= cfg.adapt.sizing and not st.stop_reason and (planned is None or epoch < planned):
                    self._end_sizing(epoch, progress)
                if self.cfg.adapt.on and not st.stop_reason and (planned is None or epoch < planned):
                    self._adapt(epoch, clock, progress)
                st.clock_s = clock.now()
                if self.scaler.is_enabled():
                    st.grad_scale = float(self.scaler.get_scale())
                self.dist.check_same(self.model, self.opt, f"epoch {epoch}")
                save_checkpoint(self.run_dir / CHECKPOINT, self.model, self.opt, st)
            if progress:
                left = ""
                if self.budget is not None:
                    left = f"  left {_fmt_s(self.budget - clock.now())}"
                elif planned:
                    left = f"  left ~{_fmt_s(clock.now() / epoch * (planned - epoch))}"
                tqdm.write(
                    f"epoch {epoch:3d}  loss {train_loss:.3f}  train {train_acc:6.1%}  val {val_acc:6.1%}"
                    + (f"  test {test_acc:6.1%}" if test_acc is not None else "")
                    + f"  {record['images_per_s']:.0f} img/s  {_fmt_s(clock.now())}{left}"
                )
        return st
