"""Deep Compression's chain on CIFAR-10 models: dense fp32 -> pruned -> int8 -> + Huffman, and weight sharing
(k-means, 5, 4 and 3 bits, each also with its codebooks fine-tuned for an epoch) + Huffman, then the same after
magnitude pruning (three quarters of each layer's weights set to zero, the rest fine-tuned for sixteen epochs,
distilled from the dense run), each stage measured, plus an SVD low-rank side branch.

    python benchmarks/compress.py [--dense RUN] [--pruned RUN] [--teacher RUN|none] [--rounds 11] [--lowrank 0.9]
                                  [--share-bits 5,4,3] [--sparsity 0.75] [--finetune-epochs 16]

The inputs are run directories of `benchmarks/prunetrain.py` (full CIFAR-10, 10 epochs; defaults: the resnet32
dense run and the resnet32 run pruned at LPR 0.35 of `prunetrain.py --archs resnet32 --lpr 0.35 --name
prunetrain_lpr035`, which removed five blocks and kept dense accuracy within 0.2 points; the teacher defaults to the
dense run, `--teacher none` fine-tunes without one). Each run goes through `bonsai compress` (PyTorch fp32, ONNX
fp32, ONNX int8 with per-channel weights calibrated on 512 training images and the stem conv kept in fp32, int8 +
Huffman, weight sharing; then `--sparsity` and weight sharing of the sparse model), which measures size on disk,
batch-1 and batch-64 latency (onnxruntime / PyTorch on this CPU's 2 cores, timed round-robin across the stages of
one runtime so that the host's noise falls on all of them alike, in --rounds rounds of --repeats calls), and
validation and test accuracy. Every fine-tune uses the runs' own augmentation; with `--teacher` the pruned model's
also distill. The low-rank branch factorizes each conv whose SVD rank at 90% energy saves multiply-adds and runs
faster at its own shape, measured before and after --finetune-epochs of fine-tuning. Summary:
- size_reduction: dense fp32 `model.safetensors` size / the final artifact's size (x), where the final artifact is
  the smallest stage of the pruned chain whose validation accuracy is within 0.5 points of the pruned fp32 model's
  (weight sharing of the pruned or the sparse model, plain or fine-tuned, or int8 + Huffman);
- acc_drop_points: dense fp32 test accuracy - the final artifact's test accuracy (points);
- int8_latency_ratio: int8 / fp32 batch-64 latency in onnxruntime, for the pruned model: the median over the
  timing rounds of each round's ratio (`int8_latency_ratio_rounds` lists them; this host changes pace between
  rounds); also for the dense one, and `int8_latency_ratio_unpadded`: the pruned model quantized without padding
  its widths to multiples of 16.
Writes benchmarks/results/compress.json and compress.png (or --name's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RUNS, portable, write_result  # noqa: E402


def plot(chains: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2), constrained_layout=True)
    labels, sizes, lat, acc = [], [], [], []
    for name, stages in chains.items():
        for s in stages:
            labels.append(f"{name}\n{s['stage']}")
            sizes.append(s["size_bytes"] / 1024)
            lat.append(s["latency_b64_ms"])
            acc.append(100 * s["test_acc"])
    colors = ["tab:blue"] * len(chains["dense"]) + ["tab:green"] * (len(labels) - len(chains["dense"]))
    for ax, values, title in ((axes[0], sizes, "size on disk (KB, log)"), (axes[1], lat, "batch-64 latency (ms)"), (axes[2], acc, "test accuracy (%)")):
        ax.barh(range(len(labels)), values, color=colors)
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.invert_yaxis()
        ax.set_title(title)
        for i, v in enumerate(values):
            ax.text(v, i, f" {v:.1f}", va="center", fontsize=7)
    axes[0].set_xscale("log")
    axes[2].set_xlim(min(acc) - 5, max(acc) + 3)
    fig.suptitle("bonsai compress on CIFAR-10: dense resnet32 (blue) and pruned resnet32 (green)")
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dense", default=str(RUNS / "prunetrain_lpr035_resnet32_dense"))
    ap.add_argument("--pruned", default=str(RUNS / "prunetrain_lpr035_resnet32_pruned"))
    ap.add_argument("--calibration", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=10, help="calls per stage and batch size in each timing round")
    ap.add_argument("--rounds", type=int, default=11, help="timing rounds (odd: the median is a measured round); a ratio is the median of its rounds' ratios")
    ap.add_argument("--share-bits", default="5,4,3", help="weight-sharing codebook sizes (each also fine-tuned)")
    ap.add_argument("--share-finetune-epochs", type=float, default=1.0)
    ap.add_argument("--lowrank", type=float, default=0.9, help="energy kept by the low-rank side branch (0: skip it)")
    ap.add_argument("--sparsity", type=float, default=0.75, help="share of each layer's weights set to zero before sharing (0: skip)")
    ap.add_argument("--finetune-epochs", type=float, default=16.0, help="fine-tuning of the low-rank and the sparse model")
    ap.add_argument(
        "--dense-chain", choices=("full", "quick"), default="full",
        help="quick: only the dense model's fp32, ONNX and int8 stages (the summary needs no more)",
    )
    ap.add_argument("--name", default="compress", help="results file name (default compress: results/compress.json)")
    ap.add_argument("--teacher", default="dense", help="distill the pruned model's fine-tunes from this run (default: the --dense run; none: no teacher)")
    args = ap.parse_args()
    args.teacher = {"dense": args.dense, "none": None}.get(args.teacher, args.teacher)
    args.lowrank = args.lowrank or None
    for d in (args.dense, args.pruned):
        if not (Path(d) / "model.safetensors").is_file():
            raise SystemExit(f"{d}: no trained run; run benchmarks/prunetrain.py first (see its --lpr)")

    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from bonsai.compress.pipeline import compress, latency_ratio, round_ratios

    t0 = time.time()
    bits = tuple(int(b) for b in args.share_bits.split(","))
    quick = {"lowrank": None, "share_bits": (), "sparsity": 0.0}  # --dense-chain quick: the dense model's baseline stages only
    records = {
        name: compress(
            d, calibration=args.calibration, repeats=args.repeats, rounds=args.rounds, share_finetune_epochs=args.share_finetune_epochs,
            finetune_epochs=args.finetune_epochs, teacher=args.teacher if name == "pruned" else None,
            **(quick if name == "dense" and args.dense_chain == "quick" else {"lowrank": args.lowrank, "share_bits": bits, "sparsity": args.sparsity}),
        )
        for name, d in (("dense", args.dense), ("pruned", args.pruned))
    }
    chains = {k: r["stages"] for k, r in records.items()}
    st = {k: {s["stage"]: s for s in v} for k, v in chains.items()}
    dense_fp32 = st["dense"]["PyTorch fp32"]
    final = st["pruned"][records["pruned"]["final_stage"]]  # chosen on validation accuracy by bonsai compress
    summary = {
        "size_reduction": round(dense_fp32["size_bytes"] / final["size_bytes"], 2),
        "acc_drop_points": round(100 * (dense_fp32["test_acc"] - final["test_acc"]), 2),
        "int8_latency_ratio": latency_ratio(st["pruned"]["ONNX int8"], st["pruned"]["ONNX fp32"]),
        "int8_latency_ratio_rounds": [round(r, 3) for r in round_ratios(st["pruned"]["ONNX int8"], st["pruned"]["ONNX fp32"])],
        "int8_latency_ratio_dense": latency_ratio(st["dense"]["ONNX int8"], st["dense"]["ONNX fp32"]),
        # the pruned model quantized at its trained widths, without the zero channels that round them to 16
        "int8_latency_ratio_unpadded": (
            latency_ratio(st["pruned"]["ONNX int8, widths as trained"], st["pruned"]["ONNX fp32"])
            if "ONNX int8, widths as trained" in st["pruned"] else None
        ),
        "final_stage": final["stage"],
        "dense_fp32_test_acc": dense_fp32["test_acc"],
        "final_test_acc": final["test_acc"],
        "dense_fp32_bytes": dense_fp32["size_bytes"],
        "final_bytes": final["size_bytes"],
        "int8_quantization_test_acc_drop_points_pruned": round(100 * (st["pruned"]["ONNX fp32"]["test_acc"] - st["pruned"]["ONNX int8"]["test_acc"]), 2),
        "pruned_fp32_test_acc": st["pruned"]["PyTorch fp32"]["test_acc"],
        "acc_drop_points_from_pruning": round(100 * (dense_fp32["test_acc"] - st["pruned"]["PyTorch fp32"]["test_acc"]), 2),
        "lowrank_energy": args.lowrank,
        "sparsity": args.sparsity,
        "finetune_epochs": args.finetune_epochs,
        "share_finetune_epochs": args.share_finetune_epochs,
        "teacher": args.teacher and portable([args.teacher]),
        "targets": {"size_reduction": ">= 20", "acc_drop_points": "<= 1", "int8_latency_ratio": "<= 0.5"},
        "wall_s": round(time.time() - t0, 1),
    }
    summary["targets_met"] = {
        "size_reduction": summary["size_reduction"] >= 20,
        "acc_drop_points": summary["acc_drop_points"] <= 1,
        "int8_latency_ratio": summary["int8_latency_ratio"] <= 0.5,
    }
    # paths as the command line gives them, relative to the project: results name no machine
    paths = ("run", "teacher")
    details = {k: r | {kk: portable([r[kk]]) for kk in paths if r.get(kk)} for k, r in records.items()}
    out = write_result(args.name, summary, details, portable([Path(sys.executable).name, *sys.argv]))
    plot(chains, RESULTS / f"{args.name}.png")
    print(summary)
    print(f"wrote {out} and {RESULTS / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
