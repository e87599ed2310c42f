"""Data-parallel PruneTrain on full CIFAR-10: one process vs two (torchrun + DDP over gloo), same config, back to back.

    python benchmarks/distributed.py [--data ../shared/data/cifar10] [--epochs 10] [--arch resnet32] [--lpr 0.5]
                                     [--set key=value ...] [--limit N]

Both runs train the same network with the same global batch, LR schedule and pruning (`--prune`); one process
uses both cores (2 threads), two processes one core each (torchrun's default of one thread per process). On 2
cores no speed-up is expected: the point is that the distributed path is correct (same decisions, accuracy within
noise) and what it costs. Reported: training throughput (images/s over the time spent in training steps), test
accuracy of the final network, the widths after pruning, and the gradient bytes each rank all-reduces per step
(counted by bonsai's DDP communication hook) in the first epoch and after the last reconfiguration. Writes
benchmarks/results/<name>.json and <name>.png (--name, default distributed). Use --limit to smoke-test on a
subset.
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


def _fit(data: str, out: Path, args: list[str], nproc: int) -> dict:
    rss = run_fit(data, out, args, nproc=nproc)
    summary = json.loads((out / "summary.json").read_text())
    n_train = json.loads((out / "dataset.json").read_text())["train_images_used"]
    metrics, events = read_jsonl(out / "metrics.jsonl"), read_jsonl(out / "events.jsonl")
    train_images = sum(n_train // m["batch_size"] * m["batch_size"] for m in metrics)  # full batches only
    return {
        "processes": nproc,
        "threads_per_process": summary["threads"],
        "test_acc": metrics[-1]["test_acc"],
        "train_time_s": summary["train_time_s"],
        "train_images": train_images,
        "images_per_s": round(train_images / summary["train_time_s"], 1),
        "params_first": metrics[0]["params"],
        "params_last": metrics[-1]["params"],
        "flops_first": metrics[0]["flops_per_image"],
        "flops_last": metrics[-1]["flops_per_image"],
        "widths_last": metrics[-1]["widths"],
        "comm_bytes_per_step": [m.get("comm_bytes_per_step") for m in metrics],
        "peak_rss_mib": rss,
        "epochs": summary["epochs"],
        "prune_events": [{k: e[k] for k in ("epoch", "flops_before", "flops_after", "widths_after")} for e in events if e["event"] == "prune"],
        "curve": [{k: m[k] for k in ("epoch", "train_time_s", "test_acc", "params", "batch_size") if k in m} for m in metrics],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--arch", default="resnet32")
    ap.add_argument("--lpr", type=float, default=0.5)
    ap.add_argument("--set", nargs="*", default=[], metavar="key=value", help="extra config for both runs")
    ap.add_argument("--limit", type=int, default=0, help="use only this many training images (smoke test)")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--name", default="distributed", help="results/<name>.json and .png (a repeat can keep the first)")
    a = ap.parse_args()
    runs = Path(a.runs)
    with tempfile.TemporaryDirectory() as tmp:
        data = _subset(a.data, a.limit, Path(tmp)) if a.limit else a.data
        args = ["--epochs", str(a.epochs), "--arch", a.arch, "--prune", f"prune.lpr={a.lpr}", *a.set]
        one = _fit(data, runs / f"{a.name}_1proc", args, nproc=1)
        two = _fit(data, runs / f"{a.name}_2proc", args, nproc=2)
    comm = two["comm_bytes_per_step"]
    summary = {
        "throughput_ratio_2v1": round(two["images_per_s"] / one["images_per_s"], 3),
        "images_per_s_1proc": one["images_per_s"],
        "images_per_s_2proc": two["images_per_s"],
        "test_acc_1proc": one["test_acc"],
        "test_acc_2proc": two["test_acc"],
        "acc_diff_points": round(100 * (two["test_acc"] - one["test_acc"]), 2),
        "same_final_widths": one["widths_last"] == two["widths_last"],
        "comm_bytes_per_step_first_epoch": comm[0],
        "comm_bytes_per_step_last_epoch": comm[-1],
        "comm_reduction": round(1 - comm[-1] / comm[0], 3),
        "flops_reduction_2proc": round(1 - two["flops_last"] / two["flops_first"], 3),
    }
    details = {"arch": a.arch, "epochs": a.epochs, "lpr": a.lpr, "limit": a.limit, "one_process": one, "two_processes": two}
    path = write_result(a.name, summary, details, "python benchmarks/distributed.py " + portable(sys.argv[1:]))
    print(json.dumps(summary, indent=1))
    print("wrote", path)
    _plot(one, two, a.name)


def _plot(one: dict, two: dict, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for r, style in ((one, "o-"), (two, "s--")):
        c = r["curve"]
        label = f"{r['processes']} process{'es' if r['processes'] > 1 else ''} x {r['threads_per_process']} thread{'s' if r['threads_per_process'] > 1 else ''}"
        ax1.plot([m["train_time_s"] / 60 for m in c], [100 * m["test_acc"] for m in c], style, label=f"{label}: {r['images_per_s']:.0f} img/s")
    ax1.set_xlabel("training time (min, steps only)")
    ax1.set_ylabel("test accuracy (%)")
    ax1.set_title("PruneTrain, same global batch")
    ax1.legend()
    ax1.grid(alpha=0.3)
    epochs = [m["epoch"] for m in two["curve"]]
    ax2.bar(epochs, [b / 1e6 for b in two["comm_bytes_per_step"]], color="tab:orange", label="all-reduced per step per rank (measured)")
    ax2.plot(epochs, [4 * m["params"] / 1e6 for m in two["curve"]], "k.", label="4 bytes x parameters")
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("gradient MB per step")
    ax2.set_title("communication shrinks with the network")
    ax2.legend()
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{name}.png", dpi=110)


if __name__ == "__main__":
    main()
