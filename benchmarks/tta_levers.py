"""Levers on the 15-minute default, side by side in one run: which setting moves CIFAR-10 toward 90%?

    python benchmarks/tta_levers.py [--cifar ../shared/data/cifar10] [--budget 15m]   # about 60 minutes on 2 cores

Runs, one after another on the same data (the host is shared: compare only within one run), each
``bonsai fit DATA --budget 15m`` with every default but the settings named. Every run holds out 10% (5,000
images; ``data.budget_val_max=null``) unless it says otherwise: the default as it was when this benchmark was
written, before a budget capped the holdout at 2,000 images (the result of its first run, 2026-11-24):

- ``default``: nothing else changed (the reference);
- ``val_2000``: ``data.val_max=2000``: a holdout of 2,000 images instead of 5,000 (today's default under a
  budget). Validation after every epoch costs a third as much budget-clock time, and 3,000 more images train;
- ``batch_512``: ``train.batch_size=512`` (the peak learning rate scales with it, as always): half the steps,
  larger matrix products per step;
- ``val_2000_batch_512``: both.

Every run measures test accuracy once, after training (``test_each_epoch=false``), and its anytime predictions
(a plain pass over the test set at each new best epoch) are on its budget clock. The final predictions, with
every test-time view, are placed at the end of the budget clock plus their own time: ``seconds_to_90`` is that
point for a run that ends at 90% or more. The ``--runs`` directory holds the run directories (``tta_levers_*``).
Writes benchmarks/results/tta_levers.json (summary: per run its test accuracy, epochs, budget-clock and training
seconds, validation-and-checkpoint seconds and training images/s; ``best``, ``seconds_to_90``) and tta_levers.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, figure, matmul_peak, portable, write_result  # noqa: E402
from time_to_accuracy import fit  # noqa: E402

from bonsai.data.sources import load_dataset  # noqa: E402


TEN_PERCENT = {"data.budget_val_max": None}  # the holdout before the budget's cap: val_fraction (and val_max) alone
VARIANTS = {
    "default": TEN_PERCENT,
    "val_2000": TEN_PERCENT | {"data.val_max": 2000},
    "batch_512": TEN_PERCENT | {"train.batch_size": 512},
    "val_2000_batch_512": TEN_PERCENT | {"data.val_max": 2000, "train.batch_size": 512},
}


def overhead(curve: list[dict]) -> float:
    """Budget-clock seconds that were neither training steps nor anytime predictions: validation, checkpoints,
    the per-epoch bookkeeping (up to the last epoch, from its metrics records)."""
    last = [r for r in curve if r["epoch"] != "final"][-1]
    return round(last["clock_s"] - last["train_time_s"] - sum(r.get("anytime_s") or 0.0 for r in curve if r["epoch"] != "final"), 1)


def full_size_paces(curve: list[dict]) -> list[float]:
    """Training images/s of the epochs at the run's largest training image size (after progressive resizing),
    from its metrics records."""
    epochs = [r for r in curve if r["epoch"] != "final"]
    size = max((r.get("train_image_size") or 0 for r in epochs), default=0)
    return [r["images_per_s"] for r in epochs if r.get("train_image_size") == size and r.get("images_per_s")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default="../shared/data/cifar10")
    ap.add_argument("--budget", default="15m")
    ap.add_argument("--only", default="", help="comma-separated variant names (for a partial re-run; no result written)")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if not Path(args.cifar).exists():
        raise SystemExit(f"{args.cifar}: not found; see ../shared/data/README.md")
    only = [x for x in args.only.split(",") if x]
    unknown = sorted(set(only) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--only: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    runs = Path(args.runs)
    peak0 = matmul_peak()
    print(f"bf16 matmul peak: {peak0:.0f} GFLOP/s", flush=True)
    cifar = load_dataset(args.cifar)
    details = {}
    for name, kw in VARIANTS.items():
        if only and name not in only:
            continue
        d = fit(cifar, f"levers_{name}", runs, args.quiet, budget=args.budget, test_each_epoch=False, **kw)
        d.pop("run", None)
        details[name] = d
    peak1 = matmul_peak()
    rows = {}
    for name, d in details.items():
        s, curve = d["summary"], d["curve"]
        full = full_size_paces(curve)
        rows[name] = {
            "test_acc": s["test_acc"], "val_acc": s["val_acc"], "epochs": s["epochs"], "clock_s": s["clock_s"],
            "train_time_s": s["train_time_s"], "anytime_s": d["anytime_s"], "validation_s": overhead(curve),
            "predict_s": s.get("predict_s"), "widths": s.get("widths"), "train_gflops_per_s": s.get("train_gflops_per_s"),
            "full_size_images_per_s_median": sorted(full)[len(full) // 2] if full else None,
        }
        print(f"{name}: {rows[name]}", flush=True)
    if only:
        return
    ref = rows["default"]["test_acc"]
    for r in rows.values():
        r["delta_points"] = round(100 * (r["test_acc"] - ref), 2)
    ends = [d["curve"][-1]["clock_s"] for n, d in details.items() if rows[n]["test_acc"] >= 0.90 - 1e-9]
    summary = {
        "runs": rows,
        "best": max(rows, key=lambda n: rows[n]["test_acc"]),
        "seconds_to_90": min(ends) if ends else None,
        "budget": args.budget,
        "matmul_peak_gflops": round(max(peak0, peak1), 1),
    }
    cmd = "python benchmarks/tta_levers.py " + portable(sys.argv[1:])
    path = write_result("tta_levers", summary, details | {"matmul_peak_gflops": [round(peak0, 1), round(peak1, 1)]}, cmd.strip())
    _plot(details, rows)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(details: dict, rows: dict) -> None:
    fig = figure((11, 4.2))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for name, d in details.items():
        c = [r for r in d["curve"] if r["epoch"] != "final"]
        ax.plot([r["clock_s"] for r in c], [100 * r["val_acc"] for r in c], marker="o", ms=2.5, lw=1.2, label=f"{name}: test {rows[name]['test_acc']:.2%}")
    ax.axhline(90, color="black", ls="--", lw=0.8)
    ax.set_xlabel("budget clock (s): training + validation + anytime predictions")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_ylim(40, 95)
    ax.set_title("CIFAR-10 (JPEG q75 copy), 2-core CPU, --budget 15m")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    names = list(rows)
    accs = [100 * rows[n]["test_acc"] for n in names]
    bars = bx.barh(names[::-1], accs[::-1], color=["tab:blue" if n == "default" else "tab:grey" for n in names[::-1]])
    for b, a in zip(bars, accs[::-1]):
        bx.text(a + 0.05, b.get_y() + b.get_height() / 2, f"{a:.2f}", va="center", fontsize=8)
    bx.set_xlim(min(accs) - 1.5, max(max(accs) + 0.8, 90.3))
    bx.axvline(90, color="black", ls="--", lw=0.8)
    bx.set_xlabel("test accuracy (%), final predictions with every view")
    bx.set_title("one setting changed at a time")
    fig.tight_layout()
    fig.savefig(RESULTS / "tta_levers.png", dpi=120)


if __name__ == "__main__":
    main()
