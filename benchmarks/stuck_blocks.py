"""Stuck blocks in finished pruned runs: blocks whose inner channels are all dead while bn2's shift is not, so that
the branch adds a constant, learns nothing more, and still costs a block's time (`bonsai.surgery.depth.stuck`).

    python benchmarks/stuck_blocks.py [RUN ...]

Default runs: the pruned resnet32 runs of `benchmarks/prunetrain.py` under benchmarks/runs (those present).
No training: each run's best model is read and inspected. Summary per run: blocks, stuck blocks (named by stage and
position in the final network), the largest |constant| among them, and the share of the model's conv
multiply-adds they hold. Writes benchmarks/results/stuck_blocks.json and stuck_blocks.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RUNS, portable, write_result  # noqa: E402

DEFAULT = [
    "prunetrain_resnet32_pruned_lpr0.35", "prunetrain_resnet32_pruned_lpr0.5",
    "prunetrain_repeat_resnet32_pruned_lpr0.42", "prunetrain_repeat_resnet32_pruned",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="*", default=[str(RUNS / r) for r in DEFAULT if (RUNS / r / "model.safetensors").is_file()])
    ap.add_argument("--threshold", type=float, default=1e-4, help="dead below this max |w| (prune.threshold's default)")
    args = ap.parse_args()
    if not args.runs:
        raise SystemExit("no runs: give run directories, or run benchmarks/prunetrain.py first")

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from bonsai.api import load
    from bonsai.surgery.depth import branch_constant, stuck

    by_run = {}
    for r in args.runs:
        run = load(r)
        model = run.model.float().eval()
        x = torch.zeros(1, run.channels, run.image_size, run.image_size)
        total = FlopCounterMode(display=False)
        with total, torch.no_grad():
            model(x)
        found, flops, worst = [], 0, 0.0
        for s, stage in enumerate(model.stages):
            for b, block in enumerate(stage):
                if block.shortcut is None and stuck(block, args.threshold):
                    found.append(f"stage {s} block {b}")
                    worst = max(worst, float(branch_constant(block).abs().max()))
                    counter = FlopCounterMode(display=False)
                    h = torch.zeros(1, block.conv1.in_channels, *_size(model, s, x))
                    with counter, torch.no_grad():
                        block.conv2(block.conv1(h))
                    flops += counter.get_total_flops()
        by_run[Path(r).name] = {
            "blocks": sum(len(st) for st in model.stages),
            "stuck": found,
            "max_abs_constant": round(worst, 4),
            "stuck_share_of_flops": round(flops / total.get_total_flops(), 4),
            "test_acc": run.summary.get("test_acc") if hasattr(run, "summary") and run.summary else None,
        }
        print(Path(r).name, by_run[Path(r).name])
    summary = {"stuck_blocks": {k: f"{len(v['stuck'])} of {v['blocks']}" for k, v in by_run.items()}, "threshold": args.threshold}
    out = write_result("stuck_blocks", summary, by_run, portable([Path(sys.executable).name, *sys.argv]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2), constrained_layout=True)
    names = list(by_run)
    ax.barh(names, [v["blocks"] for v in by_run.values()], color="tab:gray", label="blocks")
    ax.barh(names, [len(v["stuck"]) for v in by_run.values()], color="tab:red", label="stuck")
    ax.set_xlabel("residual blocks in the final network")
    ax.legend()
    ax.set_title("stuck blocks in pruned runs (before their removal existed)")
    fig.savefig(RESULTS / "stuck_blocks.png", dpi=120)
    print(f"wrote {out} and {RESULTS / 'stuck_blocks.png'}")


def _size(model, stage: int, x) -> tuple[int, int]:
    """The spatial size at the input of ``stage``'s blocks after the first."""
    import torch

    with torch.no_grad():
        h = model.stem((x - model.mean) / model.std)
        for s in range(stage + 1):
            h = model.stages[s][0](h)
    return tuple(h.shape[-2:])


if __name__ == "__main__":
    main()
