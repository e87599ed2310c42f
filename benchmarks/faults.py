"""Every fault scenario end to end, through the `bonsai` command: what was expected, what happened, how much work
and data were lost.

    python benchmarks/faults.py            # about 6 minutes; needs `pip install -e '.[test]'` (the hostile corpus)

Writes benchmarks/results/faults.{json,png}. Each training scenario runs `bonsai fit` in a child process on a small
synthetic dataset; faults that need a precise moment (inside a checkpoint write, inside a surgery, a NaN or an
out-of-memory error at a given step) are injected in that child by `--child FAULT`, which patches one function
and then runs the ordinary command line. Work lost is counted as the finished epochs that must be trained again,
plus the share of the interrupted epoch that was done. Data lost means a file bonsai had written (checkpoint,
best model, metrics, predictions) is missing, torn, or unreadable after the fault and its recovery.
It also measures the peak memory of a few training steps against the estimate that caps the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, portable, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
FIT = ["--arch", "resnet8", "--quiet", "train.batch_size=16", "train.precision=fp32", "data.val_fraction=0.2"]
PRUNE = ["--prune", "prune.lpr=0.5", "prune.interval=1", "prune.threshold=0.5", "prune.min_width=2", "prune.round_to=1"]
EPOCHS = 5


# ---- the child: one patched function, then the ordinary command line ----------------------------------------


def _ready_and_wait() -> None:
    Path(os.environ["FAULT_MARKER"]).touch()
    time.sleep(600)  # the parent kills us here


def _child(fault: str, argv: list[str]) -> int:
    import torch

    import bonsai.api
    import bonsai.train.engine as engine
    import bonsai.train.resources as resources
    from bonsai import cli

    real_write, real_remove, real_ce = engine.atomic_write_bytes, engine.remove_channels_, engine.F.cross_entropy
    writes: list[int] = []
    steps: list[int] = []

    def checkpoint_write(path, data):
        writes.append(1)
        if len(writes) == 3:  # the start, epoch 1, then epoch 2's checkpoint: cut it in the middle
            if fault == "kill_in_checkpoint":
                fd, tmp = tempfile.mkstemp(dir=Path(path).parent, prefix=f".{Path(path).name}.", suffix=".tmp")
                os.write(fd, data[: len(data) // 2])
                _ready_and_wait()
            if fault == "disk_full_in_checkpoint":
                raise OSError(28, "No space left on device")
        return real_write(path, data)

    def surgery(model, keep, opt=None):
        real_remove(model, keep, opt)
        if opt is not None and fault == "kill_in_surgery":  # the network in training, pruned but not yet saved
            _ready_and_wait()
        if fault == "broken_surgery":
            with torch.no_grad():
                model.head.weight.fill_(float("nan"))

    def ce(logits, y, **kw):
        steps.append(1)
        n = len(steps)
        if fault == "oom_once" and len(y) > 8:
            raise torch.OutOfMemoryError("injected: CUDA out of memory. Tried to allocate 2.00 GiB")
        loss = real_ce(logits, y, **kw)
        if (fault == "nan_once" and n == _NAN_STEP) or (fault == "nan_always" and n >= _NAN_STEP):
            return loss * float("nan")
        return loss

    engine.atomic_write_bytes, engine.remove_channels_ = checkpoint_write, surgery
    engine.F.cross_entropy = ce
    if fault == "memory_small":
        bonsai.api.available_memory = lambda device: int(os.environ["FAULT_MEMORY"])
    if fault == "disk_full_at_start":
        import shutil

        usage = shutil.disk_usage("/")
        resources.shutil.disk_usage = lambda p: usage._replace(free=2**20)
    return cli.main(argv)


_NAN_STEP = 2 * 12 + 6  # epoch 3, step 6 of 12 (240 images, 20% held out, batch 16)


# ---- the parent: scenarios --------------------------------------------------------------------------------


def _data(folder: Path) -> Path:
    rng = np.random.default_rng(0)
    n, size, classes = 80, 32, 3
    x = rng.integers(0, 60, (n * classes, size, size, 3), dtype=np.uint8)
    y = np.repeat(np.arange(classes), n)
    for c in range(classes):
        x[y == c, c * size // classes : (c + 1) * size // classes] += 150
    path = folder / "data.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[::8], y_test=y[::8])
    return path


def _bonsai(args: list[str], fault: str | None = None, env: dict | None = None) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", fault, "--", *args] if fault else [sys.executable, "-m", "bonsai", *args]
    e = os.environ | {"PYTHONPATH": str(ROOT / "src")} | (env or {})
    # default signal handling, as a user's foreground command has it, even when this script runs under nohup
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=e, cwd=ROOT, preexec_fn=_default_signals)


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _finish(p: subprocess.Popen, timeout: float = 600) -> tuple[int, str]:
    out, err = p.communicate(timeout=timeout)
    p.stdout_text = out.decode(errors="replace")
    return p.returncode, err.decode(errors="replace")


def _metrics(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _events(run: Path) -> list[dict]:
    path = run / "events.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _intact(run: Path, epochs: int) -> list[str]:
    """What is missing, torn or unreadable in a run that should have finished ``epochs`` epochs."""
    from bonsai.api import load
    from bonsai.train.engine import read_checkpoint

    problems = []
    try:
        _, state, _, _ = read_checkpoint(run / "checkpoint.safetensors")
        if state.epoch != epochs:
            problems.append(f"checkpoint at epoch {state.epoch}, not {epochs}")
    except Exception as e:  # noqa: BLE001 - any failure is data lost
        problems.append(f"checkpoint: {e}")
    try:
        load(run)
    except Exception as e:  # noqa: BLE001
        problems.append(f"best model: {e}")
    if [m["epoch"] for m in _metrics(run)] != list(range(1, epochs + 1)):
        problems.append(f"metrics.jsonl epochs {[m['epoch'] for m in _metrics(run)]}")
    if not (run / "predictions.csv").is_file():
        problems.append("no predictions.csv")
    return problems


def _wait(p: subprocess.Popen, cond, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and p.poll() is None:
        if cond():
            return
        time.sleep(0.005)
    raise RuntimeError(f"the condition was not reached (exit code {p.poll()})")


def _epoch_s(run: Path) -> float:
    m = _metrics(run)
    return (m[-1]["clock_s"] - m[0]["clock_s"]) / max(len(m) - 1, 1) if len(m) > 1 else m[0]["clock_s"]


def _row(name, expected, observed, ok, code, err, lost, data_problems, **extra) -> dict:
    return {
        "scenario": name,
        "expected": expected,
        "observed": observed,
        "handled": bool(ok) and not data_problems and "Traceback" not in err,
        "exit_code": code,
        "traceback": "Traceback" in err,
        "work_lost_epochs": None if lost is None else round(lost, 2),
        "data_lost": bool(data_problems),
        "data_problems": data_problems,
        "stderr_tail": err.strip().splitlines()[-1][:300] if err.strip() else "",
    } | extra


def _killed_then_resumed(work: Path, data: Path, name: str, fault: str | None, sig: int, expected: str, extra_args=()) -> dict:
    """Run, deliver ``sig`` (mid-epoch 3, or when the child's fault point is reached), resume to the end."""
    run, marker = work / name, work / f"{name}.ready"
    p = _bonsai(["fit", str(data), "--out", str(run), "--epochs", str(EPOCHS), *FIT, *extra_args], fault, {"FAULT_MARKER": str(marker)})
    if fault:
        _wait(p, marker.exists)
        done_before = len(_metrics(run))
        partial = 0.0  # the child is not training at its fault point
    else:
        _wait(p, lambda: len(_metrics(run)) >= 2)
        epoch_s = _epoch_s(run)
        t_line = (run / "metrics.jsonl").stat().st_mtime
        time.sleep(max(0.0, t_line + 0.5 * epoch_s - time.time()))  # half-way through epoch 3
        done_before = len(_metrics(run))
        partial = min(1.0, (time.time() - (run / "metrics.jsonl").stat().st_mtime) / epoch_s)
    p.send_signal(sig)
    code, err = _finish(p)
    from bonsai.train.engine import read_checkpoint

    try:
        resumed_from = read_checkpoint(run / "checkpoint.safetensors")[1].epoch
        ck_ok = ""
    except Exception as e:  # noqa: BLE001
        resumed_from, ck_ok = 0, f"checkpoint unreadable after the fault: {e}"
    code2, err2 = _finish(_bonsai(["fit", "--resume", str(run), "--quiet"]))
    problems = ([ck_ok] if ck_ok else []) + _intact(run, EPOCHS)
    lost = max(0, done_before - resumed_from) + partial
    observed = f"exit {code}; last checkpoint at epoch {resumed_from} of {done_before} finished; resume exit {code2}"
    want_code = {signal.SIGKILL: -9, signal.SIGTERM: 143, signal.SIGINT: 130}[sig]
    return _row(name, expected, observed, code == want_code and code2 == 0, code, err + err2, lost, problems)


def training_scenarios(work: Path) -> list[dict]:
    data = _data(work)
    rows = []
    log = lambda r: (rows.append(r), print(f"{r['scenario']:28s} handled={r['handled']} lost={r['work_lost_epochs']} {r['observed']}", flush=True))  # noqa: E731

    log(_killed_then_resumed(work, data, "sigkill_mid_epoch", None, signal.SIGKILL, "resume continues from the last epoch's checkpoint"))
    log(_killed_then_resumed(work, data, "sigterm_mid_epoch", None, signal.SIGTERM, "step finishes, predictions written, exit 143, resume continues"))
    log(_killed_then_resumed(work, data, "sigint_mid_epoch", None, signal.SIGINT, "step finishes, predictions written, exit 130, resume continues"))
    log(_killed_then_resumed(work, data, "sigkill_in_checkpoint_write", "kill_in_checkpoint", signal.SIGKILL, "the previous checkpoint stays whole; resume continues"))
    log(_killed_then_resumed(work, data, "sigkill_in_surgery", "kill_in_surgery", signal.SIGKILL, "the pre-surgery checkpoint stays whole; resume redoes the surgery", PRUNE))

    # ENOSPC while writing a checkpoint: a clear error, the previous checkpoint kept, resume finishes
    run = work / "disk_full_in_checkpoint"
    code, err = _finish(_bonsai(["fit", str(data), "--out", str(run), "--epochs", str(EPOCHS), *FIT], "disk_full_in_checkpoint"))
    from bonsai.train.engine import read_checkpoint

    at = read_checkpoint(run / "checkpoint.safetensors")[1].epoch
    done = len(_metrics(run))
    code2, err2 = _finish(_bonsai(["fit", "--resume", str(run), "--quiet"]))
    ok = code == 2 and "cannot write the checkpoint" in err and code2 == 0
    log(_row("disk_full_in_checkpoint", "clear error naming the checkpoint; the previous one kept; resume continues",
             f"exit {code}: {err.strip().splitlines()[-1][:90]}; resume exit {code2}", ok, code, err + err2, done - at, _intact(run, EPOCHS)))

    def one(name, expected, fault, args, check, env=None, epochs=EPOCHS, lost=None):
        run = work / name
        code, err = _finish(_bonsai(["fit", str(data), "--out", str(run), "--epochs", str(epochs), *FIT, *args], fault, env))
        observed, ok, epochs_done, lost_ = check(run, code, err)
        problems = _intact(run, epochs_done) if epochs_done else []
        log(_row(name, expected, observed, ok, code, err, lost_ if lost is None else lost, problems))

    steps = 12

    def nan_once(run, code, err):
        rb = [e for e in _events(run) if e["event"] == "rollback"]
        return f"exit {code}; rollbacks {[(e['to_epoch'], e['lr_scale']) for e in rb]}", code == 0 and len(rb) == 1, EPOCHS, (_NAN_STEP - 1) % steps / steps

    one("nan_loss_once", "rollback to the last checkpoint with the LR halved; training completes", "nan_once", [], nan_once)

    def nan_always(run, code, err):
        s = json.loads((run / "summary.json").read_text())
        rb = [e for e in _events(run) if e["event"] == "rollback"]
        ok = code == 0 and s["stop_reason"] == "diverged" and len(rb) == 3 and (run / "predictions.csv").is_file()
        return f"exit {code}; {len(rb)} rollbacks then stop_reason={s['stop_reason']} at epoch {s['epochs']}", ok, s["epochs"], None

    one("nan_loss_persistent", "3 rollbacks, then stop as diverged keeping the best model and predictions", "nan_always", [], nan_always)

    def oom(run, code, err):
        ev = [e for e in _events(run) if e["event"] == "out_of_memory"]
        return f"exit {code}; batch {[(e['batch_size_before'], e['batch_size']) for e in ev]}", code == 0 and len(ev) == 1, EPOCHS, 0.0

    one("out_of_memory_in_step", "back to the last checkpoint with the batch halved; training completes", "oom_once", [], oom)

    def broken(run, code, err):
        ev = [e["event"] for e in _events(run)]
        widths = {json.dumps(m["widths"]) for m in _metrics(run)}
        ok = code == 0 and "surgery_rejected" in ev and "prune" not in ev and len(widths) == 1
        return f"exit {code}; events {sorted(set(ev))}; widths unchanged: {len(widths) == 1}", ok, EPOCHS, 0.0

    one("surgery_gives_nan", "surgery rejected and logged; training goes on with the old network", "broken_surgery", PRUNE, broken)

    from bonsai.models.arch import preset
    from bonsai.models.resnet import build, count_params
    from bonsai.train.resources import MEMORY_SHARE, train_memory_bytes

    spec = preset("resnet8", 3, 3, 32)
    room = int(train_memory_bytes(spec, 8, False, count_params(build(spec))) / MEMORY_SHARE) + 1

    def small_memory(run, code, err):
        ev = [e for e in _events(run) if e["event"] == "batch_capped"]
        batches = {m["batch_size"] for m in _metrics(run)}
        return f"exit {code}; batch_capped {[(e['batch_size_wanted'], e['batch_size']) for e in ev]}; trained at {sorted(batches)}", code == 0 and batches == {8}, EPOCHS, 0.0

    one("little_memory", "batch capped to what fits (8 of 16) before training", "memory_small", [], small_memory, {"FAULT_MEMORY": str(room)})

    def refused(fragment):
        def check(run, code, err):
            last = err.strip().splitlines()[-1] if err.strip() else ""
            ok = code == 2 and fragment in last and not (run / "checkpoint.safetensors").exists()
            return f"exit {code}: {last[:110]}", ok, 0, 0.0

        return check

    one("no_disk_space", "refused before training with the space needed", "disk_full_at_start", [], refused("MB free on its disk"))
    (work / "a_file").write_text("x")
    name = "out_is_a_file"
    code, err = _finish(_bonsai(["fit", str(data), "--out", str(work / "a_file" / "run"), *FIT]))
    log(_row(name, "refused before training: not a writable folder", f"exit {code}: {err.strip()[-110:]}", code == 2 and "not a writable folder" in err, code, err, 0.0, []))

    # damage to files at rest
    run = work / "damaged"
    _finish(_bonsai(["fit", str(data), "--out", str(run), "--epochs", "2", *FIT]))
    ck = run / "checkpoint.safetensors"
    ck.write_bytes(ck.read_bytes()[: ck.stat().st_size // 3])
    code, err = _finish(_bonsai(["fit", "--resume", str(run), "--epochs", "3", "--quiet"]))
    code2, err2 = _finish(_bonsai(["predict", str(run), str(data), "--out", str(work / "p.csv")]))
    ok = code == 2 and "unreadable checkpoint" in err and code2 == 0
    log(_row("truncated_checkpoint", "resume refused naming the file; the best model still predicts",
             f"resume exit {code}: {err.strip()[-80:]}; predict exit {code2}", ok, code, err + err2, None, []))
    arch = json.loads((run / "arch.json").read_text())
    arch["stages"][0]["width"] = -5
    (run / "arch.json").write_text(json.dumps(arch))
    code, err = _finish(_bonsai(["predict", str(run), str(data), "--out", str(work / "p2.csv")]))
    log(_row("tampered_arch_json", "clear error naming arch.json and the field, no out-of-memory",
             f"exit {code}: {err.strip()[-100:]}", code == 2 and "arch.json" in err, code, err, None, []))
    return rows


def hostile_inputs(work: Path) -> list[dict]:
    """The test suite's hostile corpus, each case through `bonsai info` as a user would meet it."""
    sys.path.insert(0, str(ROOT / "tests"))
    import test_hostile as h
    from conftest import make_images

    rows = []
    for name, builder, fragment in h.DATASET_CASES:
        d = work / f"ds-{len(rows)}"
        d.mkdir()
        path = builder(d)
        code, err = _finish(_bonsai(["info", str(path)]))
        lines = err.strip().splitlines()
        ok = code == 2 and len(lines) == 1 and fragment in lines[0]
        rows.append(_row(f"dataset: {name}", "refused, one-line error naming the file", f"exit {code}: {lines[-1][:100] if lines else ''}", ok, code, err, None, []))
    for name, fname, data, expected, _check in h.FILE_CASES:
        d = work / f"img-{len(rows)}"
        for c, (x, y) in enumerate(zip(*make_images(15, n_classes=2), strict=True)):  # 30 good, distinct images
            (d / "train" / str(y)).mkdir(parents=True, exist_ok=True)
            (d / "train" / str(y) / f"{c}.png").write_bytes(h._png_bytes(x))
        (d / "train" / "0" / fname).write_bytes(data)
        code, err = _finish(_bonsai(["info", str(d)]))
        skipped = "skipped 1 unreadable image file(s)" in err
        observed = f"exit {code}, {'skipped with a warning' if skipped else 'read'}"
        ok = code == 0 and (skipped == (expected == "skip"))
        rows.append(_row(f"file: {name}", f"{'skipped with a warning' if expected == 'skip' else 'read'}; the rest loads", observed, ok, code, err, None, []))
    for r in rows:
        print(f"{r['scenario'][:60]:60s} handled={r['handled']}", flush=True)
    return rows


def _memory_probe(arch: str, batch: int, half: bool) -> dict:
    """Peak resident memory during three training steps beyond what the process held just before them."""
    import resource

    import torch
    from torch.nn import functional as F

    from bonsai.models.arch import preset
    from bonsai.models.resnet import build, count_params
    from bonsai.train.resources import train_memory_bytes

    spec = preset(arch, 10, 3, 32)
    model = build(spec).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    base = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")  # resident now
    for _ in range(3):
        with torch.autocast("cpu", torch.bfloat16, enabled=half):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    est = train_memory_bytes(spec, batch, half, count_params(model))
    return {"arch": arch, "batch": batch, "precision": "bf16" if half else "fp32", "measured_mb": round((peak - base) / 2**20, 1),
            "estimated_mb": round(est / 2**20, 1), "estimate_over_measured": round(est / max(peak - base, 1), 2)}


def memory_estimates() -> list[dict]:
    """The batch-choice memory model against measured peaks, each shape in a fresh process."""
    rows = []
    for arch in ("resnet20", "bonsai"):
        for batch in (64, 256):
            for half in (False, True):
                cmd = [sys.executable, __file__, "--memory-probe", f"{arch},{batch},{int(half)}"]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=os.environ | {"PYTHONPATH": str(ROOT / "src")})
                rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r["work_lost_epochs"] is not None]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(train) + 1.5))
    names = [r["scenario"] for r in train]
    ax.barh(names, [r["work_lost_epochs"] for r in train], color=["tab:green" if r["handled"] else "tab:red" for r in train])
    ax.axvline(1.0, color="k", ls="--", lw=1, label="target: at most one epoch")
    ax.invert_yaxis()
    ax.set_xlabel("work lost to the fault (epochs)")
    n_ok = sum(r["handled"] for r in rows)
    ax.set_title(f"bonsai fault scenarios: {n_ok}/{len(rows)} handled (green), "
                 f"{sum(r['traceback'] for r in rows)} tracebacks, {sum(r['data_lost'] for r in rows)} with data lost", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--no-hostile", action="store_true", help="skip the hostile-input corpus")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    ap.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ns = ap.parse_args()
    if ns.child:
        sys.exit(_child(ns.child, [a for a in ns.rest if a != "--"]))
    if ns.memory_probe:
        arch, batch, half = ns.memory_probe.split(",")
        print(json.dumps(_memory_probe(arch, int(batch), bool(int(half)))))
        return
    t0 = time.time()
    with tempfile.TemporaryDirectory(prefix="bonsai-faults-") as tmp:
        rows = training_scenarios(Path(tmp))
        if not ns.no_hostile:
            rows += hostile_inputs(Path(tmp))
        rows = json.loads(json.dumps(rows).replace(tmp, "TMP"))  # the results name no machine's paths
    memory = memory_estimates()
    train = [r for r in rows if r["work_lost_epochs"] is not None]
    summary = {
        "scenarios": len(rows),
        "handled": sum(r["handled"] for r in rows),
        "tracebacks": sum(r["traceback"] for r in rows),
        "checkpoints_lost": sum(r["data_lost"] for r in rows),
        "max_work_lost_epochs": max(r["work_lost_epochs"] for r in train),
        "all_targets_met": all(r["handled"] for r in rows) and max(r["work_lost_epochs"] for r in train) <= 1.0,
        "memory_estimate_over_measured_min": min(m["estimate_over_measured"] for m in memory),
        "memory_estimate_over_measured_max": max(m["estimate_over_measured"] for m in memory),
        "wall_s": round(time.time() - t0, 1),
    }
    out = write_result("faults", summary, {"rows": rows, "memory": memory}, portable([sys.executable.rsplit("/", 1)[-1], *sys.argv]))
    plot(rows, RESULTS / "faults.png")
    print(json.dumps(summary, indent=1))
    print(f"wrote {out} and {RESULTS / 'faults.png'}")


if __name__ == "__main__":
    main()
