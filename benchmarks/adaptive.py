"""Adaptive training on full CIFAR-10: fixed architectures, PruneTrain and --adapt under one equal wall-clock budget.

    python benchmarks/adaptive.py [--data ../shared/data/cifar10] [--budget 15m] [--small auto] [--large resnet56]

Runs, one after another, each as its own `bonsai fit DATA --budget B` process (about 125 minutes at 15m):

- ``resnet20``, ``resnet56``: the fixed dense architectures;
- ``default``: ``bonsai fit DATA --budget B --no-adapt``, the default before ``--adapt`` measured ahead of it: the
  budget planner's pick of the default family (the ``bonsai`` preset scaled to fit the budget, conv-pool
  downsampling) trained as it is, a fixed architecture too;
- ``prunetrain``: the large net with ``--prune`` (PruneTrain only: penalty over the first half, channels and blocks
  removed, no growth);
- ``adapt_small``, ``adapt_large``: ``--adapt`` from the small and from the large net. The small start is, by
  default (``--small auto``), ``bonsai fit DATA --budget B --adapt`` with no ``--arch``: narrower than the
  planner's pick (e.g. ``bonsai`` x0.5 for a x0.75 pick; ``bonsai.train.plan.adapt_start``), grown to the pick
  after the first epoch, so that it ends at about the planned network's size. ``--small PRESET*MULT`` (e.g.
  ``bonsai*0.5``) starts from that network with conv-pool downsampling and the probed FLOP target instead. The
  large is resnet56;
- ``scratch_grown``: the architecture ``adapt_small`` ended with, trained from scratch under the same budget
  (Net2Net's claim: growing reaches an accuracy sooner than training the grown network from the start).

Every run has the same defaults otherwise (schedule over the budget, progressive resizing, bf16); the --adapt runs
size the network to the FLOP target the budget affords in the first fifth of the run (the ``adapt_target``
event). Test accuracy is measured after every epoch for the curves only (it never steers training); times are the
budget clock (training steps + validation + checkpoints). Accuracy is the final network's, so that it and the FLOPs describe one model.
Summary: ``adapt_acc`` and ``adapt_flops`` (the better --adapt run), ``best_fixed_acc`` and ``best_fixed_flops``
(the best fixed dense run: resnet20, resnet56 or the default), ``net2net_time_ratio`` (budget-clock time to the
lower of the two final accuracies of ``adapt_small`` and ``scratch_grown``, with growth / from scratch; None when
``adapt_small`` never grew).
Writes benchmarks/results/adaptive.json and adaptive.png. Use --limit and a short --budget to smoke-test; --reuse
reads runs a previous invocation finished instead of training them again (their peak memory is then unknown).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, portable, run_fit, write_result  # noqa: E402
from prunetrain import _subset  # noqa: E402

from bonsai.report.log import read_jsonl  # noqa: E402
from safetensors import safe_open  # noqa: E402


def time_to(curve: list[dict], target: float) -> float | None:
    """The first budget-clock time on ``curve`` at which test accuracy reaches ``target``; None if never."""
    for r in curve:
        if r.get("test_acc") is not None and r["test_acc"] >= target - 1e-9:
            return r["clock_s"]
    return None


def _grew(e: dict) -> bool:
    """Whether a decision or surgery event grew the network: a widen or deepen decision, or a MorphNet step (at the
    sizing phase's end) that added FLOPs."""
    if e["event"] == "adapt":
        return e["decision"] in ("widen", "deepen")
    return e["event"] == "morph" and (e.get("flops_after") or 0) > (e.get("flops_before") or 0)


def _arch(name: str, where: Path) -> str:
    """``--arch`` for ``name``: a preset or arch.json as is; ``PRESET*MULT`` written to an arch.json in ``where``
    (the runs directory: a stable path, so that --reuse finds the same arguments)."""
    if "*" not in name:
        return name
    from bonsai.models.arch import preset
    from bonsai.train.plan import scaled

    base, mult = name.split("*")
    where.mkdir(parents=True, exist_ok=True)
    path = where / f"{base}x{mult}.json"
    scaled(preset(base), float(mult)).to_json(path)
    return str(path)


def _fit(data: str, out: Path, args: list[str], reuse: bool = False) -> dict:
    """Train with `bonsai fit` in its own process (or, with ``reuse``, read the finished run directory ``out``)."""
    rss = None
    if not reuse:
        rss = run_fit(data, out, args)
    elif not (out / "summary.json").is_file():
        raise SystemExit(f"{out}: no finished run to reuse")
    summary = json.loads((out / "summary.json").read_text())
    metrics, events = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "events.jsonl")
    # the final network's architecture (the checkpoint's; arch.json is the best-by-validation model's)
    with safe_open(str(out / "checkpoint.safetensors"), "pt") as f:
        arch = json.loads(f.metadata()["arch"])
    last = metrics[-1]
    res = {
        "args": args,
        "test_acc": last["test_acc"],
        "best_val_model_test_acc": summary["test_acc"],
        "clock_s": summary["clock_s"],
        "train_time_s": summary["train_time_s"],
        "epochs": summary["epochs"],
        "train_flops": summary["train_flops"],
        "inference_flops": last["flops_per_image"],
        "params": last.get("params"),
        "peak_rss_mib": rss,
        "reused": reuse,
        "final_widths": last["widths"],
        "final_depths": [len(b) for b in last["block_ids"]] if last.get("block_ids") else None,
        "adapt_target": next(({k: e.get(k) for k in ("target_flops", "start_flops", "source", "start_multiplier", "plan_multiplier", "images_per_s", "expected_epochs", "refined")} for e in events if e.get("event") == "adapt_target"), None),
        "lasso_lpr": next((e["lpr"] for e in events if e.get("event") == "lasso"), None),
        "decisions": [
            {k: e.get(k) for k in ("epoch", "event", "decision", "stages", "reason", "flops_before", "flops_after", "blocks_removed")}
            for e in events
            if e.get("event") in ("adapt", "prune", "morph") and e.get("decision") != "continue"
        ],
        "curve": [{k: m.get(k) for k in ("epoch", "clock_s", "val_acc", "test_acc", "flops_per_image", "widths", "block_ids")} for m in metrics],
        "arch_json": arch,
    }
    print(f"{out.name}: test {res['test_acc']:.4f}, {res['epochs']} epochs, FLOPs {res['inference_flops'] / 1e6:.1f}M", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--budget", default="15m", help="wall-clock budget of every run")
    ap.add_argument("--small", default="auto", help="the net --adapt grows from: auto (narrower than the planner's pick, as bonsai fit --adapt starts), a preset, or PRESET*MULT (its widths scaled as the planner does)")
    ap.add_argument("--large", default="resnet56", help="the net --adapt and PruneTrain shrink from")
    ap.add_argument("--only", default="", help="comma-separated run names (a partial re-run; no result written)")
    ap.add_argument("--reuse", default="", help="comma-separated run names whose finished run directories are read, not trained again")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke test)")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    args = ap.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: not found; point --data at the CIFAR-10 .npz parts (see ../shared/data/README.md)")
    runs, b = Path(args.runs), ["--budget", args.budget]
    plan = {
        "resnet20": ["--arch", "resnet20", *b],
        "resnet56": ["--arch", "resnet56", *b],
        "default": ["--arch", "auto", "--no-adapt", *b],
        "prunetrain": ["--arch", args.large, "--prune", *b],
        "adapt_small": ["--arch", args.small, "--adapt", *([] if args.small == "auto" else ["model.pool=true"]), *b],
        "adapt_large": ["--arch", args.large, "--adapt", *b],
    }
    only = {x for x in args.only.split(",") if x}
    reuse = {x for x in args.reuse.split(",") if x}
    details: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset(args.data, args.limit, Path(tmp)) if args.limit else args.data
        for name, cli in plan.items():
            if not only or name in only:
                named = cli[1]
                cli = [cli[0], _arch(named, runs), *cli[2:]]
                details[name] = _fit(data, runs / f"adaptive_{name}", cli, name in reuse)
                details[name]["args"][1] = named  # not a temporary path
        grown = details.get("adapt_small", {})
        if grown and any(_grew(d) for d in grown["decisions"]):
            arch = Path(tmp) / "grown_arch.json"
            arch.write_text(json.dumps(grown["arch_json"]))
            details["scratch_grown"] = _fit(data, runs / "adaptive_scratch_grown", ["--arch", str(arch), *b], "scratch_grown" in reuse)
            details["scratch_grown"]["args"][1] = "grown_arch.json (adapt_small's final architecture)"  # not a temporary path
    for d in details.values():
        d.pop("arch_json", None)
    if only:
        print({k: v["test_acc"] for k, v in details.items()})
        return

    fixed = max(("resnet20", "resnet56", "default"), key=lambda k: details[k]["test_acc"])
    adapt = max(("adapt_small", "adapt_large"), key=lambda k: details[k]["test_acc"])
    ratio = target = None
    if "scratch_grown" in details:
        g, s = details["adapt_small"], details["scratch_grown"]
        target = min(g["test_acc"], s["test_acc"])
        tg, ts = time_to(g["curve"], target), time_to(s["curve"], target)
        ratio = None if tg is None or ts is None else round(tg / ts, 3)
    summary = {
        "budget": args.budget,
        "adapt_acc": details[adapt]["test_acc"],
        "adapt_run": adapt,
        "adapt_flops": details[adapt]["inference_flops"],
        "best_fixed_acc": details[fixed]["test_acc"],
        "best_fixed_run": fixed,
        "best_fixed_flops": details[fixed]["inference_flops"],
        "net2net_time_ratio": ratio,
        "net2net_target_acc": target,
        "by_run": {
            k: {
                "test_acc": v["test_acc"],
                "inference_flops": v["inference_flops"],
                "params": v["params"],
                "epochs": v["epochs"],
                "clock_s": v["clock_s"],
                "final_depths": v["final_depths"],
                "target_flops": (v.get("adapt_target") or {}).get("target_flops"),
            }
            for k, v in details.items()
        },
    }
    if args.limit:
        summary["smoke_test_limit"] = args.limit
    name = "adaptive" if not args.limit else "adaptive_smoke"
    path = write_result(name, summary, details, "python benchmarks/adaptive.py " + portable(sys.argv[1:]))
    _plot(details, name, target)
    print(f"wrote {path}\nsummary: {json.dumps(summary, indent=1)}")


def _plot(details: dict, name: str, target: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.5))
    for run, d in details.items():
        c = d["curve"]
        ax.plot([r["clock_s"] for r in c], [100 * r["test_acc"] for r in c], marker="o", ms=3, label=f"{run}: {d['test_acc']:.1%}")
        marks = {}  # mark growth and shedding on the curve, one label per epoch (a widen to the target logs a morph too)
        for e in d["decisions"]:
            if _grew(e) or (e["event"] == "morph" and e.get("blocks_removed")):
                marks[e["epoch"]] = "".join(sorted(set(marks.get(e["epoch"], "")) | {"g" if _grew(e) else "s"}))
        for epoch, label in marks.items():
            r = next((r for r in c if r["epoch"] == epoch), None)
            if r:
                ax.annotate(label, (r["clock_s"], 100 * r["test_acc"]), fontsize=8, xytext=(0, 6), textcoords="offset points")
        bx.scatter(d["inference_flops"] / 1e6, 100 * d["test_acc"], s=30)
        bx.annotate(run, (d["inference_flops"] / 1e6, 100 * d["test_acc"]), fontsize=8, xytext=(4, 2), textcoords="offset points")
    if target is not None:
        ax.axhline(100 * target, color="grey", ls=":", lw=1)
    ax.set_xlabel("budget clock (s): training + validation")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CIFAR-10, equal budget (g: grown, s: blocks shed)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    bx.set_xscale("log")
    bx.set_xlabel("inference FLOPs per image of the final network (M)")
    bx.set_ylabel("test accuracy (%)")
    bx.grid(alpha=0.3)
    bx.set_title("final networks")
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
