"""What pruning's pieces cost on this machine: depth vs width, and the proximal step.

    python benchmarks/prune_costs.py [--batch 256] [--rounds 3]

1. Training-step time (bf16 autocast where the CPU has it, channels_last, SGD with momentum, random data) of resnet32
   and shapes pruning can produce from it: every inner width halved (thin), five of its fifteen blocks removed
   (shallow), both, and resnet20. The shapes are interleaved over ``--rounds`` rounds; the fastest step of each
   round counts, and the median over rounds is reported, relative to resnet32.
2. The group-lasso proximal step on resnet32 (with and without block groups), per call, against its training step.

Writes benchmarks/results/prune_costs.json and prune_costs.png (step time against FLOPs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, portable, write_result  # noqa: E402

from bonsai.models.arch import ArchSpec, StageSpec, preset  # noqa: E402
from bonsai.models.resnet import build, count_flops  # noqa: E402
from bonsai.surgery.prune import GroupLasso  # noqa: E402
from bonsai.train.engine import resolve_precision  # noqa: E402


def _spec(stages: list[tuple[int, int, list[int]]]) -> ArchSpec:
    return ArchSpec(3, 10, 16, [StageSpec(w, s, list(inner)) for w, s, inner in stages]).validate()


SHAPES = {
    "resnet32": _spec([(16, 1, [16] * 5), (32, 2, [32] * 5), (64, 2, [64] * 5)]),
    "thin (inner widths / 2)": _spec([(16, 1, [8] * 5), (32, 2, [16] * 5), (64, 2, [32] * 5)]),
    "shallow (2/3/5 blocks)": _spec([(16, 1, [16] * 2), (32, 2, [32] * 3), (64, 2, [64] * 5)]),
    "shallow and thin": _spec([(16, 1, [8] * 2), (32, 2, [16] * 3), (64, 2, [32] * 5)]),
    "resnet20": preset("resnet20"),
}


def _step_time(spec: ArchSpec, batch: int, dtype, steps: int = 5) -> float:
    torch.manual_seed(0)
    model = build(spec, zero_init_residual=False).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8).float().contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        t = time.perf_counter()
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[1:])


def _prox_time(depth: bool, calls: int = 20) -> float:
    model = build(preset("resnet32"), zero_init_residual=False).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    lasso = GroupLasso(lam=1e-12, depth=depth)  # tiny: nothing is zeroed, the cost is the same
    lasso.prox_(model, opt)
    t = time.perf_counter()
    for _ in range(calls):
        lasso.prox_(model, opt)
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    dtype = resolve_precision("auto", torch.device("cpu"))
    per_round: dict[str, list[float]] = {k: [] for k in SHAPES}
    prox: dict[str, list[float]] = {"blocks_and_channels": [], "channels_only": []}
    for r in range(args.rounds):
        for name, spec in SHAPES.items():
            per_round[name].append(_step_time(spec, args.batch, dtype))
        prox["blocks_and_channels"].append(_prox_time(True))
        prox["channels_only"].append(_prox_time(False))
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1] * 1000:.0f} ms" for k, v in per_round.items()), flush=True)
    base_t, base_f = statistics.median(per_round["resnet32"]), count_flops(SHAPES["resnet32"])
    shapes = {
        name: {
            "flops_per_image": count_flops(spec),
            "blocks": sum(s.depth for s in spec.stages),
            "step_ms": round(1000 * statistics.median(per_round[name]), 1),
            "rel_step_time": round(statistics.median(per_round[name]) / base_t, 3),
            "rel_flops": round(count_flops(spec) / base_f, 3),
        }
        for name, spec in SHAPES.items()
    }
    prox_ms = {k: round(1000 * statistics.median(v), 1) for k, v in prox.items()}
    summary = {
        "batch": args.batch,
        "precision": "bf16" if dtype is not None else "fp32",
        "rel_step_time": {k: v["rel_step_time"] for k, v in shapes.items()},
        "rel_flops": {k: v["rel_flops"] for k, v in shapes.items()},
        "prox_ms_per_call": prox_ms,
        "prox_share_of_resnet32_step": round(prox_ms["blocks_and_channels"] / shapes["resnet32"]["step_ms"], 3),
    }
    details = {"shapes": shapes, "step_s_per_round": per_round, "prox_s_per_round": prox}
    path = write_result("prune_costs", summary, details, "python benchmarks/prune_costs.py " + portable(sys.argv[1:]))
    _plot(shapes)
    print(f"wrote {path}")


def _plot(shapes: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, v in shapes.items():
        ax.scatter(v["rel_flops"], v["rel_step_time"], s=40)
        ax.annotate(name, (v["rel_flops"], v["rel_step_time"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.plot([0, 1.05], [0, 1.05], color="grey", lw=0.8, ls="--", label="time proportional to FLOPs")
    ax.set(xlabel="FLOPs relative to resnet32", ylabel="training-step time relative to resnet32", xlim=(0, 1.1), ylim=(0, 1.1))
    ax.set_title("pruned shapes of resnet32: depth pays, width less")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "prune_costs.png", dpi=110)


if __name__ == "__main__":
    main()
