"""MorphNet's expand step: the width multiplier meets a FLOP target, and resizing carries the weights over."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bonsai.errors import BonsaiError
from conftest import trained_looking
from bonsai.models.arch import ArchSpec, StageSpec, pooled, preset
from bonsai.models.resnet import build, count_flops, count_params, load_state
from bonsai.surgery.morphnet import fit_multiplier, fit_widths, resize_, scaled_spec, spec_flops

PRUNED = ArchSpec(3, 10, 24, [StageSpec(24, 1, [8, 16, 24]), StageSpec(40, 2, [16, 32, 8]), StageSpec(56, 2, [64, 24, 40])])


SPECS = [preset("resnet20"), PRUNED, preset("bonsai"), preset("resnet8", image_size=27), pooled(preset("bonsai", image_size=27))]


@pytest.mark.parametrize("spec", SPECS, ids=["resnet20", "pruned", "bonsai", "resnet8-27px", "bonsai-pooled-27px"])
def test_flops_from_the_spec_equal_the_counted_ones(spec: ArchSpec):
    assert spec_flops(spec) == count_flops(spec)
    assert spec_flops(spec, 19) == count_flops(spec, 19)


@pytest.mark.parametrize("spec", SPECS[:3], ids=["resnet20", "pruned", "bonsai"])
@pytest.mark.parametrize("share", [0.3, 0.55, 0.9, 1.7])
def test_the_widths_meet_the_flop_target_within_2_percent_and_never_exceed_it(spec: ArchSpec, share: float):
    zeta = share * count_flops(spec)
    omega = fit_multiplier(spec, zeta)
    plain = count_flops(scaled_spec(spec, omega))
    assert plain <= zeta < count_flops(scaled_spec(spec, omega * 1.001))  # omega is the largest that fits
    fitted, same = fit_widths(spec, zeta)
    got = count_flops(fitted)
    assert same == omega and plain <= got <= zeta and got >= 0.98 * zeta, (omega, got / zeta)
    # the shape stays omega's: no width strays more than a few channels from omega times its start
    assert all(abs(w - omega * v) <= 4 for w, v in zip(fitted.widths(), spec.widths()))


def test_the_multiplier_respects_rounding_and_the_floor():
    spec = preset("resnet20")
    omega = fit_multiplier(spec, 0.5 * count_flops(spec), round_to=8, min_width=8)
    s = scaled_spec(spec, omega, round_to=8, min_width=8)
    assert all(w % 8 == 0 and w >= 8 for w in s.widths()) and count_flops(s) <= 0.5 * count_flops(spec)
    with pytest.raises(BonsaiError, match="below the narrowest"):
        fit_multiplier(spec, 1000, round_to=8, min_width=8)


def _trained_looking(spec: ArchSpec) -> nn.Module:
    model = trained_looking(spec)
    return model.eval()


def test_expanding_to_the_multiplier_keeps_the_function_and_lands_on_the_target():
    spec = ArchSpec(3, 10, 24, [StageSpec(24, 1, [8, 16]), StageSpec(40, 2, [16, 32]), StageSpec(56, 2, [64, 24])])
    spec.image_size = 16
    model = _trained_looking(spec)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x)
    zeta = 2.0 * count_flops(spec)
    target, _ = fit_widths(spec, zeta)
    resize_(model, target)
    assert model.spec.widths() == target.widths() and count_flops(model.spec) <= zeta
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=0)
    rebuilt = build(model.spec)
    assert count_params(rebuilt) == count_params(model)
    load_state(rebuilt, model.state_dict(), "test")


def test_shrinking_keeps_the_strongest_channels():
    spec = preset("resnet8", image_size=16)
    model = _trained_looking(spec)
    conv, bn = model.stages[1][0].conv1, model.stages[1][0].bn1  # s1b0.inner, 32 channels
    with torch.no_grad():
        conv.weight[:20] *= 1e-3
        bn.weight[:20] *= 1e-3
        bn.bias[:20] *= 1e-3
        keep = conv.weight[20:].clone()
    target = scaled_spec(spec, 1.0)
    target.stages[1].inner[0] = 12
    resize_(model, target)
    assert conv.out_channels == 12
    torch.testing.assert_close(conv.weight, keep)


def test_resize_refuses_other_depths_and_conflicting_widths():
    model = build(preset("resnet8"))
    with pytest.raises(BonsaiError, match="depths"):
        resize_(model, preset("resnet20"))
    bad = scaled_spec(preset("resnet8"), 1.0)
    bad.stem = 24  # the stem and stage 0 share one channel set, so they cannot differ
    with pytest.raises(BonsaiError, match="several widths"):
        resize_(model, bad)


def test_a_fit_with_a_flop_target_prunes_then_expands_to_the_target(tmp_path):
    import json

    import numpy as np

    import bonsai
    from bonsai.models.arch import ArchSpec
    from conftest import make_images

    x, y = make_images(40)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    arch = tmp_path / "arch.json"
    ArchSpec.resnet((16, 32), 1, num_classes=3, image_size=16).to_json(arch)
    start = count_flops(ArchSpec.from_json(arch))
    target = 2.0 * start  # larger than the start: whatever pruning removed, the expand step must widen
    run = bonsai.fit(
        data, epochs=4, out=str(tmp_path / "r"), arch=str(arch), batch_size=16, quiet=True, precision="fp32",
        **{"prune.enabled": True, "prune.target_flops": target, "prune.interval": 1, "prune.round_to": 1, "prune.min_width": 2},
    )
    events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    morph = [e for e in events if e["event"] == "morph"]
    assert len(morph) == 1 and morph[0]["epoch"] == 2  # after the last epoch with the penalty (until 0.5 of 4)
    assert 0.9 * target <= morph[0]["flops_after"] <= target and morph[0]["omega"] > 1
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["flops_per_image"] == morph[0]["flops_after"] and len(metrics) == 4


@torch.no_grad()
def test_the_weakest_blocks_are_shed_until_the_network_is_within_the_target():
    from bonsai.surgery.depth import remove_blocks_
    from bonsai.surgery.morphnet import block_strength, blocks_to_shed

    model = build(preset("resnet20"))
    # stage 0 (no projection block) weakest; the projection blocks opening stages 1 and 2 weaker still, never shed
    levels = {(0, 0): 0.1, (0, 1): 0.2, (0, 2): 0.3, (1, 0): 0.05, (1, 1): 0.5, (1, 2): 0.6, (2, 0): 0.01, (2, 1): 0.7, (2, 2): 0.8}
    for (s, b), level in levels.items():
        blk = model.stages[s][b]
        blk.bn2.weight.fill_(level)
        blk.bn2.bias.zero_()
        assert abs(block_strength(blk) - level) < 1e-6
    flops = count_flops(model.spec)
    assert blocks_to_shed(model, flops) == []  # within the target already
    zeta = 0.6 * flops
    shed = blocks_to_shed(model, zeta)
    # weakest first, skipping projection blocks and stage 0's last block (every stage keeps one)
    order = [(0, 0), (0, 1), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert len(shed) >= 3 and shed == order[: len(shed)]
    trial = copy.deepcopy(model)
    remove_blocks_(trial, shed)
    assert count_flops(trial.spec) <= zeta
    fewer = copy.deepcopy(model)
    remove_blocks_(fewer, shed[:-1])
    assert count_flops(fewer.spec) > zeta  # no more than needed
    # a target below what removal can reach: every removable block goes, one per stage stays
    everything = blocks_to_shed(model, 1.0)
    assert everything == order
    remove_blocks_(trial := copy.deepcopy(model), everything)
    assert [s.depth for s in trial.spec.stages] == [1, 1, 1]
