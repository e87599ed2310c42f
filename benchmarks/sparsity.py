"""How bonsai compress zeroes weights (Deep Compression's pruning): in one cut before the fine-tune, or gradually
while it runs.

    python benchmarks/sparsity.py [--run RUN] [--sparsity 0.5,0.8] [--epochs 2]

For each sparsity, two copies of the run's model get the same fine-tune (`bonsai.compress.lowrank.finetune_`,
--epochs on the run's training images with its augmentation): one after `sparsify_` cut the smallest share of every
layer's weights at once, one with `sparsify_gradually_` raising the share on Zhu & Gupta's cubic schedule over the
first half of the fine-tune. Measured: validation and test accuracy of each, and the size of each as 4-bit k-means
weight sharing + Huffman (`pack_shared`, codebooks not fine-tuned). Default run: the dense resnet32 of
`benchmarks/prunetrain.py --archs resnet32 --lpr 0.5,0.42 --name prunetrain_repeat`. Summary, per sparsity:
`fp32_test_acc`, `oneshot_test_acc`, `gradual_test_acc` (percent) and `shared4_bytes`.
Writes benchmarks/results/sparsity.json and sparsity.png.
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
    ap.add_argument("--run", default=str(RUNS / "prunetrain_repeat_resnet32_dense"))
    ap.add_argument("--sparsity", default="0.5,0.8", help="comma-separated shares of zeros")
    ap.add_argument("--epochs", type=float, default=2.0, help="fine-tune length, as bonsai compress --finetune-epochs")
    args = ap.parse_args()
    if not (Path(args.run) / "model.safetensors").is_file():
        raise SystemExit(f"{args.run}: no trained run; run benchmarks/prunetrain.py first")

    from bonsai.api import load
    from bonsai.compress.lowrank import finetune_
    from bonsai.compress.pipeline import _acc, _data, _torch_logits, finetune_kwargs
    from bonsai.compress.sharing import pack_shared, sparsify_, sparsify_gradually_, unshare_

    t0 = time.time()
    run = load(args.run)
    (tx, ty), xv, yv, test, cfg, ds = _data(run, None)
    if test is None:
        raise SystemExit(f"{args.run}: its dataset has no labelled test images to score on")
    kw = {"seed": cfg.seed, **finetune_kwargs(cfg, ds, run.image_size)}
    model = run.model.float().eval()

    def score(m) -> dict:
        return {"val_acc": round(100 * _acc(_torch_logits(m, xv), yv), 2), "test_acc": round(100 * _acc(_torch_logits(m, test[0]), test[1]), 2)}

    base = score(model)
    rows = {}
    for s in (float(v) for v in args.sparsity.split(",")):
        oneshot = sparsify_(copy.deepcopy(model), s)
        finetune_(oneshot, tx, ty, args.epochs, **kw)
        gradual = sparsify_gradually_(copy.deepcopy(model), s, tx, ty, args.epochs, **kw)
        row = {}
        for name, m in (("oneshot", oneshot), ("gradual", gradual)):
            m = unshare_(m).eval()
            zeros = sum(int((mod.weight == 0).sum()) for mod in m.modules() if hasattr(mod, "weight") and mod.weight is not None and mod.weight.dim() > 1)
            row[name] = {**score(m), "zero_weights": zeros, "shared4_bytes": len(pack_shared(m, 4)[0])}
        rows[f"{s:g}"] = row
        print(s, row, flush=True)
    summary = {
        "fp32_val_acc": base["val_acc"],
        "fp32_test_acc": base["test_acc"],
        **{
            f"sparsity_{k}": {
                "oneshot_test_acc": r["oneshot"]["test_acc"],
                "gradual_test_acc": r["gradual"]["test_acc"],
                "oneshot_val_acc": r["oneshot"]["val_acc"],
                "gradual_val_acc": r["gradual"]["val_acc"],
                "shared4_bytes": r["gradual"]["shared4_bytes"],
            }
            for k, r in rows.items()
        },
        "finetune_epochs": args.epochs,
        "wall_s": round(time.time() - t0, 1),
    }
    write_result("sparsity", summary, {"run": portable([args.run]), "rows": rows}, portable([Path(sys.executable).name, *sys.argv]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), constrained_layout=True)
    keys = list(rows)
    w = 0.35
    for i, (name, color) in enumerate((("oneshot", "tab:red"), ("gradual", "tab:green"))):
        vals = [rows[k][name]["test_acc"] for k in keys]
        xs = [j + (i - 0.5) * w for j in range(len(keys))]
        ax.bar(xs, vals, w, color=color, label={"oneshot": "one cut, then fine-tune", "gradual": "gradual (cubic), while fine-tuning"}[name])
        for x, v in zip(xs, vals):
            ax.text(x, v, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
    ax.axhline(base["test_acc"], color="tab:gray", ls="--", label=f"fp32 dense {base['test_acc']:.2f}")
    ax.set_xticks(range(len(keys)), [f"{float(k):.0%} zeros" for k in keys])
    lo = min(min(r["oneshot"]["test_acc"], r["gradual"]["test_acc"]) for r in rows.values())
    ax.set_ylim(lo - 2, base["test_acc"] + 1.5)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Zeroing weights, {args.epochs:g}-epoch fine-tune")
    ax.legend(fontsize=8, loc="lower left")
    fig.savefig(RESULTS / "sparsity.png", dpi=120)
    print(summary)


if __name__ == "__main__":
    main()
