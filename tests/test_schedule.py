"""LR schedules."""

import pytest

from bonsai.train.schedule import lr_factor


def test_onecycle_warms_up_then_decays_to_zero():
    xs = [i / 100 for i in range(101)]
    ys = [lr_factor(x, "onecycle", 0.1) for x in xs]
    assert ys[0] == 0 and ys[10] == pytest.approx(1.0) and ys[100] == pytest.approx(0.0, abs=1e-12)
    assert all(a <= b for a, b in zip(ys[:11], ys[1:11]))  # rising during warm-up
    assert all(a >= b for a, b in zip(ys[10:], ys[11:]))  # falling afterwards


def test_step_schedule_is_prunetrains():
    assert [lr_factor(p, "step", 0.0) for p in (0.0, 0.49, 0.5, 0.74, 0.75, 1.0)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]


def test_progress_is_clamped():
    assert lr_factor(1.7, "constant", 0.0) == 1.0 and lr_factor(-1, "onecycle", 0.2) == 0.0
