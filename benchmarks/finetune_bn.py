"""Why bonsai's fine-tunes (compression: low-rank, sparse, codebooks) use the run's own training augmentation.

    python benchmarks/finetune_bn.py [--run RUN] [--steps 17]

A fine-tune trains in train mode, so BatchNorm re-estimates its running statistics from the fine-tune's batches.
This script runs `bonsai.compress.lowrank.finetune_` at LR 0 (no weight moves; only BN statistics change) for
--steps batches of 256 training images, once with mirrors alone and once with the run's shift + mirror, and
measures validation accuracy (the run's own held-out images) before and after. Default run: the resnet32 pruned
at LPR 0.42 by `benchmarks/prunetrain.py --archs resnet32 --lpr 0.5,0.42 --name prunetrain_repeat`. Summary:
`val_acc_before`, `val_acc_mirror_only`, `val_acc_shift_mirror` (percent) and the two drops in points.
Writes benchmarks/results/finetune_bn.json and finetune_bn.png.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, RUNS, portable, write_result  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", default=str(RUNS / "prunetrain_repeat_resnet32_pruned_lpr0.42"))
    ap.add_argument("--steps", type=int, default=17)
    args = ap.parse_args()
    if not (Path(args.run) / "model.safetensors").is_file():
        raise SystemExit(f"{args.run}: no trained run; run benchmarks/prunetrain.py first")

    from bonsai.api import load
    from bonsai.compress.lowrank import finetune_
    from bonsai.compress.pipeline import _acc, _data, _torch_logits, finetune_kwargs

    t0 = time.time()
    run = load(args.run)
    (tx, ty), xv, yv, _, cfg, ds = _data(run, None)
    seed, translate = cfg.seed, finetune_kwargs(cfg, ds, run.image_size)["translate"]
    model = run.model.float().eval()
    epochs = args.steps * 256 / len(tx)

    def val(m) -> float:
        return round(100 * _acc(_torch_logits(m, xv), yv), 2)

    before = val(model)
    mirror = val(finetune_(copy.deepcopy(model), tx, ty, epochs, lr=0.0, seed=seed, translate=0))
    shift = val(finetune_(copy.deepcopy(model), tx, ty, epochs, lr=0.0, seed=seed, translate=translate))
    summary = {
        "val_acc_before": before,
        "val_acc_mirror_only": mirror,
        "val_acc_shift_mirror": shift,
        "drop_points_mirror_only": round(before - mirror, 2),
        "drop_points_shift_mirror": round(before - shift, 2),
        "steps": args.steps,
        "translate": translate,
        "wall_s": round(time.time() - t0, 1),
    }
    out = write_result("finetune_bn", summary, {"run": portable([args.run])}, portable([Path(sys.executable).name, *sys.argv]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
    labels = ["trained", f"{args.steps} steps at LR 0,\nmirror only", f"{args.steps} steps at LR 0,\nshift {translate} px + mirror"]
    vals = [before, mirror, shift]
    ax.bar(labels, vals, color=["tab:gray", "tab:red", "tab:green"])
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:.2f}", ha="center", va="bottom")
    ax.set_ylim(min(vals) - 3, max(vals) + 1)
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("BatchNorm statistics re-estimated by a fine-tune's batches")
    fig.savefig(RESULTS / "finetune_bn.png", dpi=120)
    print(summary)
    print(f"wrote {out} and {RESULTS / 'finetune_bn.png'}")


if __name__ == "__main__":
    main()
