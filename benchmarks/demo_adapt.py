"""Why does ``bonsai demo`` train fewer epochs with ``--adapt`` than without? Both settings side by side, repeated.

    python benchmarks/demo_adapt.py [--repeats 4] [--budget 90s]   # about 13 minutes on 2 cores

On the packaged demo (5,000 CIFAR-10 images) the planner picks ``bonsaix0.5``, and a x0.5 pick starts at itself,
so ``--adapt`` (the default under a budget) and ``adapt.on=false`` train the same widths: only the controller
differs. One run each (README, "Demo") gave 44 epochs against 51. This script runs ``bonsai fit DEMO --budget 90s``
with ``adapt.on`` true and false, alternating, ``--repeats`` times each, and splits each run's budget clock into
training steps, anytime predictions and the rest (validation, checkpoints, the controller's decisions), with the
training pace at full size: fewer epochs from slower steps is the host's noise or the network, fewer from a
larger rest is the controller's work. Test accuracy is measured once, after training. Run directories go to
``--runs`` (``tta_demo_adapt_*``). Writes benchmarks/results/demo_adapt.json (summary: per setting the mean
epochs, test accuracy, training seconds, rest seconds and full-size images/s, and the events the controller
logged) and demo_adapt.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, figure, write_result  # noqa: E402
from time_to_accuracy import fit  # noqa: E402
from tta_levers import full_size_paces, overhead  # noqa: E402

from bonsai.data.demo import extract_demo  # noqa: E402
from bonsai.data.sources import load_dataset  # noqa: E402
from bonsai.report.log import read_jsonl  # noqa: E402

SETTINGS = {"adapt_on": {"adapt.on": True}, "adapt_off": {"adapt.on": False}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4)
    ap.add_argument("--budget", default="90s")
    ap.add_argument("--runs", default=str(Path(__file__).resolve().parent / "runs"))
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    runs = Path(args.runs)
    ds = load_dataset(extract_demo(runs / "demo-data"))  # where `bonsai demo --out runs/...` unpacks it too
    rows: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    for i in range(args.repeats):
        # alternate which setting goes first, so neither always runs on the warmer or the quieter host
        for name in SETTINGS if i % 2 == 0 else reversed(SETTINGS):
            d = fit(ds, f"demo_adapt_{name}_{i}", runs, args.quiet, budget=args.budget, test_each_epoch=False, **SETTINGS[name])
            s, curve = d["summary"], d["curve"]
            pace = full_size_paces(curve)
            events = Counter(e.get("event") for e in read_jsonl(d["run"].dir / "events.jsonl"))
            rows[name].append({
                "repeat": i, "test_acc": s["test_acc"], "epochs": s["epochs"], "clock_s": s["clock_s"],
                "train_time_s": s["train_time_s"], "anytime_s": d["anytime_s"], "rest_s": overhead(curve),
                "full_size_images_per_s_median": statistics.median(pace) if pace else None,
                "widths": s["widths"], "flops_per_image": s["flops_per_image"], "events": dict(events),
            })
            print(f"{name} {i}: {rows[name][-1]}", flush=True)
    summary = {"budget": args.budget, "repeats": args.repeats}
    for name, rs in rows.items():
        mean = lambda k: round(statistics.fmean(r[k] for r in rs if r[k] is not None), 4 if k == "test_acc" else 1)  # noqa: E731
        summary[name] = {k: mean(k) for k in ("epochs", "test_acc", "train_time_s", "anytime_s", "rest_s", "full_size_images_per_s_median")}
        summary[name]["epochs_each"] = [r["epochs"] for r in rs]
        summary[name]["events"] = dict(sum((Counter(r["events"]) for r in rs), Counter()))
    on, off = summary["adapt_on"], summary["adapt_off"]
    summary["epochs_fewer_with_adapt"] = round(off["epochs"] - on["epochs"], 1)
    summary["rest_s_more_with_adapt"] = round(on["rest_s"] - off["rest_s"], 1)
    summary["pace_ratio_on_over_off"] = round(on["full_size_images_per_s_median"] / off["full_size_images_per_s_median"], 3)
    path = write_result("demo_adapt", summary, {"runs": rows}, f"python benchmarks/demo_adapt.py --repeats {args.repeats} --budget {args.budget}")
    _plot(rows)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(rows: dict) -> None:
    fig = figure((10, 4))
    ax = fig.subplots()
    parts = (("train_time_s", "training steps", "tab:blue"), ("anytime_s", "anytime predictions", "tab:orange"), ("rest_s", "validation, checkpoints, controller", "tab:gray"))
    labels, x = [], 0
    for name, rs in rows.items():
        for r in rs:
            bottom = 0.0
            for key, label, colour in parts:
                v = r[key] or 0.0
                ax.barh(x, v, left=bottom, color=colour, label=label if x == 0 else None)
                bottom += v
            ax.text(bottom + 1, x, f"{r['epochs']} epochs, {r['test_acc']:.1%}", va="center", fontsize=8)
            labels.append(f"{name} #{r['repeat']}")
            x += 1
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("budget clock (s)")
    ax.set_title("bonsai demo --budget: where the clock goes, --adapt on and off")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.2)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "demo_adapt.png", dpi=120)


if __name__ == "__main__":
    main()
