"""The adaptive controller's rule on scripted signals: each documented branch, and its order."""

from __future__ import annotations

from bonsai.train.controller import Rule, Signals, decide, plateaued

RISING = [0.30, 0.45, 0.55, 0.62, 0.66]
FLAT = [0.30, 0.50, 0.60, 0.601, 0.600]


def sig(**kw) -> Signals:
    base = dict(val_acc=FLAT, train_acc=[v + 0.02 for v in FLAT], pruned_share=[0.2, 0.2, 0.2], flops=40e6, left=0.6)
    return Signals(**(base | kw))


def test_plateau_detection():
    assert not plateaued(RISING, 2, 0.002)
    assert plateaued(FLAT, 2, 0.002)
    assert not plateaued(FLAT[:2], 2, 0.002)  # too short to tell
    assert not plateaued([0.5, 0.5, 0.51], 1, 0.002)  # +1 point in the last epoch


def test_over_the_flop_target_prunes_before_anything_else():
    d = decide(sig(val_acc=RISING, flops=50e6, target_flops=40e6))
    assert d.action == "prune" and "above the target" in d.reason
    assert decide(sig(val_acc=RISING, flops=40.5e6, target_flops=40e6)).action == "continue"  # within 2%


def test_improving_continues():
    assert decide(sig(val_acc=RISING, pruned_share=[0.0, 0.0, 0.0])).action == "continue"


def test_plateau_near_the_end_stops():
    d = decide(sig(left=0.1, pruned_share=[0.0, 0.0, 0.0]))
    assert d.action == "stop" and "too little" in d.reason


def test_overfitting_prunes():
    d = decide(sig(train_acc=[0.9] * 5))
    assert d.action == "prune" and "capacity" in d.reason


def test_the_gap_is_not_read_from_a_low_resolution_epoch():
    """A network trained at low resolution validates worse at full size: that is no overfitting."""
    assert decide(sig(train_acc=[0.9] * len(FLAT))).action == "prune"  # 30 points above validation
    d = decide(sig(train_acc=[0.9] * (len(FLAT) - 1) + [None], pruned_share=[0.2, 0.2, 0.2]))
    assert d.action == "deepen"  # the rule after the gap's: every stage pruned, so width to spare


def test_a_plateau_without_recent_pruning_prunes_to_measure():
    d = decide(sig(pruned_share=None))
    assert d.action == "prune" and "penalty has not run through" in d.reason
    assert decide(sig(val_acc=RISING, pruned_share=None)).action == "continue"
    # with no growth left, there is nothing a measurement could lead to
    d = decide(sig(pruned_share=None, growths=3))
    assert d.action == "stop" and "no more growth" in d.reason


def test_stages_pruning_left_whole_are_widened():
    d = decide(sig(pruned_share=[0.3, 0.01, 0.0]))
    assert d.action == "widen" and d.stages == [1, 2]


def test_width_to_spare_everywhere_deepens_the_least_pruned_stage():
    d = decide(sig(pruned_share=[0.3, 0.1, 0.25]))
    assert d.action == "deepen" and d.stages == [1]


def test_growth_respects_the_flop_target_and_the_growth_cap():
    assert decide(sig(pruned_share=[0.0, 0.0, 0.0], flops=30e6, target_flops=40e6)).action == "stop"  # x2.25 > target
    assert decide(sig(pruned_share=[0.0, 0.0, 0.0], flops=15e6, target_flops=40e6)).action == "widen"
    d = decide(sig(pruned_share=[0.0, 0.0, 0.0], growths=3))
    assert d.action == "stop" and "no more growth" in d.reason
    assert decide(sig(pruned_share=[0.0, 0.0, 0.0], growths=3), Rule(max_growths=4)).action == "widen"
    assert decide(sig(pruned_share=[0.0, 0.0, 0.0]), Rule(plateau_epochs=3)).action == "continue"  # 3 flat epochs needed


def test_well_under_the_target_in_the_sizing_phase_grows_every_stage_to_it():
    d = decide(sig(val_acc=[0.3], flops=10e6, target_flops=40e6, sizing=True))
    assert d.action == "widen" and d.to_target and d.stages == [0, 1, 2] and d.event()["to_target"]
    # not in the sizing phase: the plateau rules as before (one epoch: too few to judge)
    assert decide(sig(val_acc=[0.3], flops=10e6, target_flops=40e6)).action == "continue"
    # under the target by less than one widening step (x1.5 squared): no growth to it
    assert decide(sig(val_acc=[0.3], flops=20e6, target_flops=40e6, sizing=True)).action == "continue"
    assert decide(sig(val_acc=[0.3], flops=10e6, target_flops=40e6, sizing=True, growths=3)).action == "continue"
    # over the target in the sizing phase: prune, whatever else
    assert decide(sig(val_acc=[0.3], flops=50e6, target_flops=40e6, sizing=True)).action == "prune"


def test_under_a_time_budget_a_plateau_continues_instead_of_stopping():
    d = decide(sig(left=0.1, pruned_share=[0.0, 0.0, 0.0], anneals=True))
    assert d.action == "continue" and "anneals" in d.reason
    d = decide(sig(pruned_share=[0.0, 0.0, 0.0], growths=3, anneals=True))
    assert d.action == "continue" and "no more growth" in d.reason
    # the other rules are unchanged by a budget
    assert decide(sig(train_acc=[0.9] * 5, anneals=True)).action == "prune"
    assert decide(sig(pruned_share=[0.3, 0.01, 0.0], anneals=True)).action == "widen"


def test_no_measurement_when_even_the_smallest_growth_would_exceed_the_target():
    # at the target, pruning to see which stages use their width could lead to no growth
    d = decide(sig(pruned_share=None, flops=39e6, target_flops=40e6))
    assert d.action == "stop" and "exceed the FLOP target" in d.reason
    assert decide(sig(pruned_share=None, flops=25e6, target_flops=40e6)).action == "prune"  # a block fits (x4/3)


def test_a_scripted_run_goes_through_prune_widen_and_stop():
    """A run as the engine would feed it: over target, then pruned and improving, then saturated, then done."""
    r = Rule()
    steps = [
        sig(val_acc=RISING[:3], flops=60e6, target_flops=50e6),
        sig(val_acc=RISING, flops=45e6, target_flops=50e6),
        sig(val_acc=FLAT, flops=20e6, target_flops=50e6, pruned_share=[0.0, 0.02, 0.4]),
        sig(val_acc=FLAT + [0.60, 0.60], flops=45e6, target_flops=50e6, pruned_share=[0.0, 0.0, 0.0], left=0.15, growths=1),
    ]
    assert [decide(s, r).action for s in steps] == ["prune", "continue", "widen", "stop"]
    assert decide(steps[2], r).event()["stages"] == [0, 1]


import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.mark.parametrize(
    "rule,action",
    [
        ({"adapt.max_gap": -1.0}, "prune"),  # any gap counts as overfitting
        ({"adapt.max_gap": 1.0, "adapt.saturated": 1.0}, "widen"),  # every stage counts as saturated
        ({"adapt.max_gap": 1.0, "adapt.saturated": 0.0}, "deepen"),  # no stage does: width to spare
    ],
)
def test_adapt_carries_out_the_controllers_decisions_end_to_end(tmp_path, rule: dict, action: str):
    # a plateau after every epoch from the second on, and no end-of-run cut-off
    forced = {"adapt.plateau_epochs": 1, "adapt.window": 2, "adapt.min_delta": 1.0, "adapt.min_left": 0.0, "adapt.max_growths": 1}
    epochs = 5 if action == "widen" else 4  # after a growth, the grown network needs its own plateau
    run, decisions, _, metrics = _adapt_run(tmp_path, epochs, **forced | rule)
    assert [d["epoch"] for d in decisions][:3] == [1, 2, 3] and decisions[0]["decision"] == "continue"
    assert decisions[1]["decision"] == action and decisions[1]["reason"]
    assert all(np.isfinite(m["train_loss"]) for m in metrics)
    assert [m["lasso"] for m in metrics[:2]] == [True, True]  # prune.until 0.5 of 4 epochs
    if action == "prune":  # the decision after epoch 2 puts the penalty back on for adapt.window (3) epochs
        assert [m["lasso"] for m in metrics[2:]] == [True, True]
    elif action == "deepen":
        assert metrics[2]["lasso"] is False
    if action == "widen":
        assert metrics[2]["flops_per_image"] > metrics[1]["flops_per_image"]
        assert [w > v for w, v in zip(decisions[1]["widths_after"], decisions[1]["widths_before"])] == [True] * len(metrics[1]["widths"])
        # the widened network is not judged on the plateau it inherited, then plateaus itself with no growth left
        assert decisions[2]["decision"] == "continue" and "too few epochs" in decisions[2]["reason"]
        assert decisions[3]["decision"] == "stop" and "no more growth" in decisions[3]["reason"]  # max_growths 1
        assert run.summary["stop_reason"] == "controller" and len(metrics) == 4
        assert [m["lasso"] for m in metrics] == [True, True, True, False]  # prune.until 0.5 of 5 epochs
    if action == "deepen":
        grown = decisions[1]["stages"][0]
        assert len(metrics[2]["block_ids"][grown]) == 2 and metrics[2]["block_ids"][grown][-1] == 1


def _tiny_spec(depth: int = 1):
    from bonsai.models.arch import ArchSpec

    return ArchSpec.resnet((16, 32), depth, num_classes=3, image_size=16)


def _start_flops() -> int:
    from bonsai.models.resnet import count_flops

    return count_flops(_tiny_spec())


def _adapt_run(tmp_path, epochs: int | None, spec=None, **over):
    """A tiny --adapt run of ``spec`` (:func:`_tiny_spec`) on random images; returns (run, its adapt decisions, all
    events, metrics)."""
    import bonsai
    from conftest import make_images

    x, y = make_images(20)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    spec = spec or _tiny_spec()
    spec.to_json(tmp_path / "arch.json")
    length = {"epochs": epochs} if epochs else {}
    base = {"adapt.on": True, "train.low_res": 1.0, "prune.round_to": 1, "adapt.plateau_epochs": 10}
    run = bonsai.fit(data, out=str(tmp_path / "r"), arch=str(tmp_path / "arch.json"), batch_size=16, quiet=True, precision="fp32", **length, **base | over)
    events = [json.loads(line) for line in (run.dir / "events.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    return run, [e for e in events if e["event"] == "adapt"], events, metrics


def test_a_network_over_the_target_is_pruned_in_the_sizing_phase_then_sized_to_the_target(tmp_path):
    start = _start_flops()
    target = 0.45 * start
    run, decisions, events, metrics = _adapt_run(tmp_path, 5, **{"prune.target_flops": target, "adapt.sizing": 0.4})
    # the penalty's strength follows how much must go: LPR 1 - 0.45 = 0.55 (within prune.lpr 0.2 and max_lpr 0.62)
    lasso = [e for e in events if e["event"] == "lasso"]
    assert len(lasso) == 2 and abs(lasso[0]["lpr"] - 0.55) < 1e-9
    # after the sizing phase, lambda goes back to prune.lpr's (0.2) for the controller's later prune decisions
    assert lasso[1]["epoch"] == 2 and lasso[1]["lpr"] == 0.2
    assert abs(lasso[1]["lambda"] / lasso[0]["lambda"] - (0.2 / 0.8) / (0.55 / 0.45)) < 1e-9
    # the sizing phase is the first 40% (epochs 1 and 2); no penalty after it
    assert [m["lasso"] for m in metrics] == [True, True, False, False, False]
    assert decisions[0]["decision"] == "prune" and "above the target" in decisions[0]["reason"]
    # at its end (after epoch 2) the network is taken to the target (MorphNet's step, either way) and stays there
    for m in metrics[2:]:
        assert 0.9 * target <= m["flops_per_image"] <= 1.02 * target
    assert all(d["decision"] == "continue" for d in decisions[1:])
    assert all(np.isfinite(m["train_loss"]) for m in metrics)


@pytest.mark.parametrize("shed", [True, False])
def test_a_deep_network_over_the_target_sheds_its_weakest_blocks_before_its_widths(tmp_path, shed: bool):
    from bonsai.models.resnet import count_flops

    deep = _tiny_spec(depth=3)
    target = 0.45 * count_flops(deep)
    run, _, events, metrics = _adapt_run(tmp_path, 4, deep, **{"prune.target_flops": target, "adapt.sizing": 0.5, "adapt.shed_blocks": shed, "prune.depth": False})
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["epoch"] == 2 and morph[0]["why"] == "the sizing phase ends"
    assert morph[0]["depths_before"] == [3, 3]  # the penalty alone (without its depth groups) removed no block
    if shed:
        # blocks went first (at most two per stage, never stage 1's projection block), then the widths were fitted
        assert morph[0]["blocks_removed"] and sum(morph[0]["depths_after"]) == 6 - len(morph[0]["blocks_removed"])
        strengths = morph[0]["blocks_strength"]
        assert len(strengths) == len(morph[0]["blocks_removed"]) and strengths == sorted(strengths)  # weakest first
        ids = metrics[2]["block_ids"]
        assert [f"s{s}b{b}" for s in range(2) for b in range(3) if b not in ids[s]] == sorted(morph[0]["blocks_removed"])
    else:
        assert morph[0]["blocks_removed"] == [] and morph[0]["depths_after"] == [3, 3]
    for m in metrics[2:]:
        assert 0.9 * target <= m["flops_per_image"] <= 1.02 * target
    assert all(np.isfinite(m["train_loss"]) for m in metrics)


def test_the_model_handed_back_is_never_one_from_before_a_shed_and_a_shed_run_resumes(tmp_path, monkeypatch):
    """Validation accuracy scripted to fall every epoch: the first epoch's network (before the sizing phase's end
    sheds blocks and fits the widths) would be the best by validation, and handing it back would undo the shrink.
    The run then resumes after the shed with the blocks it kept."""
    import json

    import bonsai
    from bonsai.models.resnet import count_flops
    from bonsai.train.engine import Engine, read_checkpoint

    evaluate = Engine._evaluate

    def falling(self, loader):
        acc = evaluate(self, loader)
        return 0.9 - 0.1 * self.state.epoch if loader is self.val_loader else acc  # state.epoch: the last one finished

    monkeypatch.setattr(Engine, "_evaluate", falling)
    deep = _tiny_spec(depth=3)
    target = 0.45 * count_flops(deep)
    run, _, events, metrics = _adapt_run(tmp_path, 4, deep, **{"prune.target_flops": target, "adapt.sizing": 0.5, "prune.depth": False})
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["epoch"] == 2 and morph[0]["blocks_removed"]
    assert [m["val_acc"] for m in metrics] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    assert run.summary["best_epoch"] == 3  # the first epoch after the shrink, not epoch 1
    handed = bonsai.ArchSpec.from_json(run.dir / "arch.json")
    assert handed.widths() == metrics[2]["widths"] == morph[0]["widths_after"] and count_flops(handed) <= 1.02 * target
    assert [s.depth for s in handed.stages] == morph[0]["depths_after"]
    # resumed after the shed: the same blocks, ids and widths go on training, and epoch 5's penalty is the one
    # epoch 4's end fixed (kept in the checkpoint: after the sizing phase, none)
    _, state, _, _ = read_checkpoint(run.dir / "checkpoint.safetensors")
    assert state.next_penalty == [5, False] and state.shrunk_at == 2
    more = bonsai.fit(None, resume=run.dir, epochs=5)
    after = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert more.summary["epochs"] == 5 and len(after) == 5
    assert after[4]["block_ids"] == after[3]["block_ids"] == metrics[2]["block_ids"]
    assert after[4]["widths"] == after[3]["widths"] and np.isfinite(after[4]["train_loss"]) and after[4]["lasso"] is False


def test_after_a_shrink_to_the_target_the_plateau_is_judged_on_the_shrunk_network(tmp_path, monkeypatch):
    """Shedding blocks changes the function, so validation accuracy dips and then climbs: judged with the epochs
    from before the shrink, the dip would read as a plateau (and the controller would prune, grow or stop)."""
    from bonsai.models.resnet import count_flops
    from bonsai.train.engine import Engine

    curve = [0.9, 0.8, 0.5, 0.6, 0.65, 0.7]
    evaluate = Engine._evaluate

    def scripted(self, loader):
        acc = evaluate(self, loader)
        return curve[self.state.epoch] if loader is self.val_loader else acc

    monkeypatch.setattr(Engine, "_evaluate", scripted)
    deep = _tiny_spec(depth=3)
    target = 0.45 * count_flops(deep)
    over = {"prune.target_flops": target, "adapt.sizing": 0.3, "prune.depth": False, "adapt.plateau_epochs": 2}
    run, decisions, events, metrics = _adapt_run(tmp_path, 6, deep, **over)
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["epoch"] == 2 and morph[0]["flops_after"] < morph[0]["flops_before"]
    assert [d["epoch"] for d in decisions] == [1, 2, 3, 4, 5]
    assert [d["decision"] for d in decisions[1:]] == ["continue"] * 4, [d["reason"] for d in decisions]
    assert run.summary["stop_reason"] == "epochs"


def test_a_run_stopped_right_after_a_shed_hands_back_the_shrunk_network(tmp_path, monkeypatch):
    """Stopped after the sizing phase's end shrank the network and before any validation of the result (a budget
    or a signal can do that): the network handed back is the shrunk one, with no validation accuracy claimed."""
    import bonsai
    from bonsai.models.resnet import count_flops
    from bonsai.train.engine import Engine

    end_sizing = Engine._end_sizing

    def then_stop(self, epoch, progress):
        end_sizing(self, epoch, progress)
        self.state.stop_reason = "budget"

    monkeypatch.setattr(Engine, "_end_sizing", then_stop)
    deep = _tiny_spec(depth=3)
    target = 0.45 * count_flops(deep)
    run, _, events, metrics = _adapt_run(tmp_path, 4, deep, **{"prune.target_flops": target, "adapt.sizing": 0.5, "prune.depth": False})
    morph = [e for e in events if e["event"] == "morph"]
    assert len(metrics) == 2 and len(morph) == 1 and morph[0]["epoch"] == 2 and morph[0]["blocks_removed"]
    handed = bonsai.ArchSpec.from_json(run.dir / "arch.json")
    assert handed.widths() == morph[0]["widths_after"] and count_flops(handed) <= 1.02 * target
    assert run.summary["best_epoch"] == 2 and run.summary["best_epoch_val_acc"] is None
    assert run.summary["test_acc"] is not None  # the shrunk network still predicts the test set


def test_a_network_well_under_the_target_grows_to_it_after_its_first_epoch(tmp_path):
    start = _start_flops()
    target = 3.0 * start
    run, decisions, events, metrics = _adapt_run(tmp_path, 3, **{"prune.target_flops": target, "adapt.sizing": 0.5})
    assert decisions[0]["decision"] == "widen" and decisions[0]["to_target"] and decisions[0]["stages"] == [0, 1]
    assert metrics[0]["flops_per_image"] == start
    assert 0.95 * target <= metrics[1]["flops_per_image"] <= 1.02 * target
    assert [m["lasso"] for m in metrics] == [False, False, False]  # nothing to prune: no penalty by schedule
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["omega"] > 1.5 and "well under" in morph[0]["why"]
    assert all(d["decision"] == "continue" for d in decisions[1:])  # grown once; the rest trains at the target


def test_the_end_of_the_sizing_phase_grows_a_network_a_little_under_the_target_and_counts_it(tmp_path):
    from bonsai.train.engine import read_checkpoint

    start = _start_flops()
    target = 1.8 * start  # under by less than one widening step (1.5 squared): no growth after the first epoch
    run, decisions, events, metrics = _adapt_run(tmp_path, 4, **{"prune.target_flops": target, "adapt.sizing": 0.5})
    assert all(d["decision"] == "continue" for d in decisions)
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["epoch"] == 2 and morph[0]["why"] == "the sizing phase ends"
    assert [m["flops_per_image"] for m in metrics][:2] == [start, start] and 0.95 * target <= metrics[2]["flops_per_image"] <= 1.02 * target
    _, state, _, _ = read_checkpoint(run.dir / "checkpoint.safetensors")
    assert state.sized and state.growths == 1 and state.grown_at == 2  # the plateau is judged on the grown network


@pytest.mark.parametrize("depth", [1, 3])
def test_when_no_width_fits_the_target_the_penalty_keeps_pruning(tmp_path, depth: int):
    """A target below the narrowest network of this shape: MorphNet's step is rejected (no block shed either), and
    the controller's prune decisions fall back to the penalty instead of doing nothing."""
    spec = _tiny_spec(depth)
    over = {"prune.target_flops": 1000, "adapt.sizing": 0.25, "prune.depth": False}
    run, decisions, events, metrics = _adapt_run(tmp_path, 4, spec, **over)
    assert all(m["block_ids"] == [list(range(depth))] * 2 for m in metrics)
    assert not [e for e in events if e["event"] == "morph"]
    rejected = [e for e in events if e["event"] == "surgery_rejected"]
    assert rejected and all(e["surgery"] == "morph" for e in rejected)
    tried = [e["epoch"] for e in rejected]
    assert len(tried) == len(set(tried))  # a step no widths fit is not tried twice in one epoch (sizing end, then rule 1)
    assert all(d["decision"] == "prune" for d in decisions)
    assert [m["lasso"] for m in metrics] == [True, True, True, True]  # the sizing epoch, then adapt.window (3) epochs


def test_under_a_time_budget_the_target_is_what_the_budget_affords(tmp_path):
    run, decisions, events, metrics = _adapt_run(tmp_path, None, budget="6s")
    start = _start_flops()
    target = [e for e in events if e["event"] == "adapt_target"]
    assert len(target) == 1 and target[0]["start_flops"] == start and target[0]["images_per_s"] > 0
    # the probe's pace and the planner's epochs set it: FLOPs x expected epochs / required epochs, at most 4x the
    # start; a target above the start is refined by probing the start widened to it
    t = target[0]
    first = min(start * t["expected_epochs"] / t["required_epochs"], 4 * start)
    if first <= start:
        assert t["refined"] is None and abs(t["target_flops"] - first) <= 0.01 * first
    else:
        assert t["refined"]["flops"] > start and start <= t["target_flops"] <= min(2 * first, 4 * start)
    assert decisions and all(d["signals"]["target_flops"] == t["target_flops"] for d in decisions)
    assert all(d["decision"] != "stop" for d in decisions)  # a budget's schedule runs to its end
    assert run.summary["stop_reason"] == "budget"


@pytest.mark.parametrize("pick", [0.75, 1.0])
def test_with_the_planned_network_adapt_grows_to_the_planners_pick_after_the_first_epoch(npz_data, tmp_path, monkeypatch, pick):
    """--adapt with no --arch under a budget: the planner's pick is the FLOP target (what --no-adapt trains),
    and the start is the widest narrower candidate that the first epoch's growth takes to the target (widen_factor
    1.5: x0.5 for a x0.75 pick, and x0.5 for a x1 pick as well, since x0.75 is within 1.5^2 of x1)."""
    import bonsai
    import bonsai.api as api_mod
    import bonsai.train.plan as plan_mod
    from bonsai.models.resnet import count_flops
    from bonsai.report.log import read_jsonl

    fits = {}
    fast = {"bonsaix0.5", "bonsaix0.75", "bonsai"} if pick == 1.0 else {"bonsaix0.5", "bonsaix0.75"}

    def pace(spec, *a):  # the pick fits the budget, the next wider does not
        fits.setdefault(spec.name, count_flops(spec))
        return 1e6 if spec.name in fast else 1e-3

    monkeypatch.setattr(api_mod, "plan_arch", lambda *a, **k: plan_mod.plan_arch(*a, **k, pace=pace))
    over = {"adapt.on": True, "adapt.plateau_epochs": 10}
    run = bonsai.fit(npz_data, budget="10s", **over, out=str(tmp_path / "r"), batch_size=16, quiet=True, precision="fp32", low_res=1.0)
    events = read_jsonl(run.dir / "events.jsonl")
    metrics = read_jsonl(run.dir / "metrics.jsonl")
    (plan,) = [e for e in events if e["event"] == "plan"]
    (target,) = [e for e in events if e["event"] == "adapt_target"]
    picked = "bonsai" if pick == 1.0 else "bonsaix0.75"
    assert plan["multiplier"] == pick and target["source"] == "plan" and target["start_multiplier"] == 0.5
    assert target["target_flops"] == fits[picked] and target["start_flops"] == fits["bonsaix0.5"]
    assert metrics[0]["flops_per_image"] == fits["bonsaix0.5"]  # trained from the narrower start
    grown = [m["flops_per_image"] for m in metrics[1:]]
    assert len(metrics) >= 2 and all(0.95 * target["target_flops"] <= f <= 1.02 * target["target_flops"] for f in grown)
