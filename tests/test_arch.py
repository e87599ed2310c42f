"""ArchSpec and the ResNet built from it: round trips, FLOP counts, and refusal of absurd specs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch.nn import functional as F

from bonsai.errors import BonsaiError
from bonsai.models.arch import PRESETS, ArchSpec, StageSpec, pooled, preset
from conftest import trained_looking
from bonsai.models.resnet import activation_elements, build, count_flops, count_params, load_model, save_model


def _tiny() -> ArchSpec:
    # inner widths differ from the stage widths on purpose: every conv's width is its own datum
    return ArchSpec(in_channels=3, num_classes=4, stem=8, stages=[StageSpec(8, 1, [5]), StageSpec(16, 2, [12, 7])], image_size=8)


def test_round_trip_build_save_load_identical_outputs(tmp_path: Path):
    model = build(_tiny(), mean=(10.0, 20.0, 30.0), std=(2.0, 3.0, 4.0))
    with torch.no_grad():  # make BN statistics non-trivial so that they must be saved too
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    model.eval()
    save_model(model, tmp_path)
    assert json.loads((tmp_path / "arch.json").read_text())["stages"][1]["inner"] == [12, 7]
    loaded = load_model(tmp_path)
    x = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)
    assert ArchSpec.from_json(tmp_path / "arch.json") == model.spec


def test_a_save_cut_between_weights_and_arch_json_still_loads(tmp_path: Path):
    from bonsai.models.resnet import state_bytes
    from bonsai.surgery.channels import channel_groups, remove_channels_

    model = build(_tiny()).eval()
    save_model(model, tmp_path)
    group = channel_groups(model)[-1]
    remove_channels_(model, {group.name: torch.arange(group.width - 2)})
    # the process died after the new weights were renamed into place, before arch.json was replaced
    (tmp_path / "model.safetensors").write_bytes(state_bytes(model, {"arch": json.dumps(model.spec.to_dict())}))
    t = (tmp_path / "arch.json").stat().st_mtime_ns
    os.utime(tmp_path / "model.safetensors", ns=(t + 10**6, t + 10**6))  # 1 ms later, whatever the clock's grain
    assert ArchSpec.from_json(tmp_path / "arch.json") != model.spec
    loaded = load_model(tmp_path)
    assert loaded.spec == model.spec
    x = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


def test_flops_match_hand_count():
    spec = _tiny()
    s = 8  # image size
    conv = lambda cin, cout, k, hw: 2 * cin * cout * k * k * hw * hw  # noqa: E731 - a multiply-add is 2 FLOPs
    expected = conv(3, 8, 3, s)  # stem
    expected += conv(8, 5, 3, s) + conv(5, 8, 3, s)  # stage 1: identity shortcut (8 -> 8, stride 1)
    expected += conv(8, 12, 3, s // 2) + conv(12, 16, 3, s // 2) + conv(8, 16, 1, s // 2)  # transition block
    expected += conv(16, 7, 3, s // 2) + conv(7, 16, 3, s // 2)
    expected += 2 * 16 * 4  # head
    assert count_flops(spec) == expected
    assert count_flops(spec, image_size=16) > 3.9 * count_flops(spec)


def test_presets_have_the_published_shapes():
    r20 = preset("resnet20")
    assert r20.num_convs() + 1 == 20  # + the linear head
    model = build(r20)
    # ResNet-20 with 1x1 projection shortcuts at the two stride-2 transitions
    assert 270_000 < count_params(model) < 280_000
    assert preset("resnet56").num_convs() + 1 == 56
    for name in PRESETS:
        spec = preset(name, num_classes=7, in_channels=1, image_size=28)
        assert build(spec)(torch.zeros(2, 1, 28, 28)).shape == (2, 7)


def test_widths_are_multiples_of_16_in_the_default():
    assert all(w % 16 == 0 for w in preset("bonsai").widths())


@pytest.mark.parametrize(
    "patch, message",
    [
        ({"stem": -3}, "stem must be an integer"),
        ({"stem": 10**9}, "stem must be an integer"),
        ({"stages": [{"width": 8, "stride": 3, "inner": [8]}]}, r"stages\[0\].stride"),
        ({"stages": [{"width": 8, "stride": 1, "inner": []}]}, r"stages\[0\].inner"),
        ({"stages": [{"width": 8, "stride": 1, "inner": [0]}]}, r"stages\[0\].inner\[0\]"),
        ({"num_classes": 1}, "num_classes"),
        ({"stages": [{"width": 8, "stride": 1, "inner": [8], "pool": True}]}, r"stages\[0\].pool .* only with stride 2"),
        ({"stages": [{"width": 8, "stride": 2, "inner": [8], "pool": "yes"}]}, r"stages\[0\].pool must be true or false"),
        ({"bogus": 1}, "unknown keys"),
    ],
)
def test_tampered_arch_json_is_a_clear_error(tmp_path: Path, patch: dict, message: str):
    d = _tiny().to_dict() | patch
    path = tmp_path / "arch.json"
    path.write_text(json.dumps(d))
    with pytest.raises(BonsaiError, match=message):
        ArchSpec.from_json(path)


def test_unknown_preset():
    with pytest.raises(BonsaiError, match="unknown arch 'resnet999'"):
        preset("resnet999")


def test_weights_that_disagree_with_arch_json(tmp_path: Path):
    save_model(build(_tiny()), tmp_path)
    spec = _tiny()
    spec.stages[0].inner = [6]
    spec.to_json(tmp_path / "arch.json")  # edited after the weights were saved: an error, not a stale file
    t = (tmp_path / "model.safetensors").stat().st_mtime_ns + 10**6
    os.utime(tmp_path / "arch.json", ns=(t, t))
    with pytest.raises(BonsaiError, match=r"stages.0.0.conv1.weight has shape \(5, 8, 3, 3\), arch.json implies \(6"):
        load_model(tmp_path)
    spec.stem = 16
    spec.to_json(tmp_path / "arch.json")
    with pytest.raises(BonsaiError, match="weights do not match arch.json"):
        load_model(tmp_path)


def test_whiten_stem_points_filters_along_decorrelating_axes_in_pairs():
    import torch
    from torch.nn import functional as F

    from bonsai.models.resnet import build, whiten_stem_

    g = torch.Generator().manual_seed(0)
    base = torch.rand(200, 1, 10, 10, generator=g)
    x = (torch.cat([base, 0.7 * base + 0.3 * torch.rand(200, 1, 10, 10, generator=g), torch.rand(200, 1, 10, 10, generator=g)], 1) * 255).to(torch.uint8)
    model = build(ArchSpec.resnet((16,), 1, num_classes=3, stem=16), mean=(120.0,) * 3, std=(70.0,) * 3)
    before = model.stem[0].weight.detach().clone()
    assert whiten_stem_(model, x) == 16
    w = model.stem[0].weight.detach()
    assert torch.equal(w[8:], -w[:8])  # +/- pairs
    dirs = w[:8].flatten(1)
    torch.testing.assert_close(dirs @ dirs.T / dirs.norm(dim=1).mean() ** 2, torch.eye(8), atol=1e-5, rtol=0)  # orthogonal
    torch.testing.assert_close(w.flatten(1).norm(dim=1).mean(), before.flatten(1).norm(dim=1).mean())  # init's length
    out = F.conv2d((x.float() - model.mean) / model.std, w[:8]).transpose(0, 1).flatten(1).double()
    cov = out @ out.T / out.shape[1]
    off = cov - torch.diag(torch.diag(cov))
    assert off.abs().max() < 1e-3 * cov.diag().max()  # the projections are decorrelated
    assert (cov.diag()[:-1] >= cov.diag()[1:] - 1e-6).all()  # largest variance first
    by_image = build(ArchSpec.resnet((16,), 1, num_classes=3, stem=16), mean=(120.0,) * 3, std=(70.0,) * 3)
    whiten_stem_(by_image, x, chunk_values=1)  # one image per chunk: the same sums, so the same axes
    unit = lambda v: v.flatten(1) / v.flatten(1).norm(dim=1, keepdim=True)  # noqa: E731
    torch.testing.assert_close(unit(by_image.stem[0].weight.detach()).abs(), unit(w).abs(), atol=1e-4, rtol=0)  # up to sign


def test_whiten_stem_fills_at_most_two_filters_per_patch_dimension():
    import torch

    from bonsai.models.resnet import build, whiten_stem_

    model = build(ArchSpec.resnet((16,), 1, num_classes=3, in_channels=1, stem=32))  # 1 channel: 9-dim patches
    before = model.stem[0].weight.detach().clone()
    x = (torch.rand(20, 1, 8, 8) * 255).to(torch.uint8)
    assert whiten_stem_(model, x) == 18
    assert torch.equal(model.stem[0].weight[18:], before[18:])  # the rest keep their random init


def test_a_pooled_stage_max_pools_its_first_conv_and_its_shortcut_input():
    spec = ArchSpec(3, 4, 8, [StageSpec(8, 1, [8]), StageSpec(16, 2, [12], pool=True)], image_size=9)
    model = trained_looking(spec).eval()
    block = model.stages[1][0]
    assert block.conv1.stride == (1, 1) and block.shortcut[0].stride == (1, 1)
    x = torch.randn(2, 8, 9, 9)
    pool = lambda t: F.max_pool2d(t, 2, ceil_mode=True)  # noqa: E731
    with torch.no_grad():
        main = block.bn2(block.conv2(F.relu(block.bn1(pool(block.conv1(x))))))
        want = F.relu(main + block.shortcut(pool(x)))
        got = block(x)
    assert got.shape[-1] == 5  # the strided conv's size: ceil(9 / 2)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    # 4x the strided first conv's FLOPs: it runs at 9x9 instead of 5x5
    strided = ArchSpec(3, 4, 8, [StageSpec(8, 1, [8]), StageSpec(16, 2, [12])], image_size=9)
    assert count_flops(spec) - count_flops(strided) == 2 * 9 * 8 * 12 * (9 * 9 - 5 * 5)
    # the memory estimate's activations: the first conv's output at 9x9, plus the two max-pool outputs at 5x5
    assert activation_elements(spec) - activation_elements(strided) == 12 * (9 * 9 - 5 * 5) + (12 + 8) * 5 * 5


def test_older_arch_files_without_pool_load_strided_and_pooled_round_trips(tmp_path: Path):
    d = _tiny().to_dict()
    for st in d["stages"]:
        del st["pool"]
    assert not any(s.pool for s in ArchSpec.from_dict(d).stages)
    spec = pooled(_tiny())
    spec.to_json(tmp_path / "arch.json")
    assert [s.pool for s in ArchSpec.from_json(tmp_path / "arch.json").stages] == [False, True]
