"""The time-to-accuracy pieces: progressive resizing, test-time augmentation, the budget planner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import bonsai
from bonsai.data.augment import resize_batch, shift_batch
from bonsai.data.loader import Loader
from bonsai.data.sources import Split
from bonsai.models.arch import ArchSpec, preset
from bonsai.models.resnet import build, load_model
from bonsai.report.log import read_jsonl
from bonsai.train.engine import predict_probs, predict_views
from bonsai.train.plan import expected_epochs, plan_arch, required_epochs, scaled
from bonsai.train.schedule import train_size


def test_train_size_grows_in_steps_of_four_then_stays_full():
    sizes = [train_size(p / 100, 32, 0.5, 0.5) for p in range(101)]
    assert sizes[0] == 16 and sizes[49] < 32 and all(s == 32 for s in sizes[50:])
    assert all(b >= a for a, b in zip(sizes, sizes[1:])), "the size never shrinks"
    assert all(s % 4 == 0 for s in sizes)
    assert {train_size(p / 10, 32, 1.0, 0.5) for p in range(11)} == {32}, "low_res=1 is off"
    assert train_size(0.0, 12, 0.5, 0.5) == 8, "never below 8 pixels"
    assert train_size(0.0, 28, 0.5, 0.5) == 12


def test_resize_batch_keeps_mean_and_memory_format():
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    y = resize_batch(x, 16)
    assert y.shape == (4, 3, 16, 16) and y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.mean(dim=(2, 3)), x.float().mean(dim=(2, 3)), atol=1.0, rtol=0)
    flat = torch.full((1, 3, 32, 32), 200, dtype=torch.uint8)
    torch.testing.assert_close(resize_batch(flat, 20), torch.full((1, 3, 20, 20), 200.0))
    assert resize_batch(x, 32) is x


def test_tta_averages_an_image_and_its_mirror():
    torch.manual_seed(0)
    model = build(ArchSpec.resnet((16,), 1, num_classes=3), zero_init_residual=False)
    with torch.no_grad():  # BN statistics that are not the identity, so a mirror changes the outputs
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    loader = Loader(Split(names=[str(i) for i in range(6)], y=None, x=x), 4, torch.device("cpu"), size=16, channels=3)
    mirrored = Loader(Split(names=[str(i) for i in range(6)], y=None, x=x.flip(3).contiguous()), 4, torch.device("cpu"), size=16, channels=3)
    plain, flipped = predict_probs(model, loader, None), predict_probs(model, mirrored, None)
    assert not torch.allclose(plain, flipped, atol=1e-4)
    torch.testing.assert_close(predict_probs(model, loader, None, tta=True), (plain + flipped) / 2)
    # the plain view comes with the views for free (the anytime predictions take it from the per-epoch test pass)
    for tta, shift in ((True, 0), (True, 1), (False, 1)):
        v = predict_views(model, loader, None, tta, shift)
        torch.testing.assert_close(v.probs, predict_probs(model, loader, None, tta, shift))
        torch.testing.assert_close(v.plain, plain)
        assert not torch.allclose(v.probs, plain, atol=1e-4) and v.plain_s > 0


def test_shift_batch_is_a_zero_filled_crop_of_the_padded_image():
    x = torch.randint(1, 256, (3, 2, 7, 9), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for dy, dx in ((1, 1), (-1, -1), (2, -1), (0, 0), (-2, 2)):
        # shifting down-right by (dy, dx) is the crop of the padded image starting at (2 - dy, 2 - dx)
        torch.testing.assert_close(shift_batch(x, dy, dx), padded[..., 2 - dy : 9 - dy, 2 - dx : 11 - dx])
    assert shift_batch(x, 1, 1).is_contiguous(memory_format=torch.channels_last)
    assert int(shift_batch(x, 7, 0).sum()) == 0, "shifted out entirely: nothing left"


def test_tta_shift_averages_the_shifted_views_half_and_half():
    torch.manual_seed(0)
    model = build(ArchSpec.resnet((16,), 1, num_classes=3), zero_init_residual=False)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)

    def probs(images: torch.Tensor, tta: bool, shift: int = 0) -> torch.Tensor:
        split = Split(names=[str(i) for i in range(len(images))], y=None, x=images.contiguous())
        return predict_probs(model, Loader(split, 4, torch.device("cpu"), size=16, channels=3), None, tta, shift)

    for tta in (False, True):
        want = 0.5 * probs(x, tta) + 0.25 * (probs(shift_batch(x, 2, 2), tta) + probs(shift_batch(x, -2, -2), tta))
        got = probs(x, tta, shift=2)
        torch.testing.assert_close(got, want)
        assert not torch.allclose(got, probs(x, tta), atol=1e-4), "the shifted views change the prediction"


def test_the_planner_asks_for_enough_epochs_to_see_plan_images_images():
    assert required_epochs(32, 1e6, 50_000) == pytest.approx(20)
    assert required_epochs(32, 1e6, 1_000) == 32, "small datasets: plan_epochs caps it"
    assert required_epochs(32, 1e6, 10_000_000) == 1, "large datasets: at least one epoch"
    assert required_epochs(32, 2e6, 50_000) > required_epochs(32, 1e6, 50_000)


def test_fit_hands_the_planner_the_required_epochs(npz_data: Path, tmp_path: Path, monkeypatch):
    import bonsai.api as api_mod

    class Planned(Exception):
        pass

    seen = []

    def plan_arch(*args, **kwargs):
        seen.append(args[-1])
        raise Planned

    monkeypatch.setattr(api_mod, "plan_arch", plan_arch)
    for images, want in (("1", 1.0), ("1M", 32)):  # one image: at least one epoch; a million: plan_epochs caps it
        with pytest.raises(Planned):
            bonsai.fit(npz_data, budget="20s", out=str(tmp_path / images), quiet=True, plan_images=images)
        assert seen[-1] == want


def test_model_pool_pools_the_planned_network_by_default_and_a_named_preset_when_asked(npz_data: Path, tmp_path: Path, monkeypatch):
    import bonsai.api as api_mod

    class Planned(Exception):
        pass

    bases = []

    def plan_arch(base, *args, **kwargs):
        bases.append(base)
        raise Planned

    monkeypatch.setattr(api_mod, "plan_arch", plan_arch)
    for pool in (False, True, None):  # None (the default): pooled for the planned network
        with pytest.raises(Planned):
            bonsai.fit(npz_data, budget="20s", out=str(tmp_path / f"auto{pool}"), quiet=True, pool=pool)
    strided, pooled_ = [False] * 3, [s.stride == 2 for s in bases[1].stages]
    assert [[s.pool for s in b.stages] for b in bases] == [strided, pooled_, pooled_] and any(pooled_)
    kw = dict(epochs=1, arch="resnet8", batch_size=16, precision="fp32", quiet=True)
    run = bonsai.fit(npz_data, pool=True, out=str(tmp_path / "r"), **kw)
    assert [s["pool"] for s in json.loads((run.dir / "arch.json").read_text())["stages"]] == [False, True, True]
    assert [b.pool for s in load_model(run.dir).stages for b in s] == [False, True, True]
    named = bonsai.fit(npz_data, out=str(tmp_path / "n"), **kw)  # a named preset stays as published by default
    assert not any(b.pool for s in load_model(named.dir).stages for b in s)


def test_lookahead_moves_weights_and_statistics_to_their_running_average():
    from bonsai.train.engine import lookahead_, lookahead_state

    model = build(preset("resnet8"))
    pairs = lookahead_state(model)
    assert len(pairs) == sum(t.is_floating_point() for t in model.state_dict().values())
    start = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model.stem[1].running_mean.add_(2.0)
    lookahead_(pairs, 0.75)  # a quarter of the way from the average (the start) to the moved weights
    now = model.state_dict()
    torch.testing.assert_close(now["stem.0.weight"], start["stem.0.weight"] + 0.25)
    torch.testing.assert_close(now["stem.1.running_mean"], start["stem.1.running_mean"] + 0.5)
    assert torch.equal(now["stem.1.num_batches_tracked"], start["stem.1.num_batches_tracked"])
    lookahead_(pairs, 0.0)  # no averaging: the weights stay where they are
    torch.testing.assert_close(now["stem.0.weight"], start["stem.0.weight"] + 0.25)
    with torch.no_grad():
        model.head.weight.add_(4.0)
    lookahead_(pairs, 1.0)  # all average: back to the last synced weights
    torch.testing.assert_close(model.head.weight, start["head.weight"] + 0.25)


def test_fit_averages_every_few_steps_and_at_each_epochs_end(npz_data: Path, tmp_path: Path, monkeypatch):
    from bonsai.train import engine as engine_mod

    decays = []
    real = engine_mod.lookahead_
    monkeypatch.setattr(engine_mod, "lookahead_", lambda pairs, d: decays.append(d) or real(pairs, d))
    kw = dict(epochs=2, arch="resnet8", batch_size=8, precision="fp32", quiet=True, low_res=1.0)
    run = bonsai.fit(npz_data, out=str(tmp_path / "la"), lookahead=0.9, lookahead_every=4, **kw)
    # 6 steps per epoch: after step 4, then the epoch's last step (off the 4-step grid) syncs
    assert len(decays) == 4 and decays == sorted(decays) and 0 < decays[-1] <= 0.9**4
    plain = bonsai.fit(npz_data, out=str(tmp_path / "plain"), **kw)
    assert len(decays) == 4  # off: never called
    a, b = load_model(run.dir).state_dict(), load_model(plain.dir).state_dict()
    assert not torch.equal(a["head.weight"], b["head.weight"])


def test_tta_views_and_the_shift_need_tta_and_a_training_translation():
    from bonsai.config import FitConfig
    from bonsai.train.engine import tta_views

    assert (tta_views(False, 0), tta_views(True, 0), tta_views(False, 1), tta_views(True, 2)) == (1, 2, 3, 6)
    cfg = FitConfig()
    assert cfg.tta_shift(32) == 1
    cfg.augment.translate = 0
    assert cfg.tta_shift(32) == 0, "no shifted views for a model trained without translations"
    assert cfg.tta_shift(32, tta=True) == 0
    cfg.augment.translate, cfg.train.tta = None, False
    assert cfg.tta_shift(32) == 0 and cfg.augment.pixels(32) == 4
    assert cfg.tta_shift(32, tta=True) == 1, "the shift asked for explicitly: the run's own, as it translated"


def test_scaled_widths_are_multiples_of_16_and_never_below():
    base = preset("bonsai")
    for mult in (0.25, 0.5, 0.75, 1.0, 1.5, 2.0):
        w = scaled(base, mult).widths()
        assert all(x % 16 == 0 and x >= 16 for x in w)
    assert scaled(base, 1.0).widths() == base.widths()
    assert scaled(base, 2.0).widths() == [2 * x for x in base.widths()]


def test_expected_epochs_credits_progressive_resizing():
    plain = expected_epochs(600, 1000, 50_000, 1.0, 0.5)
    assert plain == pytest.approx(12.0)
    assert expected_epochs(600, 1000, 50_000, 0.5, 0.5) == pytest.approx(18.0)  # half the time at 2x the pace
    assert expected_epochs(600, 1000, 50_000, 0.5, 0.0) == pytest.approx(plain)


def test_the_probe_takes_its_fastest_timed_step(monkeypatch):
    """A step slowed by another process on the host must not slow the probe's pace: of the warm-up (1 s, not
    counted) and three timed steps of 0.5, 0.1 and 0.3 s, the pace is the 0.1 s step's (a mean would be 0.3 s's)."""
    from types import SimpleNamespace

    import bonsai.train.plan as plan_mod

    ticks = iter([0.0, 1.0, 1.0, 1.5, 1.5, 1.6, 1.6, 1.9])
    monkeypatch.setattr(plan_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    spec = preset("resnet8", num_classes=3, image_size=8)
    assert plan_mod.measure_pace(spec, 4, torch.device("cpu"), None, False, steps=3) == pytest.approx(4 / 0.1)
    assert next(ticks, None) is None, "one warm-up and three timed steps, two clock reads each"


def test_planner_takes_the_widest_candidate_that_fits_the_epochs():
    base = preset("bonsai")
    probed = []

    def pace(spec, batch, device, dtype, channels_last):  # images/s falling with FLOPs, like a real machine
        probed.append(spec.name)
        return 1e11 / sum(w * w for w in spec.widths())

    def plan(budget, min_epochs):
        probed.clear()
        return plan_arch(base, 1000, budget, 64, torch.device("cpu"), None, True, 1.0, 0.5, min_epochs, pace=pace)

    rate = {m: pace(scaled(base, m), 0, 0, 0, 0) for m in (0.5, 0.75, 1.0, 1.5, 2.0)}
    budget = 16 * 1000 / rate[1.0] * 1.01  # just enough for 16 epochs of the 1x network
    p = plan(budget, 16)
    assert p.multiplier == 1.0 and p.expected_epochs >= 16
    assert probed == ["bonsaix0.5", "bonsaix0.75", "bonsai", "bonsaix1.5"], "probing stops at the first that is too slow"
    assert [c["multiplier"] for c in p.candidates] == [0.5, 0.75, 1.0, 1.5]
    assert plan(budget * 100, 16).multiplier == 2.0
    tiny = plan(1e-3, 16)
    assert tiny.multiplier == 0.5 and probed == ["bonsaix0.5"], "none fits: the narrowest, without probing more"


def test_budget_fit_plans_the_network_and_trains_at_growing_sizes(npz_data: Path, tmp_path: Path):
    out = tmp_path / "run"  # adapt.on=false (--no-adapt): the planner's pick trains as it is
    run = bonsai.fit(npz_data, budget="20s", out=str(out), quiet=True, plan_epochs=4, low_res=0.5, low_res_share=0.5, **{"adapt.on": False})
    events = read_jsonl(out / "events.jsonl")
    assert events[0]["event"] == "plan" and events[0]["widths"] == run.model.spec.widths()
    assert events[0]["required_epochs"] == 4, "a tiny dataset: plan_epochs caps the epochs that plan_images asks for"
    assert events[0]["candidates"] and all(c["images_per_s"] > 0 for c in events[0]["candidates"])
    sizes = [r["train_image_size"] for r in read_jsonl(out / "metrics.jsonl")]
    assert sizes[-1] == 16 and min(sizes) < 16, sizes
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] is True and summary["train_gflops_per_s"] > 0


def test_low_res_costs_fewer_flops_and_fixed_arch_is_not_planned(npz_data: Path, tmp_path: Path):
    full = bonsai.fit(npz_data, epochs=4, arch="resnet8", low_res=1.0, out=str(tmp_path / "a"), quiet=True)
    low = bonsai.fit(npz_data, epochs=4, arch="resnet8", low_res=0.5, low_res_share=0.5, out=str(tmp_path / "b"), quiet=True)
    assert low.summary["train_flops"] < 0.9 * full.summary["train_flops"]
    assert not [e for e in read_jsonl(tmp_path / "b" / "events.jsonl") if e.get("event") == "plan"]


def test_run_predict_uses_the_runs_tta_setting(npz_data: Path, tmp_path: Path):
    import numpy as np

    run = bonsai.fit(npz_data, epochs=2, arch="resnet8", out=str(tmp_path / "r"), quiet=True)
    assert run.tta
    x = np.load(npz_data)["x_test"]
    with_tta, without = run.predict(x), run.predict(x, tta=False)
    assert not np.allclose(with_tta.probs, without.probs)
    # the final predictions add the one-pixel shifts to the mirror; the summary's accuracies are with them too
    assert run.tta_shift == 1 and run.summary["tta_shift"] == 1
    mirror_only = run.predict(x, tta_shift=0)
    assert not np.allclose(with_tta.probs, mirror_only.probs)
    np.testing.assert_allclose(run.predict(x, tta=True, tta_shift=1).probs, with_tta.probs)
    y = np.load(npz_data)["y_test"]
    assert run.summary["test_acc"] == pytest.approx(float((with_tta.probs.argmax(1) == y).mean()))
    assert "best_epoch_val_acc" in run.summary and 0 <= run.summary["val_acc"] <= 1
    # predictions.csv holds what the run predicts by default
    lines = (tmp_path / "r" / "predictions.csv").read_text().splitlines()[1:]
    first = [float(v) for v in lines[0].split(",")[2:]]
    np.testing.assert_allclose(first, with_tta.probs[0], atol=2e-6)
    off = bonsai.fit(npz_data, epochs=1, arch="resnet8", out=str(tmp_path / "s"), quiet=True, flip=False)
    assert not off.tta, "no mirrored predictions for data trained without flips"
    plain = bonsai.fit(npz_data, epochs=1, arch="resnet8", out=str(tmp_path / "t"), quiet=True, tta=False)
    assert not plain.tta and plain.tta_shift == 0
    # asked explicitly, a run trained without TTA predicts with the mirror and the default shifts
    np.testing.assert_allclose(plain.predict(x, tta=True).probs, plain.predict(x, tta=True, tta_shift=1).probs)
    assert not np.allclose(plain.predict(x, tta=True).probs, plain.predict(x, tta=True, tta_shift=0).probs)


def test_the_planners_probes_do_not_change_the_seeded_start(npz_data: Path, tmp_path: Path, monkeypatch):
    import bonsai.api as api_mod
    import bonsai.train.plan as plan_mod

    starts = []

    class Stop(Exception):
        pass

    class Capture:
        def __init__(self, model, *a, **k):
            starts.append({k: v.clone() for k, v in model.state_dict().items()})
            raise Stop

    monkeypatch.setattr(api_mod, "Engine", Capture)
    for draws in (1, 5):  # probes that consume different amounts of randomness
        def pace(spec, *a, draws=draws):
            torch.rand(draws)
            return 1e6
        monkeypatch.setattr(plan_mod, "measure_pace", pace)
        monkeypatch.setattr(api_mod, "plan_arch", lambda *a, **k: plan_mod.plan_arch(*a, **k, pace=pace))
        with pytest.raises(Stop):
            bonsai.fit(npz_data, budget="1m", out=str(tmp_path / f"r{draws}"), quiet=True)
    assert starts[0].keys() == starts[1].keys()
    assert all(torch.equal(starts[0][k], starts[1][k]) for k in starts[0])


def test_patience_alone_trains_at_full_size(npz_data: Path, tmp_path: Path):
    bonsai.fit(npz_data, patience=1, max_epochs=3, arch="resnet8", low_res=0.5, out=str(tmp_path / "p"), quiet=True)
    assert {r["train_image_size"] for r in read_jsonl(tmp_path / "p" / "metrics.jsonl")} == {16}


def test_a_run_written_before_low_res_and_tta_keeps_training_and_predicting_without_them(tmp_path: Path):
    import yaml

    from bonsai.config import FitConfig, load_yaml, save_yaml

    path = tmp_path / "config.yaml"
    save_yaml(FitConfig(), path)
    d = yaml.safe_load(path.read_text())
    del d["train"]["low_res"], d["train"]["tta"], d["train"]["tta_shift"]
    path.write_text(yaml.safe_dump(d))
    old = load_yaml(path, run=True)
    assert old.train.low_res == 1.0 and old.train.tta is False and old.train.tta_shift == 0
    fresh = load_yaml(path)  # a user's config file: missing keys take today's defaults
    assert fresh.train.low_res == 0.5 and fresh.train.tta is True and fresh.train.tta_shift == 1
