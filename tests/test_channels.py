"""Channel surgery: removing zero channels keeps the function, the spec, and the optimizer state consistent."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bonsai.errors import BonsaiError
from conftest import randomize_bn_
from bonsai.models.arch import pooled, preset
from bonsai.models.resnet import build, count_params, load_state
from bonsai.surgery.channels import channel_groups, remove_channels_




def _zero_channels_(group, idx: torch.Tensor) -> None:
    """Make channels ``idx`` of a group exactly zero: every writer's filter and BN scale/shift."""
    with torch.no_grad():
        for conv, bn in group.writers:
            conv.weight[idx] = 0
            bn.weight[idx] = 0
            bn.bias[idx] = 0


def _spec(arch: str, image_size: int = 32):
    """A preset; ``NAME+pool``: its stride-2 stages downsample by max-pooling."""
    name, _, pool = arch.partition("+")
    spec = preset(name, image_size=image_size)
    return pooled(spec) if pool else spec


@pytest.mark.parametrize("arch", ["resnet20", "bonsai", "resnet20+pool"])
def test_removing_zero_channels_preserves_the_function_across_residual_unions(arch: str):
    torch.manual_seed(0)
    model = build(_spec(arch, 16), zero_init_residual=False)
    randomize_bn_(model)
    model.eval()
    keep = {}
    for g in channel_groups(model):
        gen = torch.Generator().manual_seed(len(g.name))
        perm = torch.randperm(g.width, generator=gen)
        dead, alive = perm[: g.width // 3], perm[g.width // 3 :]
        _zero_channels_(g, dead)
        keep[g.name] = alive.sort().values
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = model(x)
    remove_channels_(model, keep)
    after = model(x)
    torch.testing.assert_close(before, after, atol=1e-5, rtol=1e-4)
    # the spec describes the smaller network exactly: a network built from it takes the weights as they are
    rebuilt = build(model.spec)
    assert count_params(rebuilt) == count_params(model) < count_params(build(_spec(arch)))
    load_state(rebuilt, model.state_dict(), "test")
    torch.testing.assert_close(rebuilt.eval()(x), after, atol=0, rtol=0)


def test_identity_shortcut_stage_and_stem_share_one_channel_set():
    model = build(preset("resnet20"))
    groups = {g.name: g for g in channel_groups(model)}
    assert set(groups) >= {"stem+s0", "s1", "s2"}
    assert len(groups["stem+s0"].writers) == 1 + 3  # the stem and each block's second conv of stage 0
    assert len(groups["s1"].writers) == 1 + 3  # the projection shortcut and three second convs
    remove_channels_(model, {"stem+s0": torch.arange(8)})
    assert model.spec.stem == 8 and model.spec.stages[0].width == 8
    assert model(torch.zeros(1, 3, 8, 8)).shape == (1, 10)


def test_momentum_buffers_are_sliced_like_the_weights():
    torch.manual_seed(0)
    model = build(preset("resnet8"), zero_init_residual=False).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randint(0, 256, (8, 3, 8, 8), dtype=torch.uint8).contiguous(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.arange(8) % 10).backward()
    opt.step()
    g = {g.name: g for g in channel_groups(model)}["s1"]
    conv2, bn2 = g.writers[1]
    reader = g.readers[0]
    before = {n: opt.state[p]["momentum_buffer"].clone() for n, p in (("w", conv2.weight), ("b", bn2.weight), ("r", reader.weight))}
    params_before = len(list(model.parameters()))
    idx = torch.tensor([0, 3, 5, 31])
    remove_channels_(model, {"s1": idx}, opt)
    assert torch.equal(opt.state[conv2.weight]["momentum_buffer"], before["w"][idx])
    assert torch.equal(opt.state[bn2.weight]["momentum_buffer"], before["b"][idx])
    assert torch.equal(opt.state[reader.weight]["momentum_buffer"], before["r"][:, idx])
    # the same parameter objects stay in the optimizer, and training continues in channels_last
    assert sum(len(pg["params"]) for pg in opt.param_groups) == params_before
    assert conv2.weight.is_contiguous(memory_format=torch.channels_last)
    F.cross_entropy(model(x), torch.arange(8) % 10).backward()
    opt.step()
    assert opt.state[conv2.weight]["momentum_buffer"].shape == conv2.weight.shape == (4, 32, 3, 3)


def test_bad_keep_sets_are_refused():
    model = build(preset("resnet8"))
    with pytest.raises(BonsaiError, match="unknown channel groups"):
        remove_channels_(model, {"nope": torch.arange(2)})
    with pytest.raises(BonsaiError, match="must keep 1..16"):
        remove_channels_(model, {"s0b0.inner": torch.tensor([], dtype=torch.long)})
    with pytest.raises(BonsaiError, match="must keep 1..16"):
        remove_channels_(model, {"s0b0.inner": torch.tensor([3, 16])})
