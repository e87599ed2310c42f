"""Faults during training: divergence is rolled back with a lower LR, and Ctrl-C / SIGTERM stop cleanly."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

import bonsai
from bonsai.errors import BonsaiError
from conftest import make_images, signal_after_epochs

TINY = dict(arch="resnet8", batch_size=16, eval_batch_size=64, quiet=True, precision="fp32")


@pytest.fixture
def data(tmp_path: Path) -> Path:
    x, y = make_images(20)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    return path


def _poison_loss(monkeypatch, bad_calls) -> list[int]:
    """Make the training loss NaN on the given (1-based) calls of the training loss (cross_entropy)."""
    import bonsai.train.engine as engine

    real = engine.F.cross_entropy
    calls: list[int] = []

    def ce(logits, y, label_smoothing=0.0, **kw):
        loss = real(logits, y, label_smoothing=label_smoothing, **kw)
        calls.append(1)
        return loss * float("nan") if bad_calls(len(calls)) else loss

    monkeypatch.setattr(engine.F, "cross_entropy", ce)
    return calls


def _events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def test_one_nan_step_rolls_back_halves_the_lr_and_training_completes(data: Path, tmp_path: Path, monkeypatch):
    reference = bonsai.fit(data, epochs=3, out=str(tmp_path / "ref"), **TINY)
    _poison_loss(monkeypatch, lambda n: n == 5)  # epoch 2, step 2 (54 training images: 3 full batches of 16)
    run = bonsai.fit(data, epochs=3, out=str(tmp_path / "r"), **TINY)
    rollbacks = [e for e in _events(run.dir) if e["event"] == "rollback"]
    assert len(rollbacks) == 1 and rollbacks[0]["lr_scale"] == 0.5 and rollbacks[0]["to_epoch"] == 1
    assert "loss nan" in rollbacks[0]["reason"]
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(x) for x in (reference.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    timing = ("images_per_s", "clock_s", "train_time_s", "anytime_s")
    assert {k: v for k, v in metrics[0].items() if k not in timing} == {k: v for k, v in ref[0].items() if k not in timing}
    # the schedule replays from the checkpoint (same progress) at half the LR
    assert [m["lr"] for m in metrics[1:]] == pytest.approx([0.5 * m["lr"] for m in ref[1:]])
    assert run.summary["stop_reason"] == "epochs"
    for p in run.model.parameters():
        assert torch.isfinite(p).all()


def test_divergence_in_the_first_epoch_rolls_back_to_the_starting_weights(data: Path, tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n == 2)
    run = bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), **TINY)
    rollbacks = [e for e in _events(run.dir) if e["event"] == "rollback"]
    assert [e["to_epoch"] for e in rollbacks] == [0]
    assert run.summary["epochs"] == 2 and run.summary["stop_reason"] == "epochs"


def test_rollback_keeps_the_batch_the_loader_capped_to_the_data(data: Path, tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n == 2)  # the default batch (256) is capped to the 54 images: epoch 2
    run = bonsai.fit(data, epochs=3, out=str(tmp_path / "r"), **(TINY | {"batch_size": 256}))
    assert [e["to_epoch"] for e in _events(run.dir) if e["event"] == "rollback"] == [1]
    assert run.summary["stop_reason"] == "epochs" and run.summary["epochs"] == 3


def test_rollback_while_pruning_keeps_lambda(data: Path, tmp_path: Path, monkeypatch):
    from safetensors import safe_open

    _poison_loss(monkeypatch, lambda n: n == 2)  # back to the starting checkpoint, written before lambda was set
    run = bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), **TINY, **{"prune.enabled": True})
    with safe_open(str(run.dir / "checkpoint.safetensors"), "pt") as f:
        state = json.loads(f.metadata()["state"])
    assert state["rollbacks"] == 1 and state["lasso_lambda"] is not None and state["lasso_lambda"] > 0


def test_persistent_divergence_stops_after_the_retries_and_keeps_the_best_model(data: Path, tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: n > 3)  # epoch 1 (3 steps) is fine, every later step fails
    run = bonsai.fit(data, epochs=4, out=str(tmp_path / "r"), max_rollbacks=2, **TINY)
    rollbacks = [e for e in _events(run.dir) if e["event"] == "rollback"]
    assert [e["lr_scale"] for e in rollbacks] == [0.5, 0.25]
    assert run.summary["stop_reason"] == "diverged" and run.summary["epochs"] == 1
    assert (run.dir / "predictions.csv").is_file()


def test_divergence_before_any_epoch_finished_is_a_clear_error(data: Path, tmp_path: Path, monkeypatch):
    _poison_loss(monkeypatch, lambda n: True)
    with pytest.raises(BonsaiError, match="no usable model.*diverged"):
        bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), max_rollbacks=1, **TINY)


def test_a_signal_ignored_by_the_parent_stays_ignored(data: Path, tmp_path: Path):
    # nohup-style jobs: SIGINT set to be ignored before bonsai starts is not taken over by bonsai's handler
    run = tmp_path / "r"
    args = [str(data), "--epochs", "3", "--arch", "resnet8", "--quiet", "train.batch_size=16", "train.precision=fp32"]
    proc = signal_after_epochs(args, run, 1, signal.SIGINT, ignore_sigint=True)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert json.loads((run / "summary.json").read_text())["stop_reason"] == "epochs"


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_stops_after_the_step_keeps_the_checkpoint_and_resume_finishes(data: Path, tmp_path: Path, sig, code):
    run = tmp_path / "r"
    args = [str(data), "--epochs", "40", "--arch", "resnet8", "--quiet", "train.batch_size=16", "train.precision=fp32"]
    proc = signal_after_epochs(args, run, 2, sig)
    metrics = run / "metrics.jsonl"
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err.decode()
    assert "--resume" in err.decode() and "Traceback" not in err.decode()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stop_reason"] == sig.name.lower()
    assert (run / "predictions.csv").is_file()
    done = len(metrics.read_text().splitlines())
    assert 2 <= done < 40
    resumed = bonsai.fit(None, resume=run, epochs=done + 1, quiet=True)
    assert resumed.summary["epochs"] == done + 1 and resumed.summary["stop_reason"] == "epochs"


def test_a_signal_in_the_first_epoch_exits_with_its_code_and_a_resume_hint(data: Path, tmp_path: Path, monkeypatch, capsys):
    import bonsai.train.engine as engine
    from bonsai.cli import main

    real = engine.F.cross_entropy

    def ce(*a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the first step; the handler lets the step finish
        return real(*a, **kw)

    monkeypatch.setattr(engine.F, "cross_entropy", ce)
    code = main(["fit", str(data), "--out", str(tmp_path / "r"), "--epochs", "2", "--arch", "resnet8", "--quiet", "train.precision=fp32", "train.batch_size=16"])
    assert code == 143
    err = capsys.readouterr().err
    assert "SIGTERM" in err and "before the first epoch finished" in err and "--resume" in err
    assert "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    monkeypatch.setattr(engine.F, "cross_entropy", real)
    resumed = bonsai.fit(None, resume=tmp_path / "r", quiet=True)  # from the checkpoint written before step 1
    assert resumed.summary["epochs"] == 2 and resumed.summary["stop_reason"] == "epochs"


# ---- surgery that breaks the network, out of memory, no room on disk ------------------------------------------

PRUNE_HARD = {"prune.enabled": True, "prune.lpr": 0.5, "prune.interval": 1, "prune.threshold": 0.5, "prune.min_width": 2, "prune.round_to": 1}


def test_a_surgery_with_non_finite_results_is_rejected_and_training_goes_on(data: Path, tmp_path: Path, monkeypatch):
    import bonsai.train.engine as engine

    reference = bonsai.fit(data, epochs=2, out=str(tmp_path / "ref"), **TINY, **PRUNE_HARD)
    assert any(e["event"] == "prune" for e in _events(reference.dir))  # these settings do prune

    real = engine.remove_channels_

    def broken(model, keep, opt=None):
        real(model, keep, opt)
        with torch.no_grad():
            model.head.weight[0, 0] = float("nan")

    monkeypatch.setattr(engine, "remove_channels_", broken)
    run = bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), **TINY, **PRUNE_HARD)
    events = [e for e in _events(run.dir) if e["event"] != "lasso"]  # the penalty's strength, logged at its first step
    assert [e["event"] for e in events] == ["surgery_rejected"]
    assert "head.weight" in events[0]["reason"]
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2]
    assert metrics[1]["widths"] == metrics[0]["widths"]  # the network in training was left as it was
    from safetensors.torch import load_file

    assert all(torch.isfinite(v).all() for v in load_file(run.dir / "checkpoint.safetensors").values() if v.is_floating_point())


def _oom_above(monkeypatch, limit: int | None) -> None:
    """Training steps with more than ``limit`` images (any, with None) raise the out-of-memory error."""
    import bonsai.train.engine as engine

    real = engine.F.cross_entropy

    def ce(logits, y, **kw):
        if limit is None or len(y) > limit:
            raise torch.OutOfMemoryError("simulated: tried to allocate 2.00 GiB")
        return real(logits, y, **kw)

    monkeypatch.setattr(engine.F, "cross_entropy", ce)


def test_out_of_memory_in_a_step_halves_the_batch_and_training_goes_on(data: Path, tmp_path: Path, monkeypatch):
    _oom_above(monkeypatch, 8)
    run = bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), **TINY)  # batch 16
    ooms = [e for e in _events(run.dir) if e["event"] == "out_of_memory"]
    assert [(e["batch_size_before"], e["batch_size"], e["to_epoch"]) for e in ooms] == [(16, 8, 0)]
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [(m["epoch"], m["batch_size"]) for m in metrics] == [(1, 8), (2, 8)]
    monkeypatch.undo()  # memory is plentiful again: a resumed run keeps the halved batch all the same
    more = bonsai.fit(None, resume=run.dir, epochs=3)
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert more.summary["epochs"] == 3 and metrics[-1]["batch_size"] == 8
    assert len([e for e in _events(run.dir) if e["event"] == "out_of_memory"]) == 1


def test_the_cpu_allocator_s_out_of_memory_error_is_handled_too(data: Path, tmp_path: Path, monkeypatch):
    import bonsai.train.engine as engine

    real = engine.F.cross_entropy

    def ce(logits, y, **kw):
        if len(y) > 8:
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:121] data. DefaultCPUAllocator: not enough memory: you tried to allocate 2147483648 bytes.")
        return real(logits, y, **kw)

    monkeypatch.setattr(engine.F, "cross_entropy", ce)
    run = bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)
    assert [e["batch_size"] for e in _events(run.dir) if e["event"] == "out_of_memory"] == [8]


def test_other_runtime_errors_are_not_taken_for_out_of_memory(data: Path, tmp_path: Path, monkeypatch):
    import bonsai.train.engine as engine

    def ce(logits, y, **kw):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(engine.F, "cross_entropy", ce)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)


def test_out_of_memory_while_evaluating_halves_the_evaluation_batch(data: Path, tmp_path: Path, monkeypatch, caplog):
    import bonsai.train.engine as engine

    real = engine.predict_views
    seen = []

    def predict(model, loader, dtype, tta=False, shift=0):
        seen.append(loader.batch_size)
        if loader.batch_size > 16:
            raise torch.OutOfMemoryError("simulated")
        return real(model, loader, dtype, tta, shift)

    monkeypatch.setattr(engine, "predict_views", predict)
    run = bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)  # eval_batch_size 64
    assert seen[:3] == [64, 32, 16] and run.summary["val_acc"] is not None
    assert "evaluation batch halved to 16" in caplog.text


def test_out_of_memory_at_batch_one_is_a_clear_error(data: Path, tmp_path: Path, monkeypatch):
    _oom_above(monkeypatch, None)
    with pytest.raises(BonsaiError, match="out of memory in a training step even at batch size 1"):
        bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)
    sizes = [e["batch_size"] for e in _events(tmp_path / "r") if e["event"] == "out_of_memory"]
    assert sizes == [8, 4, 2, 1]


def test_the_batch_is_chosen_to_fit_the_memory_available(data: Path, tmp_path: Path, monkeypatch):
    import bonsai.api as api
    from bonsai.models.arch import preset
    from bonsai.models.resnet import build, count_params
    from bonsai.train.resources import MEMORY_SHARE, fit_batch, train_memory_bytes

    spec = preset("resnet8", 3, 3, 16)
    params = count_params(build(spec))
    room = int(train_memory_bytes(spec, 8, False, params) / MEMORY_SHARE) + 1  # batch 8 fits, 16 does not
    assert fit_batch(spec, 256, False, params, room) == 8
    assert fit_batch(spec, 256, False, params, 10**6) == 1  # nothing fits: still a batch of one
    assert fit_batch(spec, 16, False, params, 10**15) == 16
    monkeypatch.setattr(api, "available_memory", lambda device: room)
    run = bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)  # batch 16 asked for
    capped = [e for e in _events(run.dir) if e["event"] == "batch_capped"]
    assert [(e["batch_size_wanted"], e["batch_size"]) for e in capped] == [(16, 8)]
    assert json.loads((run.dir / "metrics.jsonl").read_text().splitlines()[0])["batch_size"] == 8


def test_too_little_disk_space_is_refused_before_training(data: Path, tmp_path: Path, monkeypatch):
    import shutil

    import bonsai.train.resources as resources

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(resources.shutil, "disk_usage", lambda p: usage._replace(free=2**20))
    with pytest.raises(BonsaiError, match=r"only 1 MB free on its disk, and the run needs about \d+ MB"):
        bonsai.fit(data, epochs=1, out=str(tmp_path / "r"), **TINY)
    assert not (tmp_path / "r" / "checkpoint.safetensors").exists()
