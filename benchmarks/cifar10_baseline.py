"""The dense baseline every later method is measured against: full CIFAR-10, test accuracy vs training time.

    python benchmarks/cifar10_baseline.py [--data ../shared/data/cifar10] [--epochs 15] [--budget 15m]

Two bonsai fits in one run, on the same data and split: resnet20 for a fixed number of epochs, and the default
arch under a wall-clock budget. The data is a JPEG (q75) copy of CIFAR-10, so accuracies run about 2-3 points
under published CIFAR-10 figures. Test accuracy is measured after every epoch for the curve only (it never
steers training); the time axis is training time (steps only, evaluation excluded). Writes
benchmarks/results/cifar10_baseline.json and cifar10_baseline.png; run directories go to benchmarks/runs/.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, write_result  # noqa: E402

from bonsai.report.log import read_jsonl  # noqa: E402

import bonsai  # noqa: E402
from bonsai.data.sources import load_dataset  # noqa: E402
from bonsai.models.arch import DEFAULT_ARCH  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--epochs", type=int, default=15, help="epochs for resnet20")
    ap.add_argument("--budget", default="15m", help="budget for the default arch")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if not Path(args.data).exists():
        raise SystemExit(f"{args.data}: not found; point --data at the CIFAR-10 .npz parts (see ../shared/data/README.md)")

    ds = load_dataset(args.data)
    print(f"CIFAR-10: {len(ds.train)} train, {len(ds.test)} test images, size {ds.image_size}", flush=True)
    runs = {
        "resnet20": dict(arch="resnet20", epochs=args.epochs),
        "default": dict(arch=DEFAULT_ARCH, budget=args.budget),
    }
    details = {}
    for name, kw in runs.items():
        out = Path(args.runs) / f"cifar10_{name}"
        shutil.rmtree(out, ignore_errors=True)
        run = bonsai.fit(ds, out=str(out), quiet=args.quiet, **kw)
        curve = read_jsonl(out / "metrics.jsonl")
        details[name] = {
            "config": kw,
            "summary": run.summary,
            "curve": [{k: r[k] for k in ("epoch", "train_time_s", "clock_s", "val_acc", "test_acc", "images_per_s")} for r in curve],
        }
        print(f"{name}: test {run.summary['test_acc']:.4f} after {run.summary['train_time_s']:.0f}s training", flush=True)

    r20, dflt = details["resnet20"]["summary"], details["default"]["summary"]
    summary = {
        "resnet20_test_acc": r20["test_acc"],
        "resnet20_train_s": r20["train_time_s"],
        "resnet20_epochs": r20["epochs"],
        "default_arch": DEFAULT_ARCH,
        "default_test_acc": dflt["test_acc"],
        "default_train_s": dflt["train_time_s"],
        "default_clock_s": dflt["clock_s"],
        "default_epochs": dflt["epochs"],
        "default_budget": args.budget,
    }
    cmd = "python benchmarks/cifar10_baseline.py " + " ".join(sys.argv[1:])
    path = write_result("cifar10_baseline", summary, details, cmd.strip())
    _plot(details)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(details: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, d in details.items():
        c = d["curve"]
        label = f"{d['summary']['arch']} ({name}): {d['summary']['test_acc']:.1%}"
        ax.plot([r["train_time_s"] for r in c], [100 * r["test_acc"] for r in c], marker="o", ms=3, label=label)
    ax.set_xlabel("training time (s, evaluation excluded)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("CIFAR-10 (JPEG q75 copy) on this 2-core CPU")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "cifar10_baseline.png", dpi=120)


if __name__ == "__main__":
    main()
