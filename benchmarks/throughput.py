"""Training throughput on this machine: fp32 NCHW vs bf16 autocast + channels_last (+ torch.compile).

    python benchmarks/throughput.py [--batch 256] [--steps 6] [--rounds 3] [--no-compile]

For resnet20, resnet56 and the default arch, times full SGD training steps (forward, backward, update) on
synthetic 32x32 RGB batches. Modes are interleaved round by round and the median per mode is kept, so that the
noise of a shared host falls on all modes alike; the figures that matter are the ratios. Achieved GFLOP/s counts
3 x forward FLOPs per image (backward ~ 2 x forward) and is compared with the bf16 matmul peak (4096x4096
torch.mm) measured in the same run. Writes benchmarks/results/throughput.json and throughput.png.
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
from _common import RESULTS, matmul_peak, write_result  # noqa: E402

from bonsai.models.arch import DEFAULT_ARCH, preset  # noqa: E402
from bonsai.models.resnet import build, count_flops  # noqa: E402


class Mode:
    def __init__(self, arch: str, name: str, batch: int):
        self.name = name
        bf16 = name != "fp32_nchw"
        cl = torch.channels_last if bf16 else torch.contiguous_format
        self.model = build(preset(arch)).to(memory_format=cl).train()
        self.fn = torch.compile(self.model) if "compile" in name else self.model
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        g = torch.Generator().manual_seed(0)
        self.x = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, generator=g).contiguous(memory_format=cl)
        self.y = torch.randint(0, 10, (batch,), generator=g)
        self.ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else torch.enable_grad

    def step(self) -> None:
        with self.ctx():
            loss = F.cross_entropy(self.fn(self.x).float(), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()

    def time(self, steps: int) -> float:
        t = time.perf_counter()
        for _ in range(steps):
            self.step()
        return steps * len(self.y) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=6, help="timed steps per mode per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--archs", default=f"resnet20,resnet56,{DEFAULT_ARCH}")
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args()

    peak_bf16 = matmul_peak(torch.bfloat16)
    peak_fp32 = matmul_peak(torch.float32)
    print(f"matmul peak: bf16 {peak_bf16:.0f} GFLOP/s, fp32 {peak_fp32:.0f} GFLOP/s", flush=True)
    names = ["fp32_nchw", "bf16_cl"] + ([] if args.no_compile else ["bf16_cl_compile"])
    details = {"peak_bf16_gflops": peak_bf16, "peak_fp32_gflops": peak_fp32, "batch": args.batch, "archs": {}}
    for arch in args.archs.split(","):
        flops = count_flops(preset(arch))
        modes = [Mode(arch, n, args.batch) for n in names]
        compile_s = {}
        for m in modes:  # warm-up (and compilation)
            t = time.perf_counter()
            for _ in range(3):
                m.step()
            compile_s[m.name] = time.perf_counter() - t
        rates = {m.name: [] for m in modes}
        for _ in range(args.rounds):
            for m in modes:
                rates[m.name].append(m.time(args.steps))
        res = {}
        for n in names:
            ips = statistics.median(rates[n])
            res[n] = {
                "images_per_s": round(ips, 1),
                "all_rounds": [round(r, 1) for r in rates[n]],
                "gflops": round(3 * flops * ips / 1e9, 1),
                "share_of_bf16_peak": round(3 * flops * ips / 1e9 / peak_bf16, 3),
                "warmup_s": round(compile_s[n], 1),
            }
        base = res["fp32_nchw"]["images_per_s"]
        for n in names:
            res[n]["speedup_vs_fp32_nchw"] = round(res[n]["images_per_s"] / base, 2)
        details["archs"][arch] = {"flops_per_image": flops, "modes": res}
        print(arch, {n: (res[n]["images_per_s"], res[n]["speedup_vs_fp32_nchw"]) for n in names}, flush=True)

    r20 = details["archs"]["resnet20"]["modes"]
    best20 = max((n for n in names if n != "fp32_nchw"), key=lambda n: r20[n]["images_per_s"])
    summary = {
        "speedup_resnet20": r20[best20]["speedup_vs_fp32_nchw"],
        "speedup_resnet20_mode": best20,
        "speedup_resnet20_bf16_cl": r20["bf16_cl"]["speedup_vs_fp32_nchw"],
        "share_of_bf16_peak": r20[best20]["share_of_bf16_peak"],
        "peak_bf16_gflops": round(peak_bf16, 1),
        "images_per_s": {a: {n: d["modes"][n]["images_per_s"] for n in names} for a, d in details["archs"].items()},
        "share_of_bf16_peak_by_arch": {a: max(d["modes"][n]["share_of_bf16_peak"] for n in names) for a, d in details["archs"].items()},
    }
    cmd = "python benchmarks/throughput.py " + " ".join(sys.argv[1:])
    path = write_result("throughput", summary, details, cmd.strip())
    _plot(details, names)
    print(f"wrote {path}\nsummary: {summary}")


def _plot(details: dict, names: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    archs = list(details["archs"])
    fig, ax = plt.subplots(figsize=(7, 4))
    w = 0.8 / len(names)
    for i, n in enumerate(names):
        vals = [details["archs"][a]["modes"][n]["images_per_s"] for a in archs]
        bars = ax.bar([j + i * w for j in range(len(archs))], vals, w, label=n)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks([j + w * (len(names) - 1) / 2 for j in range(len(archs))], archs)
    ax.set_ylabel("training images/s (batch %d)" % details["batch"])
    ax.set_title("Training throughput on this CPU (median of interleaved rounds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "throughput.png", dpi=120)


if __name__ == "__main__":
    main()
