"""Which width rounding keeps pruned networks fast on this CPU: `prune.round_to` measured, not guessed.

    python benchmarks/rounding.py [--archs resnet32,bonsai] [--samples 3] [--batch 256] [--steps 4] [--rounds 3]

Pruning leaves arbitrary widths. For each arch, draws `--samples` pruned-like shapes (every width scaled by its own
random keep fraction in [0.25, 0.9], fixed seed), then rounds each shape's widths up to a multiple of r for
r in 1, 4, 8, 16 (never above the original width) and times full bf16 + channels_last training steps of every
variant, interleaved round by round (median kept), so that the host's noise falls on all of them alike. Rounding up
adds FLOPs; it pays only where the time per step falls anyway. Summary: per r, the median over shapes of
time and FLOPs relative to r = 1 (exact widths). Writes benchmarks/results/rounding.json and rounding.png.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, portable, write_result  # noqa: E402

from bonsai.models.arch import ArchSpec, preset  # noqa: E402
from bonsai.models.resnet import build, count_flops  # noqa: E402

ROUNDINGS = (1, 4, 8, 16)


def shapes(arch: str, samples: int, seed: int = 0) -> list[ArchSpec]:
    """Pruned-like variants of ``arch``: each width times its own keep fraction."""
    rng = np.random.default_rng(seed)
    base = preset(arch)
    out = []
    for _ in range(samples):
        s = copy.deepcopy(base)
        keep = lambda w: max(1, int(w * rng.uniform(0.25, 0.9)))  # noqa: E731
        s.stem = keep(s.stem)
        for st in s.stages:
            st.width = keep(st.width)
            st.inner = [keep(w) for w in st.inner]
        out.append(s)
    return out


def rounded(spec: ArchSpec, base: ArchSpec, r: int) -> ArchSpec:
    up = lambda w, cap: min(cap, -(-w // r) * r)  # noqa: E731
    s = copy.deepcopy(spec)
    s.stem = up(spec.stem, base.stem)
    for st, b in zip(s.stages, base.stages):
        st.width = up(st.width, b.width)
        st.inner = [up(w, bw) for w, bw in zip(st.inner, b.inner)]
    return s


class Variant:
    def __init__(self, spec: ArchSpec, batch: int):
        self.spec = spec
        self.model = build(spec).to(memory_format=torch.channels_last).train()
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g).contiguous(memory_format=torch.channels_last)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.times: list[float] = []

    def step(self) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(self.model(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, steps: int) -> None:
        self.step()  # warm-up (oneDNN primitive creation)
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        self.times.append((time.perf_counter() - t) / steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="resnet32,bonsai")
    ap.add_argument("--samples", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    details: dict = {}
    rel_time: dict[int, list[float]] = {r: [] for r in ROUNDINGS}
    rel_flops: dict[int, list[float]] = {r: [] for r in ROUNDINGS}
    for arch in args.archs.split(","):
        base = preset(arch)
        for k, spec in enumerate(shapes(arch, args.samples)):
            variants = {r: Variant(rounded(spec, base, r), args.batch) for r in ROUNDINGS}
            for _ in range(args.rounds):
                for v in variants.values():
                    v.time(args.steps)
            t1, f1 = statistics.median(variants[1].times), count_flops(variants[1].spec)
            row = {}
            for r, v in variants.items():
                t, f = statistics.median(v.times), count_flops(v.spec)
                rel_time[r].append(t / t1)
                rel_flops[r].append(f / f1)
                row[str(r)] = {"widths": v.spec.widths(), "step_s": round(t, 4), "flops": f, "img_per_s": round(args.batch / t, 1)}
                print(f"{arch} shape {k} round_to {r:2d}: {args.batch / t:6.0f} img/s, {f / 1e6:6.1f} MFLOPs", flush=True)
            details[f"{arch}/{k}"] = row
    summary = {
        "rel_step_time_vs_exact": {str(r): round(statistics.median(v), 3) for r, v in rel_time.items()},
        "rel_flops_vs_exact": {str(r): round(statistics.median(v), 3) for r, v in rel_flops.items()},
        "fastest_round_to": min(ROUNDINGS, key=lambda r: statistics.median(rel_time[r])),
        "batch": args.batch,
    }
    path = write_result("rounding", summary, details, "python benchmarks/rounding.py " + portable(sys.argv[1:]))
    _plot(rel_time, rel_flops)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(rel_time: dict, rel_flops: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    xs = np.arange(len(ROUNDINGS))
    ax.bar(xs - 0.2, [statistics.median(rel_time[r]) for r in ROUNDINGS], 0.4, label="step time")
    ax.bar(xs + 0.2, [statistics.median(rel_flops[r]) for r in ROUNDINGS], 0.4, label="FLOPs")
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks(xs, [f"round_to={r}" for r in ROUNDINGS])
    ax.set_ylabel("relative to exact widths (median over shapes)")
    ax.set_title("Rounding pruned widths: bf16 + channels_last training step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "rounding.png", dpi=110)


if __name__ == "__main__":
    main()
