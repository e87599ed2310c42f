"""How steady is the planner's probe? The mean of two timed steps against the fastest of three, side by side.

    python benchmarks/probe_noise.py [--repeats 12]   # about 2 minutes on 2 cores

The planner (``bonsai.train.plan.plan_arch``) measures each candidate network's training pace with a few SGD steps
on random data, and picks the widest one expected to train enough epochs in the budget. On a shared host a step
can be slowed by another process; a slow probe of one candidate flips the pick. This script probes the 15-minute
CIFAR-10 default's candidates (the ``bonsai`` network at x0.5, x0.75 and x1, 32 px, batch 128, the run's
precision and memory format) ``--repeats`` times with both estimators, interleaved so that both see the same
load, first on the host as it is (``quiet``) and then with a competing process that is busy on one core for a
quarter second in every half second (``bursty``, a stand-in for a shared host's load), and reports per candidate the spread of the measured pace (coefficient of variation, min/max) and how often
each estimator's pace leads to each pick for the CIFAR-10 numbers (48,000 training images under the default
2,000-image holdout, a 15-minute budget, the default progressive resizing and plan_epochs/plan_images).
Writes benchmarks/results/probe_noise.json (summary: cv per estimator and candidate, pick counts) and a figure.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, figure, write_result  # noqa: E402

from bonsai.config import FitConfig  # noqa: E402
from bonsai.models.arch import pooled, preset  # noqa: E402
from bonsai.train.engine import resolve_precision  # noqa: E402
from bonsai.train.plan import measure_pace, plan_arch, required_epochs, scaled, step_times  # noqa: E402


def mean_of_two(spec, batch: int, device, dtype, channels_last: bool) -> float:
    """The probe before 2026-11-24's change: one warm-up step, then the mean pace of two timed steps."""
    return batch * 2 / sum(step_times(spec, batch, device, dtype, channels_last, 2))


def _bursts(stop, busy_s: float, idle_s: float) -> None:
    """A competing process on the shared host: busy (a matrix product loop on one core) for busy_s, idle for
    idle_s, until ``stop`` is set."""
    import numpy as np

    a = np.random.rand(256, 256)
    while not stop.is_set():
        t = time.perf_counter()
        while time.perf_counter() - t < busy_s:
            a = a @ a
            a /= np.abs(a).max()
        stop.wait(idle_s)


def pick(rates: dict[float, float], base, cfg: FitConfig, n_train: int, budget_s: float) -> float:
    """The multiplier plan_arch takes when its probe measures these paces (a candidate wider than those measured
    reads as too slow)."""
    by_widths = {tuple(scaled(base, m).widths()): rate for m, rate in rates.items()}
    need = required_epochs(cfg.train.plan_epochs, cfg.train.plan_images, n_train)
    plan = plan_arch(
        base, n_train, budget_s, 128, torch.device("cpu"), None, False, cfg.train.low_res, cfg.train.low_res_share, need,
        pace=lambda spec, *_: by_widths.get(tuple(spec.widths()), 1e-9),
    )
    return plan.multiplier


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--budget-s", type=float, default=900.0)
    ap.add_argument("--n-train", type=int, default=48_000)
    args = ap.parse_args()
    cfg = FitConfig()
    device = torch.device("cpu")
    dtype = resolve_precision(cfg.train.precision, device)
    base = pooled(preset("bonsai", num_classes=10, in_channels=3, image_size=32))  # as api._spec plans it
    mults = (0.5, 0.75, 1.0)
    summary = {"repeats": args.repeats, "budget_s": args.budget_s, "n_train": args.n_train}
    all_paces = {}
    for condition in ("quiet", "bursty"):
        load, stop = None, None
        if condition == "bursty":  # another process, busy a quarter second in every half: a shared host's load
            import multiprocessing as mp

            stop = mp.Event()
            load = mp.Process(target=_bursts, args=(stop, 0.25, 0.25), daemon=True)
            load.start()
        paces = {name: {m: [] for m in mults} for name in ("mean_of_two", "fastest_of_three")}
        try:
            for r in range(args.repeats):
                for m in mults:
                    spec = scaled(base, m)
                    # alternate which estimator goes first, so neither always sees the other's warm caches
                    order = ("mean_of_two", "fastest_of_three") if r % 2 == 0 else ("fastest_of_three", "mean_of_two")
                    for name in order:
                        fn = mean_of_two if name == "mean_of_two" else measure_pace
                        paces[name][m].append(fn(spec, 128, device, dtype, cfg.train.channels_last))
                print(f"{condition} {r + 1}/{args.repeats}: " + ", ".join(f"x{m}: {paces['mean_of_two'][m][-1]:.0f} / {paces['fastest_of_three'][m][-1]:.0f}" for m in mults), flush=True)
        finally:
            if load is not None:
                stop.set()
                load.join(5)
        summary[condition] = {}
        for name, by_m in paces.items():
            picks = [pick({m: by_m[m][i] for m in mults}, base, cfg, args.n_train, args.budget_s) for i in range(args.repeats)]
            summary[condition][name] = {
                "cv": {str(m): round(statistics.pstdev(v) / statistics.mean(v), 3) for m, v in by_m.items()},
                "images_per_s_min_max": {str(m): [round(min(v), 1), round(max(v), 1)] for m, v in by_m.items()},
                "picks": {str(m): picks.count(m) for m in mults},
            }
        all_paces[condition] = paces
    details = {"paces": {c: {n: {str(m): [round(x, 1) for x in v] for m, v in d.items()} for n, d in p.items()} for c, p in all_paces.items()}}
    path = write_result("probe_noise", summary, details, "python benchmarks/probe_noise.py " + " ".join(sys.argv[1:]))
    _plot(all_paces, mults)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(paces: dict, mults: tuple) -> None:
    fig = figure((11, 4))
    axes = fig.subplots(1, len(paces), sharey=True)
    for ax, (condition, by_name) in zip(axes, paces.items()):
        for k, (name, by_m) in enumerate(by_name.items()):
            for j, m in enumerate(mults):
                v = by_m[m]
                ax.scatter([j + (k - 0.5) * 0.25] * len(v), v, s=12, color=("tab:orange", "tab:blue")[k], label=name if j == 0 else None)
        ax.set_xticks(range(len(mults)), [f"x{m}" for m in mults])
        ax.set_title(f"{condition} host: mean of 2 steps vs fastest of 3")
        ax.grid(alpha=0.3)
        ax.legend()
    axes[0].set_ylabel("probe pace (training images/s)")
    fig.tight_layout()
    fig.savefig(RESULTS / "probe_noise.png", dpi=120)


if __name__ == "__main__":
    main()
