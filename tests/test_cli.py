"""The command line end to end: fit, info, predict, config, and one-line errors with non-zero exits."""

from __future__ import annotations

import csv
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonsai.cli import main
from conftest import write_folder


def _bonsai(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bonsai", *args], capture_output=True, text=True, cwd=cwd, timeout=300)


def test_cli_fit_end_to_end_on_about_100_images(tmp_path: Path):
    data = write_folder(tmp_path / "data", n_train=30, n_test=4, size=16, ext="jpg")
    out = tmp_path / "run"
    r = _bonsai("fit", str(data), "--out", str(out), "--epochs", "2", "--arch", "resnet8", "batch_size=16", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "done:" in r.stdout and "val accuracy" in r.stdout
    with open(out / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label", "cat", "dog", "fox"] and len(rows) == 13
    assert rows[1][0] == "cat_030.jpg"

    p = _bonsai("predict", str(out), str(data / "test"), "--out", str(tmp_path / "p.csv"))
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "p.csv", newline="") as f:
        again = list(csv.reader(f))
    assert [r[:2] for r in again] == [r[:2] for r in rows]

    # config.yaml re-runs the same fit
    r2 = _bonsai("fit", "--config", str(out / "config.yaml"), "--out", str(tmp_path / "rerun"), "--quiet")
    assert r2.returncode == 0, r2.stderr
    assert (tmp_path / "rerun" / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()


def test_info_prints_what_was_found(folder_data: Path, capsys):
    assert main(["info", str(folder_data)]) == 0
    out = capsys.readouterr().out
    assert "classes       3: cat (8), dog (8), fox (8)" in out
    assert "test images   9 (unlabeled)" in out and "working size  16x16" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/missing"], "missing: no such file or folder"),
        (["fit", "{tmp}/missing", "--quiet"], "missing: no such file or folder"),
        (["fit", "{tmp}/empty", "--quiet"], "no dataset found"),
        (["fit", "{tmp}/one", "--quiet"], "only one class"),
        (["fit", "{tmp}/one", "train.lr=fast"], "config key train.lr: expected float"),
        (["fit", "{tmp}/one", "--budget", "soon"], "budget 'soon'"),
        (["predict", "{tmp}/empty", "{tmp}/one"], "not a bonsai run"),
        (["fit", "--resume", "{tmp}/empty"], "not a run directory"),
    ],
)
def test_errors_are_one_line_with_exit_code_2(tmp_path: Path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "one" / "train" / "a").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "one" / "train" / "a" / "x.png")
    code = main([a.format(tmp=tmp_path) for a in args])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("bonsai: error: ") and err.count("\n") == 1 and message in err
    assert "Traceback" not in err


def test_config_show_prints_resolved_defaults(capsys):
    assert main(["config", "--show", "lr=0.3"]) == 0
    out = capsys.readouterr().out
    assert "  lr: 0.3" in out and "  epochs: 20" in out


def test_help_explains():
    r = _bonsai("fit", "--help")
    assert r.returncode == 0 and "--budget" in r.stdout and "patience" in r.stdout


def test_a_fault_inside_bonsai_is_one_line_with_exit_code_70_and_a_traceback_on_request(folder_data: Path, monkeypatch, capsys):
    import bonsai.cli as cli

    def broken(ns):
        raise RuntimeError("an inner fault\nwith a second line")

    monkeypatch.setattr(cli, "_cmd_info", broken)
    monkeypatch.delenv("BONSAI_DEBUG", raising=False)
    assert main(["info", str(folder_data)]) == 70
    err = capsys.readouterr().err
    assert err == "bonsai: internal error: RuntimeError: an inner fault (BONSAI_DEBUG=1 shows the traceback)\n"
    monkeypatch.setenv("BONSAI_DEBUG", "1")
    with pytest.raises(RuntimeError, match="an inner fault"):
        main(["info", str(folder_data)])

    def no_memory(ns):  # what PyTorch's CPU allocator raises: out of memory is a system error, exit code 1
        raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 123 bytes")

    monkeypatch.setattr(cli, "_cmd_info", no_memory)
    assert main(["info", str(folder_data)]) == 1
    assert capsys.readouterr().err.startswith("bonsai: error: out of memory")


def test_a_write_that_fails_names_the_file(tmp_path: Path, monkeypatch):
    import errno
    import os

    from bonsai.utils import atomic_write_text

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "out" / "summary.json"
    with pytest.raises(OSError, match="No space left on device: '.*summary.json'") as e:
        atomic_write_text(target, "{}")
    assert e.value.errno == errno.ENOSPC and not target.exists() and list((tmp_path / "out").iterdir()) == []


def test_failed_fit_leaves_no_run_directory_behind(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["fit", str(tmp_path / "missing"), "--quiet"]) == 2
    assert not (tmp_path / "runs").exists()


def test_unwritable_out_is_refused_before_training(folder_data: Path, tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["fit", str(folder_data), "--out", str(blocker / "run"), "--quiet"]) == 2
    assert "cannot create or write the run directory" in capsys.readouterr().err


def test_compress_with_bad_share_bits_is_a_one_line_error(tmp_path):
    import subprocess
    import sys

    for bad in ("5,x", "9"):
        r = subprocess.run([sys.executable, "-m", "bonsai", "compress", str(tmp_path), "--share-bits", bad], capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "--share-bits" in r.stderr, r.stderr


def test_flops_flag_needs_a_count():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "bonsai", "fit", "nowhere.npz", "--flops", "lots"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == ["bonsai: error: FLOPs 'lots': use a number like 40M, 1.5G or 800k"], r.stderr


class _Exited(Exception):
    pass


class _Stream(io.StringIO):
    def __init__(self, name: str, events: list):
        super().__init__()
        self.name, self.events = name, events

    def flush(self) -> None:
        self.events.append(f"flush {self.name}")


@pytest.mark.parametrize("args,code", [(["config"], 0), (["predict", "no-such-run", "no-such-images"], 2), (None, 1)], ids=["success", "error", "fault"])
def test_the_cli_leaves_a_torchrun_process_group_and_then_the_process_at_once(args, code: int, monkeypatch):
    """Whatever the command's outcome (a fault re-raised for BONSAI_DEBUG included), an initialized process group
    is destroyed, the output flushed and logging shut down, and the process leaves with the command's exit code
    without the interpreter's shutdown (where gloo's threads may abort it)."""
    from types import SimpleNamespace

    import bonsai.cli

    events = []
    fake = SimpleNamespace(is_available=lambda: True, is_initialized=lambda: "left" not in events, destroy_process_group=lambda: events.append("left"))
    monkeypatch.setitem(sys.modules, "torch.distributed", fake)
    out, err = _Stream("stdout", events), _Stream("stderr", events)
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(bonsai.cli.logging, "shutdown", lambda: events.append("logging"))
    if args is None:
        monkeypatch.setattr(bonsai.cli, "_main", lambda argv: 1 / 0)

    def fake_exit(c: int):
        events.append(f"exit {c}")
        raise _Exited

    monkeypatch.setattr(bonsai.cli.os, "_exit", fake_exit)
    with pytest.raises(_Exited):
        main(args)
    assert events == ["left", "flush stdout", "flush stderr", "logging", f"exit {code}"]
    assert {0: out, 2: err, 1: err}[code].getvalue().strip()  # what the command printed went to its stream
    if args is None:
        assert "ZeroDivisionError" in err.getvalue()


def test_without_a_process_group_the_cli_returns_its_code(monkeypatch):
    import bonsai.cli

    monkeypatch.setattr(bonsai.cli.os, "_exit", lambda c: pytest.fail("os._exit without a process group"))
    assert main(["config"]) == 0


def test_the_cli_logger_writes_to_the_stderr_of_the_moment(monkeypatch):
    """After main returns, a caller may swap or close stderr (pytest's capture does): the bonsai logger set up by
    main follows sys.stderr instead of writing to the stream it found, which may be closed by then."""
    import logging

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(["config"]) == 0
    first.close()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logging.getLogger("bonsai").warning("after the swap")
    assert later.getvalue() == "bonsai: warning: after the swap\n"


def test_adapt_flags_set_the_controller_and_exclude_each_other(tmp_path: Path, monkeypatch):
    import bonsai.api as api_mod

    seen = []
    monkeypatch.setattr(api_mod, "fit", lambda *a, **kw: seen.append(kw) or None)
    for flag, want in (("--adapt", True), ("--no-adapt", False), (None, None)):
        assert main(["fit", str(tmp_path), "--budget", "1m", "--quiet", *([flag] if flag else [])]) == 0
        assert seen[-1].get("adapt.on") == want
    assert seen[0].get("prune.enabled") is True and "prune.enabled" not in seen[2]
    # --no-adapt trains the pick as it is, even from a config.yaml in which --adapt turned pruning on
    assert seen[1].get("prune.enabled") is False and "model.zero_init_residual" in seen[1]
    assert main(["fit", str(tmp_path), "--budget", "1m", "--quiet", "--no-adapt", "--prune"]) == 0
    assert seen[-1]["adapt.on"] is False and seen[-1]["prune.enabled"] is True
    with pytest.raises(SystemExit) as e:
        main(["fit", str(tmp_path), "--adapt", "--no-adapt"])
    assert e.value.code == 2
