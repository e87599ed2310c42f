"""fit -> run directory -> load -> predict, resume after SIGKILL, and seeded determinism."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import bonsai
from bonsai.errors import BonsaiError
from conftest import CLASSES, make_images, signal_after_epochs

# tiny and fast: resnet8 at 16x16, fp32 so that results do not depend on the CPU's bf16 support
TINY = dict(arch="resnet8", batch_size=16, eval_batch_size=64, quiet=True, precision="fp32")


def test_fit_writes_a_self_describing_run_directory(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, epochs=3, out=str(tmp_path / "run"), low_res=1.0, **(TINY | {"batch_size": 8}))
    d = run.dir
    for name in ("config.yaml", "dataset.json", "metrics.jsonl", "events.jsonl", "arch.json", "model.safetensors", "checkpoint.safetensors", "predictions.csv", "summary.json"):
        assert (d / name).is_file(), name
    lines = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for key in ("train_time_s", "train_loss", "train_acc", "val_acc", "test_acc", "lr", "batch_size", "flops_per_image", "params", "train_flops", "widths"):
        assert key in lines[-1], key
    assert lines[0]["train_time_s"] < lines[1]["train_time_s"] < lines[2]["train_time_s"]
    # 54 training images (6 held out) at batch 8: 6 steps per epoch, 3 epochs, 3 x forward FLOPs per image
    assert lines[2]["train_flops"] == pytest.approx(3 * lines[0]["flops_per_image"] * 8 * 6 * 3)
    cfg = bonsai.config.load_yaml(d / "config.yaml")
    assert cfg.train.epochs == 3 and cfg.model.arch == "resnet8" and cfg.data.path == str(npz_data.resolve())
    assert json.loads((d / "dataset.json").read_text())["classes"] == CLASSES
    # the coloured bands are easy: far better than chance (1/3) on the held-out test images
    assert run.summary["test_acc"] > 0.6


def test_a_capped_holdout_trains_on_the_images_it_frees(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "run"), low_res=1.0, **(TINY | {"data.val_max": 3}))
    meta = json.loads((run.dir / "dataset.json").read_text())
    assert (meta["val_images"], meta["train_images_used"]) == (3, 57)  # one per class instead of 10% (two)
    assert bonsai.config.load_yaml(run.dir / "config.yaml").data.val_max == 3


def test_under_a_budget_the_holdout_is_capped_by_budget_val_max(npz_data: Path, tmp_path: Path):
    """Validation runs on the budget clock, so a budget caps the holdout (data.budget_val_max; 2,000 by default,
    above this dataset's 10%); without a budget the same setting leaves val_fraction alone."""
    kw = TINY | {"data.budget_val_max": 3}
    timed = bonsai.fit(npz_data, budget="2s", out=str(tmp_path / "timed"), low_res=1.0, **kw)
    fixed = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "fixed"), low_res=1.0, **kw)
    meta = [json.loads((r.dir / "dataset.json").read_text()) for r in (timed, fixed)]
    assert [(m["val_images"], m["train_images_used"]) for m in meta] == [(3, 57), (6, 54)]
    # bonsai compress reads the run's split again from its config.yaml: the same 3 images
    from bonsai.compress.pipeline import _data

    assert len(_data(timed, None)[2]) == 3
    (timed.dir / "dataset.json").write_text(json.dumps(meta[0] | {"val_images": 4}))
    with pytest.raises(BonsaiError, match="held out 4 validation images, these settings hold out 3"):
        _data(timed, None)


def test_predictions_csv_shape_order_and_content(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "run"), **TINY)
    with open(run.dir / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label", *CLASSES]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(15)]
    probs = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-4)
    assert [r[1] for r in rows[1:]] == [CLASSES[i] for i in probs.argmax(1)]
    # the same numbers come back from the loaded run, fed raw arrays
    xt, _ = make_images(5, seed=1)
    preds = bonsai.load(run.dir).predict(xt)
    np.testing.assert_allclose(preds.probs, probs, atol=2e-4)
    # ... and from an .npz file; a bad one is one error naming it
    np.savez(xt_npz := tmp_path / "new.npz", x_test=xt)
    np.testing.assert_allclose(run.predict(xt_npz).probs, probs, atol=2e-4)
    np.savez(floats := tmp_path / "floats.npz", x_test=xt.astype(np.float32))
    with pytest.raises(BonsaiError, match=r"floats.npz \(x_test\): images must be uint8 pixels"):
        run.predict(floats)
    (html := tmp_path / "page.npz").write_text("<html></html>")
    with pytest.raises(BonsaiError, match=r"page.npz: not an .npz archive \(not a zip file\)"):
        run.predict(html)
    np.savez(empty := tmp_path / "empty.npz", x_test=xt[:0])  # before, a header-only predictions.csv and exit 0
    with pytest.raises(BonsaiError, match=r"empty.npz \(x_test\): no images \(an array of shape \(0, 16, 16, 3\)\)"):
        run.predict(empty)


def test_predict_folder_and_arrays_agree(folder_data: Path, tmp_path: Path):
    run = bonsai.fit(folder_data, epochs=1, out=str(tmp_path / "run"), **TINY)
    by_files = run.predict(folder_data / "test")
    assert by_files.names[0] == "cat_008.png" and len(by_files.names) == 9
    ds = bonsai.data.sources.load_dataset(folder_data)
    by_array = run.predict(ds.test.x.permute(0, 2, 3, 1).numpy())
    np.testing.assert_allclose(by_files.probs, by_array.probs, atol=1e-5)


def test_fit_from_arrays_and_bad_array_input(tmp_path: Path):
    x, y = make_images(10)
    run = bonsai.fit((x, y), epochs=1, out=str(tmp_path / "r"), **TINY)
    assert run.summary["test_acc"] is None and not (run.dir / "predictions.csv").exists()
    with pytest.raises(BonsaiError, match="uint8"):
        run.predict(x.astype(np.float32))


def test_same_seed_same_weights_and_metrics(npz_data: Path, tmp_path: Path):
    a = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "a"), **TINY)
    b = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "b"), **TINY)
    wa, wb = load_file(a.dir / "checkpoint.safetensors"), load_file(b.dir / "checkpoint.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if "time" not in k and k not in ("clock_s", "images_per_s")} for line in p.read_text().splitlines()]  # noqa: E731
    assert strip(a.dir / "metrics.jsonl") == strip(b.dir / "metrics.jsonl")
    c = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "c"), seed=1, **TINY)
    wc = load_file(c.dir / "checkpoint.safetensors")
    assert not torch.equal(wa["model.head.weight"], wc["model.head.weight"])


def test_refuses_to_overwrite_a_run(npz_data: Path, tmp_path: Path):
    bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "r"), **TINY)
    with pytest.raises(BonsaiError, match="already holds a run; use --resume"):
        bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "r"), **TINY)


def test_plateau_stopping(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, patience=1, max_epochs=30, out=str(tmp_path / "r"), **TINY)
    assert run.summary["stop_reason"] == "plateau"
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    # patience 1: the last epoch did not beat the best before it, and every earlier epoch but the first did
    assert len(lines) >= 2 and lines[-1]["val_acc"] <= max(r["val_acc"] for r in lines[:-1]) and len(lines) < 30
    assert all(b["val_acc"] > max(r["val_acc"] for r in lines[:i]) for i, b in enumerate(lines[1:-1], 1))


def test_budget_stops_inside_the_budget(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, budget="3s", out=str(tmp_path / "r"), **TINY)
    assert run.summary["stop_reason"] == "budget"
    assert run.summary["clock_s"] < 3.0 + 1.0  # at most one step or one validation pass past the budget


def _write_resume_data(tmp_path: Path) -> Path:
    x, y = make_images(100)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=x, y_train=y, x_test=x[:10], y_test=y[:10])
    return path


@pytest.mark.parametrize("lookahead", [0.0, 0.9], ids=["plain", "lookahead"])
def test_resume_after_sigkill_ends_with_the_same_weights(tmp_path: Path, lookahead: float):
    data = _write_resume_data(tmp_path)
    # lookahead every 5 of an epoch's 12 steps: the epoch's last step syncs the average
    opts = ["arch=resnet8", "batch_size=8", "precision=fp32", f"lookahead={lookahead}", "--epochs", "4", "--quiet"]
    reference = bonsai.fit(data, epochs=4, out=str(tmp_path / "ref"), arch="resnet8", batch_size=8, precision="fp32", lookahead=lookahead, quiet=True)

    run = tmp_path / "killed"
    # kill as soon as epoch 1 is logged: the process is then checkpointing or inside epoch 2
    proc = signal_after_epochs([str(data), *opts], run, 1, signal.SIGKILL, poll=0.005)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()
    done = len((run / "metrics.jsonl").read_text().splitlines())
    assert done < 4
    # anytime predictions: the killed run already holds the best model's predictions
    with open(run / "predictions.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [r[1] for r in rows] == bonsai.load(run).predict(data, tta=False).labels  # the plain view (see _anytime)

    resumed = bonsai.fit(None, resume=run, quiet=True)
    assert resumed.summary["epochs"] == 4
    a = load_file(reference.dir / "checkpoint.safetensors")
    b = load_file(run / "checkpoint.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [json.loads(x)["epoch"] for x in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_streaming_and_in_memory_training_give_identical_weights(folder_data: Path, tmp_path: Path):
    a = bonsai.fit(folder_data, epochs=2, out=str(tmp_path / "mem"), in_memory="yes", **TINY)
    b = bonsai.fit(folder_data, epochs=2, out=str(tmp_path / "stream"), in_memory="no", **TINY)
    wa, wb = load_file(a.dir / "checkpoint.safetensors"), load_file(b.dir / "checkpoint.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert (a.dir / "predictions.csv").read_text() == (b.dir / "predictions.csv").read_text()


def test_no_validation_possible_is_a_clear_error(tmp_path: Path):
    x, y = make_images(1)  # one image per class
    with pytest.raises(BonsaiError, match="none can be held out for validation"):
        bonsai.fit((x, y), epochs=1, out=str(tmp_path / "r"), **TINY)


def test_divergence_stops_after_the_rollbacks_and_keeps_the_last_good_model(npz_data: Path, tmp_path: Path):
    # the LR warms up from 0: epoch 1 stays finite, later ones blow up, and halving an LR of 1e6 three times won't help
    run = bonsai.fit(npz_data, epochs=4, out=str(tmp_path / "r"), lr=1e6, zero_init_residual=False, **TINY)
    assert run.summary["stop_reason"] == "diverged" and run.summary["epochs"] < 4 and run.summary["best_epoch"] >= 1
    events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    assert [e["lr_scale"] for e in events if e["event"] == "rollback"] == [0.5, 0.25, 0.125]
    lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == list(range(1, run.summary["epochs"] + 1))  # none for an unfinished epoch
    weights = load_file(run.dir / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_resume_refuses_different_data_and_extends_a_finished_run(npz_data: Path, tmp_path: Path):
    run = bonsai.fit(npz_data, epochs=1, out=str(tmp_path / "r"), **TINY)
    x, y = make_images(20, seed=5)
    other = tmp_path / "other.npz"
    np.savez(other, x_train=x, y_train=y)
    with pytest.raises(BonsaiError, match="dataset differs"):
        bonsai.fit(other, resume=run.dir)
    # dataset.json damaged by hand: the data cannot be checked, so the run is not resumed
    meta = (run.dir / "dataset.json").read_text()
    (run.dir / "dataset.json").write_text("{not json")
    with pytest.raises(BonsaiError, match="dataset.json: damaged"):
        bonsai.fit(other, resume=run.dir)
    # dataset.json gone: the checkpoint's network still tells two classes from three, before anything is rewritten
    (run.dir / "dataset.json").unlink()
    config = (run.dir / "config.yaml").read_text()
    x2, y2 = make_images(10, seed=5, n_classes=2)
    np.savez(two := tmp_path / "two.npz", x_train=x2, y_train=y2)
    with pytest.raises(BonsaiError, match="3 classes and 3 channels; the data has 2 and 3: cannot resume on it"):
        bonsai.fit(two, resume=run.dir)
    assert not (run.dir / "dataset.json").exists() and (run.dir / "config.yaml").read_text() == config
    (run.dir / "dataset.json").write_text(meta)
    # another holdout (here a budget added on resume, which caps it) would validate on images the run trained on
    with pytest.raises(BonsaiError, match="held out 6 validation images, these settings hold out 3"):
        bonsai.fit(None, resume=run.dir, budget="1m", **{"data.budget_val_max": 3})
    assert (run.dir / "config.yaml").read_text() == config
    # as many images, other ones: another seed draws another split
    with pytest.raises(BonsaiError, match="another validation split than the run's"):
        bonsai.fit(None, resume=run.dir, seed=7)
    # the same names and labels over other pixels: an array's names are row numbers, its statistics differ
    data = dict(np.load(npz_data))
    np.savez(repainted := tmp_path / "repainted.npz", **(data | {"x_train": 255 - data["x_train"]}))
    with pytest.raises(BonsaiError, match="pixels' mean changed"):
        bonsai.fit(repainted, resume=run.dir)
    assert (run.dir / "config.yaml").read_text() == config
    more = bonsai.fit(None, resume=run.dir, epochs=2)
    assert more.summary["epochs"] == 2
    assert [json.loads(x)["epoch"] for x in (run.dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_under_torchrun_only_rank_0_decodes_the_whitening_sample_and_the_others_take_its_filters(monkeypatch):
    from types import SimpleNamespace

    from bonsai import api
    from bonsai.models.arch import preset
    from bonsai.models.resnet import build

    x = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    ds = SimpleNamespace(image_size=16, channels=3)
    sent = []

    class Rank:
        def __init__(self, rank: int):
            self.main, self.on = rank == 0, True

        def broadcast_json(self, obj):  # rank 0's object, as plain JSON carries it, on every rank
            if self.main:
                sent.append(json.loads(json.dumps(obj)))
            return sent[-1]

    monkeypatch.setattr(api, "sample_images", lambda *a: x)
    torch.manual_seed(0)
    rank0 = build(preset("resnet8", 3, 3, 16))
    assert api._whiten_stem(rank0, None, ds, 0, Rank(0)) == 16

    def no_decoding(*a):
        raise AssertionError("rank 1 decoded the sample")

    monkeypatch.setattr(api, "sample_images", no_decoding)
    torch.manual_seed(1)  # another random init: the filters must come from rank 0, bit for bit
    rank1 = build(preset("resnet8", 3, 3, 16))
    assert not torch.equal(rank1.stem[0].weight, rank0.stem[0].weight)
    assert api._whiten_stem(rank1, None, ds, 0, Rank(1)) == 16
    assert torch.equal(rank1.stem[0].weight, rank0.stem[0].weight)


@pytest.mark.parametrize("source", ["npz", "folder"])
def test_fit_whitens_the_stem_and_alternates_flips_when_asked(source: str, npz_data: Path, folder_data: Path, tmp_path: Path, monkeypatch):
    from bonsai.data import loader as loader_mod

    masks = []
    real = loader_mod.alternating_flips
    monkeypatch.setattr(loader_mod, "alternating_flips", lambda *a: masks.append(real(*a)) or masks[-1])
    data = npz_data if source == "npz" else folder_data
    run = bonsai.fit(data, epochs=2, out=str(tmp_path / "r"), whiten_stem=True, alternate_flip=True, **TINY)
    events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "whiten_stem"] == [{"event": "whiten_stem", "epoch": 0, "filters": 16}]
    assert masks  # the loader flipped by the alternating rule
    plain = bonsai.fit(data, epochs=2, out=str(tmp_path / "p"), **TINY)
    assert not any(json.loads(x)["event"] == "whiten_stem" for x in (plain.dir / "events.jsonl").read_text().splitlines())


def test_anytime_predictions_are_the_plain_view_and_cost_the_clock_with_or_without_a_per_epoch_test_pass(npz_data: Path, tmp_path: Path, monkeypatch):
    """A run with test labels reuses its per-epoch test pass for the anytime predictions and is charged for them
    on the budget clock; one without the pass predicts the test set on the clock. Either way the interim
    predictions are the same numbers (the best model's plain view) and every improving epoch records their cost."""
    import bonsai.train.engine as engine
    from bonsai.api import Predictions
    from bonsai.train.schedule import Clock

    written, charged = [], []
    real_to_csv, real_charge, real_views = Predictions.to_csv, Clock.charge, engine.predict_views
    monkeypatch.setattr(Predictions, "to_csv", lambda self, path: written.append(self.probs.copy()) or real_to_csv(self, path))
    monkeypatch.setattr(Clock, "charge", lambda self, s: charged.append(s) or real_charge(self, s))
    # the plain view's time, made unmistakable: what a reused test pass must charge, and the clock must show
    monkeypatch.setattr(engine, "predict_views", lambda *a, **k: real_views(*a, **k)._replace(plain_s=7.0))
    runs = {}
    for each in (True, False):
        written.clear(), charged.clear()
        run = bonsai.fit(npz_data, epochs=4, out=str(tmp_path / f"each{each}"), test_each_epoch=each, **TINY)
        lines = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
        best = [r for r in lines if r["val_acc"] > max([-1.0] + [q["val_acc"] for q in lines if q["epoch"] < r["epoch"]])]
        assert [r["epoch"] for r in lines if r["anytime_s"] is not None] == [r["epoch"] for r in best] and best
        assert len(written) == len(best) + 1  # one per improvement, then the final predictions with every view
        if each:  # the reused pass's plain-view time is charged, and is on the clock's record of each improving epoch
            assert charged == [7.0] * len(best) and all(7.0 <= r["anytime_s"] < 8.0 for r in best)
        else:  # predicted on the clock: its own time (a few milliseconds here), nothing charged
            assert charged == [] and all(r["anytime_s"] < 7.0 for r in best)
        runs[each] = (written[:-1], written[-1], load_file(run.dir / "model.safetensors"))
    (interim_a, final_a, model_a), (interim_b, final_b, model_b) = runs[True], runs[False]
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)  # the test pass does not steer training
    assert len(interim_a) == len(interim_b) and all(np.allclose(a, b, atol=1e-6) for a, b in zip(interim_a, interim_b))
    plain = bonsai.load(tmp_path / "eachTrue").predict(np.load(npz_data)["x_test"], tta=False).probs  # the best model's
    assert np.allclose(interim_a[-1], plain, atol=1e-5)
    assert np.allclose(final_a, final_b, atol=1e-6) and not np.allclose(interim_a[-1], final_a, atol=1e-5)  # the final one has the views
