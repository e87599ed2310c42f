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
    import bonsai
    from bonsai.models.arch import ArchSpec
    from conftest import make_images

    x, y = make_images(20)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    arch = tmp_path / "arch.json"
    ArchSpec.resnet((16, 32), 1, num_classes=3, image_size=16).to_json(arch)
    # a plateau after every epoch from the second on, and no end-of-run cut-off
    forced = {"train.low_res": 1.0, "adapt.plateau_epochs": 1, "adapt.window": 2, "adapt.min_delta": 1.0, "adapt.min_left": 0.0, "adapt.max_growths": 1, "prune.round_to": 1}
    epochs = 5 if action == "widen" else 4  # after a growth, the grown network needs its own plateau
    run = bonsai.fit(data, epochs=epochs, out=str(tmp_path / "r"), arch=str(arch), batch_size=16, quiet=True, precision="fp32", **{"adapt.on": True} | forced | rule)
    events = [json.loads(line) for line in (run.dir / "events.jsonl").read_text().splitlines()]
    decisions = [e for e in events if e["event"] == "adapt"]
    assert [d["epoch"] for d in decisions][:3] == [1, 2, 3] and decisions[0]["decision"] == "continue"
    assert decisions[1]["decision"] == action and decisions[1]["reason"]
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
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
