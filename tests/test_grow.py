"""Net2Net growth: widen_ and deepen_ keep the network's function, the spec and the optimizer state consistent."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from bonsai.errors import BonsaiError
from conftest import trained_looking
from bonsai.models.arch import pooled, preset
from bonsai.models.resnet import build, count_params, load_state
from bonsai.surgery.channels import channel_groups
from bonsai.surgery.grow import deepen_, pad_widths_, widen_


def _trained_looking(arch: str = "resnet20") -> nn.Module:
    model = trained_looking(preset(arch, image_size=16))
    return model


X = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)


def _outputs(model, mode: str) -> torch.Tensor:
    model.train(mode == "train")
    with torch.no_grad():
        return model(X).double()


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize(
    "group,width",
    [
        ("s0b1.inner", 40),  # an inner width, grown 2.5x (some channels copied twice)
        ("stem+s0", 24),  # the first stage's residual stream, shared with the stem
        ("s1", 48),  # a stage whose first block has a projection shortcut
        ("s2", 80),  # the last stage: the head reads it
        ("s1b0.inner", 33),  # the inner width of a transition block, to an odd width
    ],
)
def test_widen_preserves_the_function(group: str, width: int, mode: str):
    model = _trained_looking()
    before = _outputs(model, mode)
    widen_(model, group, width)
    assert {g.name: g.width for g in channel_groups(model)}[group] == width
    torch.testing.assert_close(_outputs(model, mode), before, atol=1e-5, rtol=0)
    rebuilt = build(model.spec)  # the spec describes the wider network exactly
    assert count_params(rebuilt) == count_params(model) > count_params(build(preset("resnet20")))
    load_state(rebuilt, model.state_dict(), "test")


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_padding_widths_with_zero_channels_keeps_the_function_exactly(mode: str):
    from bonsai.surgery.channels import remove_channels_

    model = _trained_looking()
    keep = {"stem+s0": torch.arange(0, 16, 2)[:5], "s1b0.inner": torch.arange(20), "s2": torch.arange(0, 64, 3)}
    remove_channels_(model, keep)  # a pruned network: widths 5, 20 and 22 among multiples of 16
    before = _outputs(model, mode)
    filters = {n: p.clone() for n, p in model.named_parameters()}
    grown = pad_widths_(model, 16)
    assert grown == {"stem+s0": (5, 16), "s1b0.inner": (20, 32), "s2": (22, 32)}
    assert all(g.width % 16 == 0 for g in channel_groups(model))
    torch.testing.assert_close(_outputs(model, mode), before, atol=1e-6, rtol=0)  # zeros add nothing (up to summation order)
    for n, p in model.named_parameters():  # the existing weights are untouched
        old = filters[n]
        assert torch.equal(p[tuple(slice(0, k) for k in old.shape)], old)
    load_state(build(model.spec), model.state_dict(), "test")
    assert pad_widths_(model, 16) == {}
    with pytest.raises(BonsaiError, match="multiple"):
        pad_widths_(model, 0)


def test_widen_with_noise_breaks_symmetry_but_stays_close():
    model = _trained_looking()
    before = _outputs(model, "eval")
    widen_(model, "s1", 48, noise=0.01, generator=torch.Generator().manual_seed(1))
    diff = (_outputs(model, "eval") - before).abs().max()
    assert 0 < diff < 0.5


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_widen_and_deepen_preserve_the_function_of_a_pooled_network(mode: str):
    model = trained_looking(pooled(preset("resnet8", image_size=16)))
    assert [b.pool for s in model.stages for b in s] == [False, True, True]
    before = _outputs(model, mode)
    widen_(model, "s1", 48)  # the residual stream of a pooled transition block
    widen_(model, "s2b0.inner", 80)  # the inner width that is max-pooled before its BN
    deepen_(model, stage=1, index=1)
    torch.testing.assert_close(_outputs(model, mode), before, atol=1e-5, rtol=0)
    rebuilt = build(model.spec)
    load_state(rebuilt, model.state_dict(), "test")
    assert [b.pool for s in rebuilt.stages for b in s] == [False, True, False, True]


def test_deepen_preserves_the_function_in_every_stage():
    model = _trained_looking()
    for mode in ("eval", "train"):
        before = _outputs(model, mode)
        m = copy.deepcopy(model)
        deepen_(m, stage=0, index=1)
        deepen_(m, stage=1, index=3)  # at the end of a stage
        deepen_(m, stage=2, index=1, inner=24)
        assert [s.depth for s in m.spec.stages] == [4, 4, 4] and m.spec.stages[2].inner[1] == 24
        torch.testing.assert_close(_outputs(m, mode), before, atol=1e-5, rtol=0)
        load_state(build(m.spec), m.state_dict(), "test")


def test_deepen_refuses_bad_positions():
    model = build(preset("resnet20"))
    with pytest.raises(BonsaiError, match="index"):
        deepen_(model, stage=1, index=0)
    with pytest.raises(BonsaiError, match="no stage"):
        deepen_(model, stage=3, index=1)
    with pytest.raises(BonsaiError, match="shrink"):
        widen_(model, "s1", 16)
    with pytest.raises(BonsaiError, match="unknown"):
        widen_(model, "s9", 99)


def test_widened_momentum_moves_the_function_as_the_original_would():
    """Momentum scaled like the weights: a step with zero gradients (momentum only) takes the widened network to
    the same function as the same step takes the original."""
    model = _trained_looking()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(3)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = 0.05 * torch.randn(p.shape, generator=gen)
    wide = copy.deepcopy(model)
    wide_opt = torch.optim.SGD(wide.parameters(), lr=0.1, momentum=0.9)
    for p, q in zip(model.parameters(), wide.parameters()):  # own copies: SGD updates its buffers in place
        wide_opt.state[q]["momentum_buffer"] = opt.state[p]["momentum_buffer"].clone()
    widen_(wide, "s1", 48, wide_opt)
    widen_(wide, "s2b1.inner", 96, wide_opt)
    for m, o in ((model, opt), (wide, wide_opt)):
        for p in m.parameters():
            p.grad = torch.zeros_like(p)
        o.step()
    torch.testing.assert_close(_outputs(wide, "eval"), _outputs(model, "eval"), atol=1e-5, rtol=0)


def test_grown_network_trains_and_the_inserted_block_comes_alive():
    torch.manual_seed(0)
    model = build(preset("resnet8", num_classes=3, image_size=8), zero_init_residual=False)
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1], "weight_decay": 5e-4},
                           {"params": [p for p in model.parameters() if p.ndim == 1], "weight_decay": 0.0}], lr=0.05, momentum=0.9)
    x = torch.randint(0, 256, (32, 3, 8, 8), dtype=torch.uint8)
    y = torch.arange(32) % 3
    widen_(model, "s1", 48, opt)
    block = deepen_(model, stage=1, index=1, opt=opt)
    assert any(p is block.bn2.weight for g in opt.param_groups for p in g["params"])
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    assert block.bn2.weight.abs().max() > 0  # the zero-initialised scale moved: the new block is not dead


@pytest.mark.parametrize("noise", [0.0, 0.05])
def test_without_noise_a_copied_unit_stays_its_originals_twin_for_ever(noise: float):
    """Net2WiderNet's symmetry: a copy and its original have equal incoming weights and halved, equal outgoing
    weights, so they receive equal gradients and stay equal under training; the noise (``adapt.widen_noise``) makes
    them differ from the start."""
    torch.manual_seed(0)
    from bonsai.models.arch import ArchSpec

    model = build(ArchSpec.resnet((16, 32), 1, num_classes=3, image_size=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 3, (32,))
    model.eval()
    with torch.no_grad():
        before = model(x)
    src = widen_(model, "s0b0.inner", 24, opt, noise=noise, generator=torch.Generator().manual_seed(1))
    conv = model.stages[0][0].conv1
    gap = lambda: float((conv.weight[16:] - conv.weight[src]).detach().abs().max())  # noqa: E731
    with torch.no_grad():
        after = model(x)
    assert float((after - before).abs().max()) <= (1e-5 if noise == 0 else 0.1 * float(before.abs().max()))
    start = gap()
    model.train()
    for _ in range(20):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    if noise == 0:
        assert start == 0 and gap() < 1e-6  # still twins after 20 steps
    else:
        assert start > 0 and gap() > 0.5 * start  # no longer twins, and training does not pull them back together
