"""Depth surgery: removing blocks whose residual branch is zero keeps the function, the spec and the optimizer."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from bonsai.errors import BonsaiError
from conftest import trained_looking
from bonsai.models.arch import preset
from bonsai.models.resnet import build, count_params, load_state
from bonsai.surgery.depth import branch_constant, branch_params, dead_blocks, remove_blocks_, stuck
from bonsai.surgery.prune import GroupLasso


def _trained_looking(arch: str = "resnet20") -> nn.Module:
    model = trained_looking(preset(arch, image_size=16))
    return model


def _zero_branch_(block) -> None:
    with torch.no_grad():
        for p in branch_params(block):
            p.zero_()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_removing_zeroed_blocks_preserves_the_function(mode: str):
    model = _trained_looking()
    for s, b in [(0, 0), (0, 2), (2, 1)]:  # s0b0 has an identity shortcut (stem width = stage width)
        _zero_branch_(model.stages[s][b])
    model.train(mode == "train")
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x)
    assert dead_blocks(model, 0.0) == [(0, 0), (0, 2), (2, 1)]
    remove_blocks_(model, [(0, 0), (0, 2), (2, 1)])
    assert [s.depth for s in model.spec.stages] == [1, 3, 2]
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-4)
    # the spec describes the shallower network exactly: a network built from it takes the weights by name
    rebuilt = build(model.spec)
    assert count_params(rebuilt) == count_params(model) < count_params(build(preset("resnet20")))
    load_state(rebuilt, model.state_dict(), "test")
    rebuilt.train(mode == "train")
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


def test_a_live_branch_changes_the_function_when_removed():
    """The exactness above is not an accident of the input: removing a block that is not zero changes outputs."""
    model = _trained_looking().eval()
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        before = model(x)
    remove_blocks_(model, [(1, 2)])
    with torch.no_grad():
        assert (model(x) - before).abs().max() > 1e-3


def test_optimizer_state_survives_block_removal():
    model = _trained_looking()
    opt = torch.optim.SGD([{"params": [p for p in model.parameters() if p.ndim > 1]}, {"params": [p for p in model.parameters() if p.ndim == 1]}], lr=0.1, momentum=0.9)
    for i, p in enumerate(model.parameters()):
        opt.state[p]["momentum_buffer"] = torch.full_like(p, float(i))
    gone = list(model.stages[1][1].parameters())
    kept = {n: opt.state[p]["momentum_buffer"].clone() for n, p in model.named_parameters() if not any(p is g for g in gone)}
    kept_names_after = {}  # stage 1's block 2 becomes block 1: its buffers move with it
    for n in kept:
        kept_names_after[n.replace("stages.1.2.", "stages.1.1.")] = kept[n]
    remove_blocks_(model, [(1, 1)], opt)
    params = [p for g in opt.param_groups for p in g["params"]]
    assert len(params) == len(list(model.parameters())) and all(any(p is q for q in model.parameters()) for p in params)
    assert not any(any(p is g for g in gone) for p in opt.state)
    for n, p in model.named_parameters():
        torch.testing.assert_close(opt.state[p]["momentum_buffer"], kept_names_after[n], atol=0, rtol=0)
    # and the optimizer still steps
    model(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)).sum().backward()
    opt.step()


def test_block_removal_refuses_projection_blocks_and_empty_stages():
    model = build(preset("resnet20"))
    with pytest.raises(BonsaiError, match="projection"):
        remove_blocks_(model, [(1, 0)])
    with pytest.raises(BonsaiError, match="at least one block"):
        remove_blocks_(model, [(0, 0), (0, 1), (0, 2)])
    with pytest.raises(BonsaiError, match="no block"):
        remove_blocks_(model, [(0, 5)])
    assert [s.depth for s in model.spec.stages] == [3, 3, 3]  # refused before anything changed


def test_dead_blocks_keep_one_block_per_stage_and_use_absolute_values():
    model = _trained_looking()
    for b in range(3):
        _zero_branch_(model.stages[0][b])
    with torch.no_grad():
        model.stages[2][2].bn2.bias[0] = -1e-3  # one negative shift keeps a block alive at threshold 1e-4
        for p in branch_params(model.stages[2][2]):
            if p is not model.stages[2][2].bn2.bias:
                p.zero_()
    assert dead_blocks(model, 1e-4) == [(0, 1), (0, 2)]  # all of stage 0 is dead: its first block stays


@pytest.mark.parametrize("dead", ["writers", "readers"])
def test_a_stuck_block_adds_a_constant_and_removing_it_drops_exactly_that(dead: str):
    """Inner channels all dead (conv1's filters with bn1, or conv2's input columns) but bn2's shift alive: the
    branch adds branch_constant whatever the input; dead_blocks lists the block only with constant=True, and
    removing it changes the output exactly as zeroing that constant does. A stuck block gets no gradient."""
    model = _trained_looking().eval()
    block = model.stages[1][1]
    with torch.no_grad():
        if dead == "writers":
            for p in (block.conv1.weight, block.bn1.weight, block.bn1.bias):
                p.zero_()
        else:
            block.conv2.weight.zero_()
    assert stuck(block, 0.0) and not stuck(model.stages[1][2], 0.0)
    assert dead_blocks(model, 0.0) == [] and dead_blocks(model, 0.0, constant=True) == [(1, 1)]
    c = branch_constant(block)
    assert float(c.abs().max()) > 0.01  # a trained-looking BN: the constant is not small
    x = torch.randint(0, 256, (6, 3, 16, 16), dtype=torch.uint8)
    with torch.no_grad():
        h = model.stages[1][0](model.stages[0](model.stem((x.float() - model.mean) / model.std)))  # the block's input
        branch = block.bn2(block.conv2(torch.relu(block.bn1(block.conv1(h)))))
        torch.testing.assert_close(branch, c.view(1, -1, 1, 1).expand_as(branch))
    model.train()
    model(x).sum().backward()
    assert float(block.conv1.weight.grad.abs().max()) == 0 and float(block.bn1.weight.grad.abs().max()) == 0
    model.eval()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # the same network with the constant zeroed: bn2's shift cancels its mean term
        b2 = ref.stages[1][1].bn2
        b2.bias.copy_(b2.weight * b2.running_mean / torch.sqrt(b2.running_var + b2.eps))
        expected = ref(x)
        changed = float((model(x) - expected).abs().max())
    remove_blocks_(model, [(1, 1)])
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)
    assert changed > 1e-3  # the constant mattered: the surgery is not the identity


def test_the_block_prox_zeroes_a_branch_whose_channels_alone_would_survive():
    """FLOP weighting makes a whole branch weigh (both convs' cost) more than its norm grows: a branch dies as a
    whole where none of its channel groups would die alone."""
    model = _trained_looking()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)  # tau = lambda
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    weak = model.stages[1][2]
    with torch.no_grad():
        for p in branch_params(weak):
            p.mul_(1e-3)
    lasso = GroupLasso(lpr=0.2, weighting="flops")
    w_block = dict((id(b), w) for b, w in lasso._blocks(model))[id(weak)]
    norm = float(sum(p.detach().pow(2).sum() for p in branch_params(weak)).sqrt())
    lasso.lam = 1.01 * norm / w_block  # just enough for the branch as a whole
    rows = {conv: (w_out, w_in) for conv, _, w_out, w_in in lasso._groups(model)}
    c1, c2 = weak.conv1, weak.conv2
    with torch.no_grad():
        smallest = min(
            float((c1.weight.pow(2).sum(dim=(1, 2, 3)) + weak.bn1.weight.pow(2) + weak.bn1.bias.pow(2)).sqrt().min()) / rows[c1][0],
            float((c2.weight.pow(2).sum(dim=(1, 2, 3)) + weak.bn2.weight.pow(2) + weak.bn2.bias.pow(2)).sqrt().min()) / rows[c2][0],
            float(c2.weight.pow(2).sum(dim=(0, 2, 3)).sqrt().min()) / rows[c2][1],
        )
    assert lasso.lam < smallest  # no channel group of the branch is below its own threshold
    control = copy.deepcopy(model)
    GroupLasso(lpr=0.2, lam=lasso.lam, weighting="flops", depth=False).prox_(control, torch.optim.SGD(control.parameters(), lr=1.0))
    assert dead_blocks(control, 0.0) == []
    lasso.prox_(model, opt)
    assert all(p.abs().max() == 0 for p in branch_params(weak))
    assert all(opt.state[p]["momentum_buffer"].abs().max() == 0 for p in branch_params(weak))
    assert dead_blocks(model, 0.0) == [(1, 2)]
    strong = model.stages[1][1]
    assert all(p.abs().max() > 0 for p in branch_params(strong))


def test_no_block_groups_without_depth():
    model = build(preset("resnet20"), zero_init_residual=False)
    with_depth, without = GroupLasso(depth=True), GroupLasso(depth=False)
    assert len(with_depth._blocks(model)) == 7 and without._blocks(model) == []  # 9 blocks, 2 with projections
    assert float(with_depth.penalty(model)) > float(without.penalty(model))


def test_end_to_end_prune_run_removes_blocks_keeps_training_and_resumes(tmp_path):
    import json

    import numpy as np
    from safetensors import safe_open

    import bonsai
    from bonsai.models.arch import ArchSpec
    from conftest import make_images

    x, y = make_images(40)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    arch = tmp_path / "arch.json"
    ArchSpec.resnet((16, 32), 2, num_classes=3, image_size=16).to_json(arch)  # 2 blocks per stage
    # a penalty far above any useful one, so that branches die within a few dozen steps of a tiny run
    run = bonsai.fit(
        data, epochs=6, out=str(tmp_path / "r"), arch=str(arch), batch_size=16, quiet=True, precision="fp32", lr=3.2,
        **{"prune.enabled": True, "prune.lpr": 0.98, "prune.interval": 1, "prune.prox_every": 1},
    )
    events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    removed = [b for e in events if e["event"] == "prune" for b in e["blocks_removed"]]
    # s1b0 has a projection; stage 0's two identity blocks can lose only one (a stage keeps a block)
    assert removed and set(removed) <= {"s0b0", "s0b1", "s1b1"} and len(removed) == len(set(removed))
    assert sum(b.startswith("s0") for b in removed) <= 1
    # the largest |constant| a removed branch added: finite where blocks went, exactly 0 where none did
    prunes = [e for e in events if e["event"] == "prune"]
    assert all(np.isfinite(e["dropped_constant"]) and (e["blocks_removed"] or e["dropped_constant"] == 0.0) for e in prunes)
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5, 6] and all(np.isfinite(m["train_loss"]) for m in metrics)
    assert metrics[0]["block_ids"] == [[0, 1], [0, 1]] and sum(map(len, metrics[-1]["block_ids"])) == 4 - len(removed)
    last = [e for e in events if e["event"] == "prune"][-1]
    with safe_open(str(run.dir / "checkpoint.safetensors"), "pt") as f:
        spec = bonsai.ArchSpec.from_dict(json.loads(f.metadata()["arch"]))
    assert [s.depth for s in spec.stages] == last["depths_after"] and spec.widths() == last["widths_after"]
    more = bonsai.fit(None, resume=run.dir, epochs=7)  # the shallower checkpoint resumes with its momentum
    assert more.summary["epochs"] == 7
