"""PruneTrain on full CIFAR-10: dense vs pruned runs of the same archs, epochs and schedule, back to back.

    python benchmarks/prunetrain.py [--data ../shared/data/cifar10] [--epochs 10] [--archs resnet32,bonsai]
                                    [--lpr 0.5,0.35] [--set key=value ...]

Each fit runs as its own `bonsai fit` process, so that its peak memory (max RSS, from os.wait4) is its own.
Reported per run: test accuracy of the final network, total training FLOPs (3 x forward per image), inference FLOPs per image of the
final network, training wall time (steps only), peak memory. The summary gives the reductions of the pruned runs
against the dense ones for the first arch. Writes benchmarks/results/prunetrain.json and prunetrain.png (the width
of every layer across epochs, and test accuracy vs training time). Use --limit to smoke-test on a subset.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, portable, run_fit, write_result  # noqa: E402

from bonsai.report.html import aligned_widths  # noqa: E402
from bonsai.report.log import read_jsonl  # noqa: E402


def _subset(data: str, limit: int, tmp: Path) -> str:
    """A stratified-enough prefix of the dataset for smoke tests (the npz parts are shuffled already)."""
    from bonsai.data.sources import load_dataset

    ds = load_dataset(data)
    x = ds.train.x[:limit].permute(0, 2, 3, 1).numpy()
    xt = ds.test.x[: max(limit // 5, 10)].permute(0, 2, 3, 1).numpy()
    path = tmp / "subset.npz"
    np.savez(path, x_train=x, y_train=ds.train.y[:limit].numpy(), x_test=xt, y_test=ds.test.y[: len(xt)].numpy(), classes=np.array(ds.classes))
    return str(path)


def _fit(data: str, out: Path, args: list[str], reuse: bool = False) -> dict:
    rss = run_fit(data, out, args, reuse=reuse)
    summary = json.loads((out / "summary.json").read_text())
    metrics, events = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "events.jsonl")
    # the final network (no reconfiguration follows the last epoch), not the best-by-validation checkpoint, so
    # that accuracy and FLOPs describe the same model
    return {
        "test_acc": metrics[-1]["test_acc"],
        "best_val_model_test_acc": summary["test_acc"],
        "train_time_s": summary["train_time_s"],
        "train_flops": summary["train_flops"],
        "inference_flops": metrics[-1]["flops_per_image"],
        "peak_rss_mib": rss,
        "epochs": summary["epochs"],
        "events": events,
        "curve": [{k: m[k] for k in ("epoch", "train_time_s", "test_acc", "flops_per_image", "batch_size", "widths", "block_ids") if k in m} for m in metrics],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--archs", default="resnet32,bonsai")
    ap.add_argument("--lpr", default="0.5,0.35", help="comma-separated LPRs, one pruned run each; the summary uses the first")
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config for the pruned runs")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke test)")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--name", default="prunetrain", help="results/<name>.json and .png (a repeat can keep the first)")
    ap.add_argument(
        "--reuse", action="store_true",
        help="read the run directories an earlier call with the same arguments finished instead of training them again "
        "(checked against their benchmark.json; runs from before it was written: not checked, peak memory unknown)",
    )
    args = ap.parse_args()
    if args.reuse and args.limit:
        raise SystemExit("--reuse cannot be combined with --limit: the subset is rebuilt on every call")
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: not found; point --data at the CIFAR-10 .npz parts (see ../shared/data/README.md)")
    lprs = [float(v) for v in args.lpr.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset(args.data, args.limit, Path(tmp)) if args.limit else args.data
        details = {}
        for arch in args.archs.split(","):
            common = ["--arch", arch, "--epochs", str(args.epochs)]
            dense = _fit(data, Path(args.runs) / f"{args.name}_{arch}_dense", common, args.reuse)
            details[arch] = {"dense": dense}
            for i, lpr in enumerate(lprs):
                # the first LPR's run is "pruned"; further ones are "pruned_lpr<value>"
                key = "pruned" if i == 0 else f"pruned_lpr{lpr}"
                run = _fit(data, Path(args.runs) / f"{args.name}_{arch}_{key}", [*common, "--prune", f"prune.lpr={lpr}", *args.set], args.reuse)
                details[arch][key] = run
                print(arch, key, {k: (dense[k], run[k]) for k in ("test_acc", "train_time_s", "inference_flops", "peak_rss_mib")}, flush=True)

    first = details[args.archs.split(",")[0]]
    d, p = first["dense"], first["pruned"]
    summary = {
        "arch": args.archs.split(",")[0],
        "epochs": args.epochs,
        "lpr": lprs[0],
        "train_flops_reduction": round(1 - p["train_flops"] / d["train_flops"], 4),
        "inference_flops_reduction": round(1 - p["inference_flops"] / d["inference_flops"], 4),
        "wall_time_reduction": round(1 - p["train_time_s"] / d["train_time_s"], 4),
        "acc_drop_points": round(100 * (d["test_acc"] - p["test_acc"]), 2),
        "by_run": {
            f"{a}/{key}": {
                "dense_test_acc": v["dense"]["test_acc"],
                "pruned_test_acc": r["test_acc"],
                "acc_drop_points": round(100 * (v["dense"]["test_acc"] - r["test_acc"]), 2),
                "train_flops_reduction": round(1 - r["train_flops"] / v["dense"]["train_flops"], 4),
                "inference_flops_reduction": round(1 - r["inference_flops"] / v["dense"]["inference_flops"], 4),
                "wall_time_reduction": round(1 - r["train_time_s"] / v["dense"]["train_time_s"], 4),
                "peak_rss_mib": {"dense": v["dense"]["peak_rss_mib"], "pruned": r["peak_rss_mib"]},
                "final_depths": [len(b) for b in r["curve"][-1].get("block_ids", [])] or None,
                "final_widths": r["curve"][-1]["widths"],
            }
            for a, v in details.items()
            for key, r in v.items()
            if key != "dense"
        },
    }
    if args.limit:
        summary["smoke_test_limit"] = args.limit
    name = args.name if not args.limit else f"{args.name}_smoke"
    path = write_result(name, summary, details, "python benchmarks/prunetrain.py " + portable(sys.argv[1:]))
    _plot(details, name)
    print(f"wrote {path}\nsummary: {json.dumps(summary, indent=1)}")


def _plot(details: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(details)
    fig, axes = plt.subplots(1, len(archs) + 1, figsize=(5 * (len(archs) + 1), 4))
    for ax, arch in zip(axes, archs):
        curve = details[arch]["pruned"]["curve"]
        widths = np.array(aligned_widths(curve)[0], dtype=float).T  # layers (of the starting network) x epochs
        im = ax.imshow(widths, aspect="auto", cmap="viridis", origin="lower", extent=(0.5, len(curve) + 0.5, -0.5, len(widths) - 0.5))
        fig.colorbar(im, ax=ax, label="channels")
        ax.set_xlabel("epoch")
        ax.set_ylabel("conv layer (forward order)")
        ax.set_title(f"{arch} widths while pruning (blank: block removed)")
    ax = axes[-1]
    for arch in archs:
        for kind, c in ((k, r["curve"]) for k, r in details[arch].items()):
            style = "--" if kind == "dense" else "-"
            ax.plot([r["train_time_s"] for r in c], [100 * r["test_acc"] for r in c], style, marker="o", ms=3, label=f"{arch} {kind}")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
