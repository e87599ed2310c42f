"""Shared by the benchmark scripts: machine description and result writing."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent / "runs"  # the benchmarks' run directories (not committed)


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        ram_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        ram_gib = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": None if ram_gib is None else round(ram_gib, 1),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def matmul_peak(dtype: torch.dtype = torch.bfloat16, n: int = 4096, reps: int = 5) -> float:
    """GFLOP/s of the fastest of ``reps`` timed n x n ``torch.mm`` calls (2 n^3 FLOPs each) on the CPU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    torch.mm(a, b)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t)
    return 2 * n**3 / min(times) / 1e9


def portable(args: list[str]) -> str:
    """The command line with absolute paths made relative to the project folder, so results name no machine."""
    root = RESULTS.parent.parent
    return " ".join(os.path.relpath(a, root) if os.path.isabs(a) and os.path.exists(a) else a for a in args)


def figure(figsize: tuple[float, float]):
    """A matplotlib figure on its own Agg canvas: no pyplot state and no display needed, so a benchmark's figure
    draws the same on a headless host."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def write_result(name: str, summary: dict, details: dict, command: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    doc = {"summary": summary, "command": command, "machine": machine(), "details": details}
    path.write_text(json.dumps(doc, indent=1) + "\n")
    return path


def run_fit(data: str, out: Path, args: list[str], nproc: int = 1, reuse: bool = False) -> float | None:
    """`bonsai fit DATA --out OUT --quiet ARGS` in a fresh run directory and its own process (with ``nproc`` > 1:
    under `torchrun --standalone --nproc-per-node NPROC`); returns the peak memory (MiB, max RSS from os.wait4: the
    largest single process), also written to OUT/benchmark.json with the fit's arguments. Exits with the command
    line if the fit fails. ``reuse``: a finished run in OUT (its summary.json written) is read instead of trained
    again; its benchmark.json must name the same data and arguments, and without one (runs from before it was
    written) nothing is checked and the peak memory is unknown (None)."""
    import shutil
    import subprocess
    import sys

    record = out / "benchmark.json"
    if reuse and (out / "summary.json").is_file():
        if not record.is_file():
            print(f"reusing {out} (no benchmark.json: its arguments are not checked and its peak memory is unknown)", flush=True)
            return None
        d = json.loads(record.read_text())
        want = {"data": data, "args": args, "nproc": nproc}
        got = {k: d.get(k) for k in want}
        if got != want:
            raise SystemExit(f"{record}: the run was trained with {got}, not {want}; drop --reuse")
        print(f"reusing {out}", flush=True)
        return d["peak_rss_mib"]
    shutil.rmtree(out, ignore_errors=True)
    launch = [sys.executable, "-m"] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m"]
    cmd = [*launch, "bonsai", "fit", data, "--out", str(out), "--quiet", *args]
    print("$", " ".join(cmd), flush=True)
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"fit failed: {' '.join(cmd)}")
    rss = round(usage.ru_maxrss / 1024, 1)  # ru_maxrss is in KiB on Linux
    record.write_text(json.dumps({"data": data, "args": args, "nproc": nproc, "peak_rss_mib": rss}) + "\n")
    return rss
