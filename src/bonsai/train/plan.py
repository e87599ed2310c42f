"""The budget planner: which network to train when the user gives only a wall-clock budget.

Short schedules reward a network that gets enough passes over the data. So the planner keeps the default family
(the ``bonsai`` preset: stem at full resolution, three one-block stages) and scales its widths by a multiplier,
choosing the widest candidate that still fits ``min_epochs`` epochs into the budget (:func:`required_epochs`:
enough epochs to see ``train.plan_images`` images, 1 M, but at most ``train.plan_epochs``, 32. On the packaged demo
under its 90 s budget, the 0.5x network's 49 epochs reached 66.2% test accuracy, the 0.75x's 28 epochs 64.4%, the
1x's 20 epochs 56.1%; on CIFAR-10 under 15 minutes the 1x's 21 epochs and the 0.75x's 30 beat the 0.5x's 47:
86.80%, 86.72% and 86.08% test accuracy). Each candidate's speed is measured on this
machine (a few training steps on random data at the working size, batch and precision), smallest first, so the
probe stops at the first candidate that is too slow. Progressive resizing is credited: its early, smaller steps
run faster (see :func:`expected_epochs`). The probe's seconds are reported, not charged to the budget (like
reading the data).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import build, count_flops

MULTIPLIERS = (0.5, 0.75, 1.0, 1.5, 2.0)
MIN_WIDTH = 16  # the narrowest width (and the step) of a scaled network: one full AMX/AVX-512 bf16 tile


def scaled(base: ArchSpec, mult: float) -> ArchSpec:
    """``base`` with every width times ``mult``, rounded to a multiple of 16 (full AMX/AVX-512 tiles), at least 16.

    >>> from bonsai.models.arch import preset
    >>> scaled(preset("bonsai"), 0.5).widths()
    [16, 32, 32, 64, 64, 128, 128]
    """
    r = lambda w: max(MIN_WIDTH, int(round(w * mult / MIN_WIDTH)) * MIN_WIDTH)  # noqa: E731
    spec = ArchSpec.from_dict(base.to_dict())
    spec.stem = r(base.stem)
    for s in spec.stages:
        s.width = r(s.width)
        s.inner = [r(w) for w in s.inner]
    spec.name = base.name if mult == 1 else f"{base.name}x{mult:g}"
    return spec.validate()


def expected_epochs(budget_s: float, images_per_s: float, n_train: int, low_res: float, low_res_share: float) -> float:
    """Epochs that fit in ``budget_s`` at a full-size pace of ``images_per_s``.

    With progressive resizing the size grows linearly from ``low_res`` to 1 over the first ``low_res_share`` of
    the time; if a step's cost scales with the pixel count, the pace there averages ``1/low_res`` times the full
    pace (the mean of 1/s^2 for s uniform on [low_res, 1]). Real small steps carry fixed overheads, so this is
    optimistic at small sizes.

    >>> expected_epochs(100, 100, 1000, 1.0, 0.5), expected_epochs(100, 100, 1000, 0.5, 0.5)
    (10.0, 15.0)
    """
    gain = 1.0 if low_res >= 1 or low_res_share <= 0 else low_res_share / low_res + (1 - low_res_share)
    return budget_s * images_per_s * gain / max(n_train, 1)


def step_times(spec: ArchSpec, batch: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool, steps: int) -> list[float]:
    """Seconds of each of ``steps`` SGD steps of a fresh network for ``spec`` on random data, after one untimed
    warm-up step."""
    from bonsai.train.engine import autocast

    model = build(spec).to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    x = torch.randint(0, 256, (batch, spec.in_channels, spec.image_size, spec.image_size), dtype=torch.uint8, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, spec.num_classes, (batch,), device=device)

    def timed() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast(device, dtype):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed()  # warm-up
    return [timed() for _ in range(max(steps, 1))]


def measure_pace(spec: ArchSpec, batch: int, device: torch.device, dtype: torch.dtype | None, channels_last: bool, steps: int = 3) -> float:
    """Training images per second of a fresh network for ``spec``: its fastest of ``steps`` timed SGD steps on
    random data, after one warm-up step (:func:`step_times`). Another process on a shared host only slows a step,
    so the fastest is the machine's own pace; the mean of two steps swung with the load and could flip the
    planner's pick (``benchmarks/probe_noise.py``)."""
    return batch / max(min(step_times(spec, batch, device, dtype, channels_last, steps)), 1e-9)


@dataclass
class Plan:
    spec: ArchSpec
    multiplier: float
    expected_epochs: float
    probe_s: float
    candidates: list[dict]  # every probed candidate: multiplier, FLOPs per image, images/s, expected epochs
    required_epochs: float | None = None  # the epochs a candidate had to be expected to fit

    def event(self) -> dict:
        return {
            "epoch": 0,
            "event": "plan",
            "arch": self.spec.name,
            "widths": self.spec.widths(),
            "pool": any(s.pool for s in self.spec.stages),
            "multiplier": self.multiplier,
            "expected_epochs": round(self.expected_epochs, 1),
            "required_epochs": None if self.required_epochs is None else round(self.required_epochs, 1),
            "probe_s": round(self.probe_s, 2),
            "candidates": self.candidates,
        }


def required_epochs(plan_epochs: float, plan_images: float, n_train: int) -> float:
    """The epochs a planned network must be expected to fit into the budget: enough to see ``plan_images`` training
    images, but at most ``plan_epochs`` (small datasets) and at least one (large ones).

    >>> required_epochs(32, 1e6, 45_000), required_epochs(32, 1e6, 4_500), required_epochs(32, 1e6, 2_000_000)
    (22.22222222222222, 32, 1.0)
    """
    return max(1.0, min(plan_epochs, plan_images / max(n_train, 1)))


def plan_arch(
    base: ArchSpec,
    n_train: int,
    budget_s: float,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    low_res: float,
    low_res_share: float,
    min_epochs: float,
    pace=measure_pace,
) -> Plan:
    """The widest ``base`` x multiplier (from :data:`MULTIPLIERS`) expected to train ``min_epochs`` epochs of
    ``n_train`` images within ``budget_s``; the narrowest candidate when none does."""
    t0 = time.perf_counter()
    chosen, candidates = None, []
    for mult in MULTIPLIERS:
        spec = scaled(base, mult)
        try:
            rate = pace(spec, min(batch, 128, max(n_train, 1)), device, dtype, channels_last)
        except RuntimeError as e:
            from bonsai.train.engine import is_out_of_memory

            if not is_out_of_memory(e) or chosen is None:
                raise
            break  # wider ones will not fit either
        epochs = expected_epochs(budget_s, rate, n_train, low_res, low_res_share)
        candidates.append({"multiplier": mult, "flops_per_image": count_flops(spec), "images_per_s": round(rate, 1), "expected_epochs": round(epochs, 1)})
        if chosen is not None and epochs < min_epochs:
            break
        chosen = (spec, mult, epochs)
        if epochs < min_epochs:  # even the narrowest is short of min_epochs: take it
            break
    spec, mult, epochs = chosen
    return Plan(spec, mult, epochs, time.perf_counter() - t0, candidates, min_epochs)


def adapt_start(plan: Plan, base: ArchSpec, widen_factor: float = 1.5, tolerance: float = 0.02) -> tuple[ArchSpec, dict]:
    """``--adapt``'s start and FLOP target when the planner chose the network: the target is the planner's pick (the
    network the budget affords, the one ``bonsai fit --no-adapt`` trains), and the start is ``base`` at the
    widest narrower multiplier (of :data:`MULTIPLIERS`, then half and a quarter of the pick's) that the controller
    grows to the target right after the first epoch: its FLOPs times ``widen_factor`` squared within the target
    (rule 2 of :mod:`bonsai.train.controller`). A start closer to the target would train at its own size for the
    whole sizing phase. So ``--adapt`` and ``--no-adapt`` end at about the same size, and the grown one spends
    its first epoch on a network about half as costly or less. Multipliers that would floor a width at
    :data:`MIN_WIDTH` are not starts (nor those from which a width would round up to it); when none is left (a
    x0.5 pick of the default network), the run starts at the pick itself, and the controller keeps it there
    unless a plateau rule prunes. Returns the start and the ``adapt_target`` event.

    >>> from bonsai.models.arch import preset
    >>> p = Plan(scaled(preset("bonsai"), 0.75), 0.75, 20.0, 1.0, [], 20.0)
    >>> start, e = adapt_start(p, preset("bonsai"))
    >>> start.name, e["target_flops"] == count_flops(p.spec), e["start_flops"] < e["target_flops"]
    ('bonsaix0.5', True, True)
    >>> [adapt_start(Plan(scaled(preset("bonsai"), m), m, 20.0, 1.0, [], 20.0), preset("bonsai"))[0].name for m in (0.5, 1.0)]
    ['bonsaix0.5', 'bonsaix0.5']
    >>> adapt_start(Plan(scaled(preset("bonsai"), 0.5), 0.5, 20.0, 1.0, [], 20.0), preset("bonsai"))[1]["start_flops"] == count_flops(scaled(preset("bonsai"), 0.5))
    True
    >>> adapt_start(p, preset("bonsai"), widen_factor=1.6)[0].name  # too far to grow after epoch 1: at the phase's end
    'bonsaix0.5'
    """
    known = {c["multiplier"]: c["flops_per_image"] for c in plan.candidates}  # counted by the planner's probe
    narrower = [m for m in MULTIPLIERS if m < plan.multiplier] + [plan.multiplier / 2, plan.multiplier / 4]
    # a multiplier that would take a width below 16 is floored there: not the pick's shape scaled down, and
    # MorphNet's step grows such a start to another shape (x0.25 -> x0.5 doubled the full-resolution stem and ran
    # 0.73 points below the pick trained as is, README "Time to accuracy")
    narrower = [m for m in narrower if min(base.widths()) * m >= MIN_WIDTH]
    flops = {m: known.get(m) or count_flops(scaled(base, m)) for m in narrower}
    target = known.get(plan.multiplier) or count_flops(plan.spec)
    fits = [m for m, f in flops.items() if f * widen_factor**2 <= target * (1 + tolerance)]
    # none fits: the narrowest, grown at the sizing phase's end; none at all (the pick is the narrowest unfloored
    # shape): the pick itself, which the controller keeps unless a plateau rule prunes it
    mult = max(fits) if fits else min(flops) if flops else plan.multiplier
    start = scaled(base, mult)
    event = {
        "epoch": 0,
        "event": "adapt_target",
        "target_flops": target,
        "start_flops": flops.get(mult, target),
        "source": "plan",
        "start_multiplier": mult,
        "plan_multiplier": plan.multiplier,
        "expected_epochs": round(plan.expected_epochs, 2),
        "required_epochs": None if plan.required_epochs is None else round(plan.required_epochs, 2),
        "refined": None,
        "probe_s": round(plan.probe_s, 2),
    }
    return start, event


def budget_flops(
    spec: ArchSpec,
    n_train: int,
    budget_s: float,
    batch: int,
    device: torch.device,
    dtype: torch.dtype | None,
    channels_last: bool,
    low_res: float,
    low_res_share: float,
    min_epochs: float,
    pace=measure_pace,
    max_scale: float = 4.0,
) -> dict:
    """``--adapt``'s FLOP target under a time budget: the forward FLOPs per image of a network expected to train
    ``min_epochs`` epochs of ``n_train`` images within ``budget_s``, from the measured pace of ``spec`` and the
    assumption that a network of another size reaches the same FLOP rate. A small network's rate is the lower one
    (small convs fill the AMX/SIMD tiles worse), so when the target lies above the start, the start widened to it
    (MorphNet's expand step, widths rounded to 8) is probed as well and its pace sets the target (at most twice the
    first estimate). Shrinking removes whole blocks as well as channels, whose result no width scaling predicts, so a
    target below the start stays the first estimate. At most ``max_scale`` times the FLOPs of ``spec`` (4:
    widths x2, the planner's widest multiplier; a tiny dataset under a long budget would otherwise ask for a huge
    network). Returned as the ``adapt_target`` event.

    >>> from bonsai.models.arch import preset
    >>> e = budget_flops(preset("resnet8"), 1000, 100, 64, torch.device("cpu"), None, False, 1.0, 0.0, 20, pace=lambda *a: 100.0)
    >>> e["expected_epochs"], round(e["target_flops"] / e["start_flops"], 3)
    (10.0, 0.5)
    >>> budget_flops(preset("resnet8"), 1000, 1e4, 64, torch.device("cpu"), None, False, 1.0, 0.0, 20, pace=lambda *a: 100.0)["target_flops"] / e["start_flops"]
    4.0
    """
    from bonsai.surgery.morphnet import fit_widths

    t0 = time.perf_counter()
    batch = min(batch, 128, max(n_train, 1))
    flops = count_flops(spec)

    def target(s: ArchSpec) -> tuple[float, float, float]:
        rate = pace(s, batch, device, dtype, channels_last)
        epochs = expected_epochs(budget_s, rate, n_train, low_res, low_res_share)
        return min(count_flops(s) * epochs / max(min_epochs, 1e-9), max_scale * flops), rate, epochs

    zeta, rate, epochs = target(spec)
    refined = None
    if zeta > flops:  # a wider network runs at a better FLOP rate than a small one: probe the widened start too
        wider, _ = fit_widths(spec, zeta, 8, 8)
        refined = target(wider)
        zeta = max(min(refined[0], zeta * 2), flops)  # at most one doubling from the probe, never below the start
    return {
        "epoch": 0,
        "event": "adapt_target",
        "target_flops": zeta,
        "start_flops": flops,
        "source": "probe",
        "images_per_s": round(rate, 1),
        "expected_epochs": round(epochs, 2),
        "required_epochs": round(min_epochs, 2),
        "refined": None if refined is None else {"flops": count_flops(wider), "images_per_s": round(refined[1], 1), "expected_epochs": round(refined[2], 2)},
        "probe_s": round(time.perf_counter() - t0, 2),
    }
