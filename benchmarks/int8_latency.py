"""int8 against fp32 batch-64 latency in onnxruntime, over minutes, on one and on two threads: how far the ratio
`benchmarks/compress.py` reports depends on the moment it was measured on this shared host.

    python benchmarks/int8_latency.py [--runs RUN ...] [--minutes 5] [--calls 8]

The inputs are run directories that `bonsai compress` (or `benchmarks/compress.py`) went through: their
`compressed/model.onnx` (fp32) and `compressed/model.int8.onnx` (int8, widths padded to multiples of 16, the stem
conv in fp32), by default those of the LPR 0.35 PruneTrain runs (`prunetrain.py --archs resnet32 --lpr 0.35 --name
prunetrain_lpr035`, then `compress.py`). Every model gets one onnxruntime session per thread count (1 and 2; idle
threads sleep), and all sessions are timed in rounds for --minutes: in each round every session runs --calls
batch-64 calls in turn, one call each, round-robin, on 64 fixed random uint8 images (the kernels' speed does not
depend on the pixel values). A round's ratio is int8's median call over fp32's, at the same thread count.
Summary:
- int8_latency_ratio (and _1thread, _dense, _dense_1thread): the median over the rounds of the rounds' ratios;
- int8_latency_ratio_p90 (and _1thread): the 90th percentile of the pruned model's round ratios;
- slow_round_share: the share of rounds in which the pruned model's two-thread ratio exceeded its median by more
  than 10%.
Writes benchmarks/results/int8_latency.json and int8_latency.png (or --name's).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RUNS, portable, write_result  # noqa: E402

THREADS = (1, 2)


def plot(t: list[float], ratios: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5), constrained_layout=True)
    for key, r in ratios.items():
        ax.plot(t, r, ".-", ms=3, lw=0.8, label=key)
    ax.axhline(0.5, color="k", ls="--", lw=0.8, label="target (0.5)")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("int8 / fp32 batch-64 latency (round median)")
    ax.legend(fontsize=8)
    ax.set_title("onnxruntime int8 against fp32, round by round, on 1 and 2 threads")
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--runs", nargs="+", default=[str(RUNS / "prunetrain_lpr035_resnet32_pruned"), str(RUNS / "prunetrain_lpr035_resnet32_dense")],
        help="run directories with compressed/model.onnx and compressed/model.int8.onnx; the first is the summary's 'pruned', the second its 'dense'",
    )
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--calls", type=int, default=8, help="calls per session in each round")
    ap.add_argument("--name", default="int8_latency")
    args = ap.parse_args()
    if args.minutes <= 0 or args.calls < 1:
        raise SystemExit("--minutes must be positive and --calls at least 1")
    files = {}
    for run in args.runs:
        for kind, f in (("fp32", "model.onnx"), ("int8", "model.int8.onnx")):
            p = Path(run) / "compressed" / f
            if not p.is_file():
                raise SystemExit(f"{p}: not found; run `bonsai compress {run}` (or benchmarks/compress.py) first")
            files[(run, kind)] = p

    from bonsai.compress.onnx_export import ort_logits, session

    x = np.random.default_rng(0).integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    sessions = {(run, kind, th): session(p, threads=th) for (run, kind), p in files.items() for th in THREADS}
    for s in sessions.values():
        for _ in range(3):
            ort_logits(s, x)
    rounds: list[dict] = []
    t0 = time.time()
    while time.time() - t0 < 60 * args.minutes:
        times = {k: [] for k in sessions}
        for _ in range(args.calls):
            for k, s in sessions.items():
                a = time.perf_counter()
                ort_logits(s, x)
                times[k].append(time.perf_counter() - a)
        rounds.append({"t": round(time.time() - t0, 2), "ms": {k: 1000 * float(np.median(v)) for k, v in times.items()}})
        print(f"round {len(rounds)} at {rounds[-1]['t']:.0f} s", flush=True)

    names = dict(zip(args.runs, ("pruned", "dense", *(f"run{i}" for i in range(2, len(args.runs)))), strict=False))
    labels = {(run, kind, th): f"{names[run]} {kind} {th}t" for (run, kind, th) in sessions}
    ratios = {
        f"{names[run]}, {th} thread{'s' * (th > 1)}": [r["ms"][(run, "int8", th)] / r["ms"][(run, "fp32", th)] for r in rounds]
        for run in args.runs for th in THREADS
    }
    pruned, pruned1 = ratios["pruned, 2 threads"], ratios["pruned, 1 thread"]
    med = float(np.median(pruned))
    summary = {
        "int8_latency_ratio": round(med, 3),
        "int8_latency_ratio_1thread": round(float(np.median(pruned1)), 3),
        "int8_latency_ratio_p90": round(float(np.percentile(pruned, 90)), 3),
        "int8_latency_ratio_1thread_p90": round(float(np.percentile(pruned1, 90)), 3),
        "slow_round_share": round(float(np.mean([r > 1.1 * med for r in pruned])), 3),
        "rounds": len(rounds),
        "minutes": args.minutes,
        "median_ms": {labels[k]: round(float(np.median([r["ms"][k] for r in rounds])), 2) for k in sessions},
        "target": "int8_latency_ratio <= 0.5",
    }
    if "dense, 2 threads" in ratios:
        summary["int8_latency_ratio_dense"] = round(float(np.median(ratios["dense, 2 threads"])), 3)
        summary["int8_latency_ratio_dense_1thread"] = round(float(np.median(ratios["dense, 1 thread"])), 3)
    details = {
        "runs": {names[run]: portable([run]) for run in args.runs},
        "round_t_s": [r["t"] for r in rounds],
        "round_ratios": {k: [round(v, 4) for v in r] for k, r in ratios.items()},
        "round_ms": {labels[k]: [round(r["ms"][k], 3) for r in rounds] for k in sessions},
    }
    out = write_result(args.name, summary, details, portable([Path(sys.executable).name, *sys.argv]))
    plot([r["t"] for r in rounds], ratios, RESULTS / f"{args.name}.png")
    print(summary)
    print(f"wrote {out} and {RESULTS / f'{args.name}.png'}")


if __name__ == "__main__":
    main()
