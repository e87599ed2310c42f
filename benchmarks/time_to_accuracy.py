"""Time to accuracy on full CIFAR-10: the dense baseline, the --budget default, and one trick switched at a time.

    python benchmarks/time_to_accuracy.py [--cifar ../shared/data/cifar10] [--fashion ../shared/data/fashion_mnist]
                                          [--budget 15m] [--short 5m] [--fashion-budget 5m]   # about 95 minutes on 2 cores

Runs, one after another on the same data and split (the host is shared: compare only within one run):

- ``baseline``: the foundation's dense baseline, resnet20 for 15 epochs at full size without test-time
  augmentation, with the foundation's label smoothing (``arch=resnet20 epochs=15 low_res=1 tta=false
  label_smoothing=0.1``; 0.1 was the default until 2026-11-25);
- ``default``: ``bonsai fit DATA --budget 15m`` with every default;
- ``default_third``: the same with a third of the baseline's time to its accuracy as its budget: the 3x target,
  tested directly on whatever machine runs the benchmark;
- ``default_short``: the same with the short budget (5 minutes);
- ``short_reference``: ``default_short`` again, measuring the test set only once, after training
  (``test_each_epoch=false``), as every ablation below does to keep the benchmark near 95 minutes. It is their
  reference. The anytime predictions written at each new best epoch cost both runs the same budget-clock time
  (a plain pass over the test set: ``default_short`` takes it from its per-epoch test pass and is charged that
  view's share), so the pair should train about equally long; before that charge the per-epoch pass made them
  free, and this pair measured the difference (2 epochs, 0.44 points at 5 minutes on 2026-11-24). The ablations, one switched at a time under the short budget:
  ``no_low_res`` (train.low_res=1), ``label_smoothing`` (train.label_smoothing=0.1, off by default since
  2026-11-25, switched on; results before then hold ``no_label_smoothing``, 0 against 0.1), ``fp32``
  (train.precision=fp32, which also leaves AMX/AVX-512 bf16 unused), ``no_plan`` (arch=bonsai model.pool=true:
  the pooled 1x network whatever the budget), ``no_pool`` (model.pool=false: the planned network downsamples by
  strided convs), ``prune`` (--prune: PruneTrain on the planned network, which switches the default --adapt off),
  ``lookahead`` (train.lookahead=0.95, off by default, switched on), ``no_adapt`` (adapt.on=false: the planner's
  pick trained as it is, not grown into from a narrower start; a x0.5 pick (the short budget on this host) starts at itself
  either way since 2026-11-24, so there it differs only by the controller); ``no_tta``
  re-evaluates ``default_short``'s best model without test-time augmentation and ``no_tta_shift`` with the
  mirror only, without the shifted views (no extra training);
- ``fashion_mnist``: ``bonsai fit ../shared/data/fashion_mnist --budget 5m``, no dataset-specific settings.

Test accuracy is measured after every epoch for the curves of the baseline and the default runs only (it never
steers training; the other runs measure it once, after training); each curve ends with
the best model's final predictions (with every test-time view) at the run's last budget-clock time plus the time
those test-set predictions took. Times are the budget
clock (training steps + validation + checkpoints + the anytime predictions; data loading, the planner's probe,
the per-epoch test evaluation beyond its charged plain view, and the final prediction excluded), so a run with
per-epoch test accuracy trains about as long as one without test labels. A bf16 matmul peak is measured at the start and end of the benchmark; the
default's achieved training FLOP/s is reported as a share of it. Writes benchmarks/results/time_to_accuracy.json
(summary: seconds_to_90, speedup_vs_baseline, fashion_mnist_test_acc, fashion_mnist_train_s, ...) and
time_to_accuracy.png; run directories go to benchmarks/runs/tta_*.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, figure, matmul_peak, write_result  # noqa: E402

import bonsai  # noqa: E402
from bonsai.data.sources import load_dataset  # noqa: E402
from bonsai.report.log import read_jsonl  # noqa: E402


ABLATIONS = ("no_low_res", "label_smoothing", "fp32", "no_plan", "no_pool", "no_tta", "no_tta_shift", "prune", "lookahead", "no_adapt")
# ablations of former defaults, which --replot draws from the results that hold them (beside their successors);
# --reuse finds no run directory for a renamed ablation (tta_no_label_smoothing is from before label_smoothing)
FORMER = ("no_label_smoothing",)
BARS = (ABLATIONS[0], *FORMER, *ABLATIONS[1:])


def time_to(curve: list[dict], target: float, key: str = "clock_s") -> float | None:
    """The first time on ``curve`` at which test accuracy reaches ``target``; None if it never does."""
    for r in curve:
        if r.get("test_acc") is not None and r["test_acc"] >= target - 1e-9:
            return r[key]
    return None


def baseline_seconds(base: dict) -> float:
    """The baseline's own time to its final accuracy (its last curve point if no epoch's test accuracy matches)."""
    return time_to(base["curve"], base["summary"]["test_acc"]) or base["curve"][-1]["clock_s"]


def fit(ds, name: str, runs: Path, quiet: bool, reuse: bool = False, **kw) -> dict:
    """Train run ``name`` (or, with ``reuse``, read the finished run directory a previous invocation left)."""
    out = runs / f"tta_{name}"
    wall = None
    if reuse:
        run = bonsai.load(out)
    else:
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        run = bonsai.fit(ds, out=str(out), quiet=quiet, **kw)
        wall = round(time.perf_counter() - t0, 1)
    records = list(read_jsonl(out / "metrics.jsonl"))
    keys = ("epoch", "train_time_s", "clock_s", "anytime_s", "val_acc", "test_acc", "images_per_s", "train_image_size")
    curve = [{k: r.get(k) for k in keys} for r in records]
    # the anytime predictions' budget-clock seconds (None for run directories from before they were recorded)
    anytime = round(sum(r["anytime_s"] or 0.0 for r in records), 1) if all("anytime_s" in r for r in records) else None
    plan = [e for e in read_jsonl(out / "events.jsonl") if e.get("event") == "plan"]
    s = run.summary
    # the final predictions of the best model (with the shifted views that per-epoch evaluation leaves out), placed
    # at the end of the budget clock plus the time they took: for every run, their cost is counted
    end = round(s["clock_s"] + s.get("predict_s", 0.0), 3)
    curve.append({"epoch": "final", "train_time_s": s["train_time_s"], "clock_s": end, "val_acc": s["val_acc"], "test_acc": s["test_acc"]})
    print(f"{name}: test {s['test_acc']:.4f}, {s['epochs']} epochs, clock {s['clock_s']:.0f}s, arch {s['arch']}", flush=True)
    return {"config": kw, "summary": s, "curve": curve, "plan": plan[0] if plan else None, "wall_s": wall, "anytime_s": anytime, "run": run}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cifar", default="../shared/data/cifar10")
    ap.add_argument("--fashion", default="../shared/data/fashion_mnist")
    ap.add_argument("--budget", default="15m", help="budget of the default run")
    ap.add_argument("--short", default="5m", help="budget of the short default and of every ablation")
    ap.add_argument("--fashion-budget", default="5m")
    ap.add_argument("--baseline-epochs", type=int, default=15)
    ap.add_argument("--only", default="", help="comma-separated run names (for a partial re-run; no result written)")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="no training: summarize the run directories a previous invocation of this version left")
    ap.add_argument("--replot", action="store_true", help="no training: redraw time_to_accuracy.png from the committed results JSON")
    args = ap.parse_args()
    if args.replot:
        import json

        doc = json.loads((RESULTS / "time_to_accuracy.json").read_text())
        details = {k: v for k, v in doc["details"].items() if isinstance(v, dict)}
        _plot(details, details["baseline"]["summary"]["test_acc"])
        print(f"redrew {RESULTS / 'time_to_accuracy.png'}")
        return
    for p in (args.cifar, args.fashion):
        if not Path(p).exists():
            raise SystemExit(f"{p}: not found; see ../shared/data/README.md")
    runs = Path(args.runs)
    peak0 = matmul_peak()
    print(f"bf16 matmul peak: {peak0:.0f} GFLOP/s", flush=True)

    cifar = load_dataset(args.cifar)
    print(f"CIFAR-10: {len(cifar.train)} train, {len(cifar.test)} test images, size {cifar.image_size}", flush=True)
    plan = {
        "baseline": dict(arch="resnet20", epochs=args.baseline_epochs, low_res=1.0, tta=False, label_smoothing=0.1),
        "default": dict(budget=args.budget),
        "default_third": None,  # budget: a third of the baseline's time to its accuracy, known once it has run
        "default_short": dict(budget=args.short),
        "short_reference": dict(budget=args.short, test_each_epoch=False),
        "no_low_res": dict(budget=args.short, low_res=1.0),
        "label_smoothing": dict(budget=args.short, label_smoothing=0.1),
        "fp32": dict(budget=args.short, precision="fp32"),
        "no_plan": {"budget": args.short, "arch": "bonsai", "model.pool": True},
        "prune": {"budget": args.short, "prune.enabled": True},
        "no_pool": {"budget": args.short, "model.pool": False},
        "lookahead": {"budget": args.short, "train.lookahead": 0.95},
        "no_adapt": {"budget": args.short, "adapt.on": False},
    }
    for name in ABLATIONS:  # an ablation reports its final test accuracy only: no per-epoch test pass
        if name in plan:
            plan[name]["test_each_epoch"] = False
    only = {x for x in args.only.split(",") if x}
    details = {}
    for name, kw in plan.items():
        if name == "default_third" and (not only or name in only):
            if "baseline" not in details:
                raise SystemExit("default_third needs the baseline run: add it to --only")
            kw = dict(budget=f"{int(baseline_seconds(details['baseline']) / 3)}s")
        if not only or name in only:
            details[name] = fit(cifar, name, runs, args.quiet, args.reuse, **kw)
    if "default_short" in details:  # test-time augmentation off: the same model, evaluated without it
        r = details["default_short"]["run"]
        x_test = cifar.test.x.permute(0, 2, 3, 1).numpy()
        for name, kw in (("no_tta", {"tta": False}), ("no_tta_shift", {"tta_shift": 0})):
            probs = r.predict(x_test, **kw).probs
            acc = float((probs.argmax(1) == cifar.test.y.numpy()).mean())
            details[name] = {"config": {"re-evaluated": "default_short", **kw}, "summary": {"test_acc": acc}}
            print(f"{name}: test {acc:.4f}", flush=True)
    del cifar
    if not only or "fashion_mnist" in only:
        fashion = load_dataset(args.fashion)
        details["fashion_mnist"] = fit(fashion, "fashion_mnist", runs, args.quiet, args.reuse, budget=args.fashion_budget)
    peak1 = matmul_peak()
    for d in details.values():
        d.pop("run", None)
    if only:
        print({k: v["summary"].get("test_acc") for k, v in details.items()})
        return

    base = details["baseline"]
    target = base["summary"]["test_acc"]
    base_s = baseline_seconds(base)
    reach = {k: time_to(d["curve"], target) for k, d in details.items() if k in ("default", "default_third", "default_short")}
    fastest = min((v for v in reach.values() if v is not None), default=None)
    to90 = [t for k, d in details.items() if k != "fashion_mnist" and "curve" in d for t in [time_to(d["curve"], 0.90)] if t is not None]
    peak = max(peak0, peak1)
    dflt = details["default"]["summary"]
    def delta(k: str) -> dict:  # re-evaluations of default_short's model against it; trained ablations against their reference
        ref = details["default_short" if k in ("no_tta", "no_tta_shift") else "short_reference"]["summary"]["test_acc"]
        return {"test_acc": details[k]["summary"]["test_acc"], "delta_points": round(100 * (details[k]["summary"]["test_acc"] - ref), 2)}

    ablation = {k: delta(k) for k in ABLATIONS}
    short, ref = details["default_short"]["summary"], details["short_reference"]["summary"]
    summary = {
        "seconds_to_90": min(to90) if to90 else None,
        "best_cifar10_test_acc": max(d["summary"]["test_acc"] for k, d in details.items() if k != "fashion_mnist"),
        "default_test_acc": dflt["test_acc"],
        "default_clock_s": dflt["clock_s"],
        "default_arch": dflt["arch"],  # the start's name; default_widths are the widths it ended at
        "default_widths": dflt.get("widths"),
        "default_short_test_acc": short["test_acc"],
        # the same run without the per-epoch test pass: both are charged for their anytime predictions
        "short_reference_test_acc": ref["test_acc"],
        "anytime_predictions": {
            "epochs_with_test_pass": short["epochs"], "epochs_without": ref["epochs"],
            "clock_s_with_test_pass": details["default_short"].get("anytime_s"), "clock_s_without": details["short_reference"].get("anytime_s"),
        },
        "default_third_test_acc": details["default_third"]["summary"]["test_acc"],
        "default_third_clock_s": details["default_third"]["summary"]["clock_s"],
        "baseline_test_acc": target,
        "baseline_clock_s": base_s,
        "seconds_to_baseline_acc": reach,
        "speedup_vs_baseline": None if fastest is None else round(base_s / fastest, 2),
        "ablation_short_budget": ablation,
        "fashion_mnist_test_acc": details["fashion_mnist"]["summary"]["test_acc"],
        "fashion_mnist_train_s": details["fashion_mnist"]["summary"]["train_time_s"],
        "fashion_mnist_clock_s": details["fashion_mnist"]["summary"]["clock_s"],
        "matmul_peak_gflops": round(peak, 1),
        "default_train_gflops": dflt["train_gflops_per_s"],
        "default_flops_share_of_peak": round(dflt["train_gflops_per_s"] / peak, 3),
        "budgets": {"default": args.budget, "third": details["default_third"]["config"]["budget"], "short": args.short, "fashion_mnist": args.fashion_budget},
    }
    cmd = "python benchmarks/time_to_accuracy.py " + " ".join(sys.argv[1:])
    path = write_result("time_to_accuracy", summary, details | {"matmul_peak_gflops": [round(peak0, 1), round(peak1, 1)]}, cmd.strip())
    _plot(details, target)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(details: dict, target: float) -> None:
    fig = figure((12, 4.5))
    ax, bx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [3, 2]})
    for name, d in details.items():
        if "curve" not in d or name == "fashion_mnist":
            continue
        c = [r for r in d["curve"] if r.get("test_acc") is not None]  # an ablation has its final point only
        main = name in ("baseline", "default", "default_third", "default_short")
        ax.plot(
            [r["clock_s"] for r in c], [100 * r["test_acc"] for r in c], marker="o", ms=3 if main else 2,
            lw=2 if main else 0.8, alpha=1 if main else 0.6, label=f"{name} ({d['summary']['arch']}): {d['summary']['test_acc']:.1%}",
        )
    ax.axhline(100 * target, color="grey", ls=":", lw=1)
    ax.axhline(90, color="black", ls="--", lw=0.8)
    ax.set_xlabel("budget clock (s): training + validation + anytime predictions")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(40, 95)
    ax.set_title("CIFAR-10 (JPEG q75 copy), 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    names = ["default_short", "short_reference", *BARS]
    names = [n for n in names if n in details]
    accs = [100 * details[n]["summary"]["test_acc"] for n in names]
    bars = bx.barh(names[::-1], accs[::-1], color=["tab:blue" if n in ("default_short", "short_reference") else "tab:grey" for n in names[::-1]])
    for b, a in zip(bars, accs[::-1]):
        bx.text(a + 0.2, b.get_y() + b.get_height() / 2, f"{a:.1f}", va="center", fontsize=8)
    bx.set_xlim(min(accs) - 5, max(accs) + 3)
    bx.set_xlabel("test accuracy (%)")
    bx.set_title("one trick switched at a time (short budget)")
    fig.tight_layout()
    fig.savefig(RESULTS / "time_to_accuracy.png", dpi=120)


if __name__ == "__main__":
    main()
