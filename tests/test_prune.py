"""PruneTrain pieces: the group-lasso gradient, lambda from LPR, dead-channel detection, keep plans."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from bonsai.models.arch import preset
from bonsai.models.resnet import build
from bonsai.surgery.channels import channel_groups
from bonsai.surgery.prune import GroupLasso, dead_channels, plan_keep


def _penalty_autograd(model) -> torch.Tensor:
    """The group-lasso penalty written out directly, differentiable, as the reference: each group's L2 norm
    weighted by the square root of its size (channels, and the residual branches of identity-shortcut blocks)."""
    groups = {conv: bn for g in channel_groups(model) for conv, bn in g.writers}
    total = 0
    for conv, bn in groups.items():
        w = conv.weight
        o, i, kh, kw = w.shape
        out = (w.pow(2).sum(dim=(1, 2, 3)) + bn.weight.pow(2) + bn.bias.pow(2)).sqrt()
        total = total + (i * kh * kw + 2) ** 0.5 * out.sum()
        if conv is not model.stem[0]:
            total = total + (o * kh * kw) ** 0.5 * w.pow(2).sum(dim=(0, 2, 3)).sqrt().sum()
    h = model.head.weight
    total = total + h.shape[0] ** 0.5 * h.pow(2).sum(dim=0).sqrt().sum()
    for stage in model.stages:  # each identity-shortcut block's whole residual branch
        for block in stage:
            if block.shortcut is None:
                ps = [block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight, block.bn2.weight, block.bn2.bias]
                total = total + sum(p.numel() for p in ps) ** 0.5 * sum(p.pow(2).sum() for p in ps).sqrt()
    return total


def test_add_grad_is_the_gradient_of_lambda_times_the_penalty():
    torch.manual_seed(0)
    model = build(preset("resnet20"), zero_init_residual=False)
    lasso = GroupLasso(lpr=0.2, lam=0.37, weighting="size")
    ref = build(preset("resnet20"))
    ref.load_state_dict(model.state_dict())
    (0.37 * _penalty_autograd(ref)).backward()
    lasso.add_grad_(model)
    torch.testing.assert_close(lasso.penalty(model), _penalty_autograd(ref).detach())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("groups", ["weights", "bn"])
def test_lambda_from_lpr_gives_the_requested_penalty_share_on_a_batch(groups: str):
    torch.manual_seed(0)
    model = build(preset("resnet8"))
    x = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    ce = F.cross_entropy(model(x), torch.arange(16) % 10).detach()
    for lpr in (0.05, 0.2, 0.5):
        lasso = GroupLasso(lpr=lpr, groups=groups)
        lam = lasso.set_lambda(float(ce), model)
        share = lam * float(lasso.penalty(model)) / (float(ce) + lam * float(lasso.penalty(model)))
        assert abs(share - lpr) < 1e-6


def test_dead_channels_use_absolute_values():
    model = build(preset("resnet8"), zero_init_residual=False)
    g = next(g for g in channel_groups(model) if g.name == "s1b0.inner")
    conv, bn = g.writers[0]
    with torch.no_grad():
        conv.weight[2] = -5e-5  # tiny negative filter: dead under |w| <= 1e-4 (``w < t`` would also catch it)
        bn.weight[2], bn.bias[2] = 0.0, -1e-5
        conv.weight[3] = -1.0  # large negative filter: alive (``w < t`` would wrongly call it dead)
        bn.weight[3], bn.bias[3] = 0.0, 0.0
    dead = dead_channels(model, 1e-4)["s1b0.inner"]
    assert dead[2] and not dead[3] and int(dead.sum()) == 1


def test_channels_nobody_reads_are_dead_too():
    model = build(preset("resnet8"), zero_init_residual=False)
    with torch.no_grad():
        model.stages[0][0].conv2.weight[:, 5] = 0  # the only reader of s0b0.inner channel 5
    assert dead_channels(model, 0.0)["s0b0.inner"].nonzero().flatten().tolist() == [5]


def test_plan_keep_floor_and_rounding():
    model = build(preset("resnet20"), zero_init_residual=False)
    g = next(g for g in channel_groups(model) if g.name == "s2")  # 64 wide
    with torch.no_grad():
        for conv, bn in g.writers:
            conv.weight[:50] = 0
            bn.weight[:50] = 0
            bn.bias[:50] = 0
    keep = plan_keep(model, 1e-4, min_width=4, round_to=8)["s2"]
    assert len(keep) == 16 and set(range(50, 64)) <= set(keep.tolist())  # 14 alive, rounded up to 16
    assert len(plan_keep(model, 1e-4, min_width=4, round_to=1)["s2"]) == 14
    with torch.no_grad():
        for conv, bn in g.writers:
            conv.weight.zero_()
            bn.weight.zero_()
            bn.bias.zero_()
    assert len(plan_keep(model, 1e-4, min_width=4, round_to=1)["s2"]) == 4  # the floor: never zero channels


def _tiny_prune_run(tmp_path, epochs: int, **prune):
    """A --prune run of resnet8 on 40 synthetic images that prunes hard from the first epoch; ``prune``: more
    prune.* settings (without the prefix)."""
    import numpy as np

    import bonsai
    from conftest import make_images

    x, y = make_images(40)
    data = tmp_path / "d.npz"
    np.savez(data, x_train=x, y_train=y, x_test=x[:6], y_test=y[:6])
    settings = {"enabled": True, "lpr": 0.5, "interval": 1, "threshold": 0.5, "min_width": 2, "round_to": 1, "until": 1.0, **prune}
    return bonsai.fit(
        data, epochs=epochs, out=str(tmp_path / "r"), arch="resnet8", batch_size=16, quiet=True, precision="fp32",
        **{f"prune.{k}": v for k, v in settings.items()},
    )


def test_end_to_end_prune_run_removes_channels_and_keeps_training(tmp_path):
    import json

    from safetensors import safe_open

    import bonsai

    run = _tiny_prune_run(tmp_path, 4, grow_batch=True)
    lasso, *events = [json.loads(x) for x in (run.dir / "events.jsonl").read_text().splitlines()]
    assert lasso["event"] == "lasso" and lasso["lpr"] == 0.5 and lasso["lambda"] > 0  # lambda set at the first step
    assert events and events[0]["event"] == "prune"
    assert events[0]["flops_after"] < events[0]["flops_before"]
    assert events[0]["batch_size"] > events[0]["batch_size_before"] == 16  # freed compute goes into a larger batch
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4]  # training went on after the surgery
    assert metrics[-1]["flops_per_image"] < metrics[0]["flops_per_image"]
    assert metrics[-1]["batch_size"] == events[-1]["batch_size"]
    with safe_open(str(run.dir / "checkpoint.safetensors"), "pt") as f:
        spec = bonsai.ArchSpec.from_dict(json.loads(f.metadata()["arch"]))
    assert spec.widths() == events[-1]["widths_after"] and min(spec.widths()) >= 2
    # the pruned checkpoint resumes: its arch, momentum buffers, batch size and lambda come back
    more = bonsai.fit(None, resume=run.dir, epochs=5)
    assert more.summary["epochs"] == 5
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["batch_size"] == events[-1]["batch_size"] > 16  # the batch the run had reached
    # a batch size given on resuming replaces it (e.g. after an out-of-memory error under torchrun)
    bonsai.fit(None, resume=run.dir, epochs=6, batch_size=8)
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["epoch"] == 6 and metrics[-1]["batch_size"] == 8


def test_prox_is_the_group_soft_threshold_and_clears_momentum_of_zeroed_groups():
    torch.manual_seed(0)
    model = build(preset("resnet8"), zero_init_residual=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for p in model.parameters():
        opt.state[p]["momentum_buffer"] = torch.ones_like(p)
    conv, bn = model.stem[0], model.stem[1]  # the first conv: output groups only
    with torch.no_grad():
        conv.weight[3].mul_(1e-3)
        bn.weight[3], bn.bias[3] = 1e-3, -1e-3  # a negative shift counts as much as a positive one
    norm = lambda: (conv.weight.pow(2).sum(dim=(1, 2, 3)) + bn.weight.pow(2) + bn.bias.pow(2)).sqrt()  # noqa: E731
    before = norm().clone()
    lasso = GroupLasso(lpr=0.2, lam=0.01, weighting="size")
    lasso.prox_(model, opt)
    tau = 0.1 * 0.01 / (1 - 0.9) * (3 * 3 * 3 + 2) ** 0.5  # lr * lambda / (1 - momentum) * sqrt(group size)
    expected = (before - tau).clamp_min(0)
    assert expected[3] == 0 and (expected > 0).sum() == len(expected) - 1
    torch.testing.assert_close(norm(), expected, atol=1e-6, rtol=1e-5)
    assert conv.weight[3].abs().max() == 0 and bn.bias[3] == 0
    buf = opt.state[conv.weight]["momentum_buffer"]
    assert buf[3].abs().max() == 0 and bool((buf[torch.arange(len(buf)) != 3] == 1).all())
    assert opt.state[bn.bias]["momentum_buffer"][3] == 0


def test_flops_weights_are_what_each_channel_costs():
    from bonsai.surgery.prune import _output_pixels

    model = build(preset("resnet8"))  # 16/32/64 channels at 32/16/8 pixels
    pixels = _output_pixels(model)
    assert pixels[model.stem[0]] == 32 * 32
    assert pixels[model.stages[2][0].conv2] == 8 * 8
    assert model.training  # left in training mode
    lasso = GroupLasso(lpr=0.2, weighting="flops")
    rows = {conv: (w_out, w_in) for conv, _, w_out, w_in in lasso._groups(model)}
    c = model.stages[1][0].conv1  # 16 -> 32 channels, stride 2: 16 x 16 outputs
    assert rows[c] == (16 * 16 * 16 * 9, 16 * 16 * 32 * 9)
    assert rows[model.stem[0]][1] == 0  # the image's channels are never a group


def test_zero_init_residual_defaults_off_only_when_pruning():
    from bonsai.config import FitConfig, set_value

    assert FitConfig().resolved().model.zero_init_residual is True
    assert set_value(FitConfig(), "prune.enabled", True).resolved().model.zero_init_residual is False
    cfg = set_value(set_value(FitConfig(), "prune.enabled", True), "model.zero_init_residual", True)
    assert cfg.resolved().model.zero_init_residual is True


def test_channels_the_prox_zeroes_are_removed_at_the_default_threshold_without_changing_the_function():
    from bonsai.surgery.channels import remove_channels_

    torch.manual_seed(0)
    model = build(preset("resnet8"), zero_init_residual=False)
    with torch.no_grad():  # train-mode passes give the BNs non-trivial running statistics
        for _ in range(3):
            model(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)  # tau = lambda
    conv, bn = model.stages[0][0].conv1, model.stages[0][0].bn1
    norms = (conv.weight.pow(2).sum(dim=(1, 2, 3)) + bn.weight.pow(2) + bn.bias.pow(2)).sqrt()
    lasso = GroupLasso(lpr=0.2, lam=float(norms.detach().median()), weighting="none")
    lasso.prox_(model, opt)
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = model(x)
    keep = plan_keep(model, threshold=1e-4, min_width=1, round_to=1)
    assert "s0b0.inner" in keep and len(keep["s0b0.inner"]) < conv.out_channels
    remove_channels_(model, keep, opt)
    assert conv.out_channels == len(keep["s0b0.inner"])
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_a_run_written_before_block_pruning_resumes_as_it_trained(tmp_path):
    import yaml

    from bonsai.config import FitConfig, load_yaml, save_yaml

    path = tmp_path / "config.yaml"
    save_yaml(FitConfig(), path)
    d = yaml.safe_load(path.read_text())
    for key in ("depth", "prox_every", "until", "grow_batch"):
        del d["prune"][key]
    path.write_text(yaml.safe_dump(d))
    old = load_yaml(path, run=True)
    assert (old.prune.depth, old.prune.prox_every, old.prune.until, old.prune.grow_batch) == (False, 1, 1.0, True)
    fresh = load_yaml(path)
    assert (fresh.prune.depth, fresh.prune.prox_every) == (True, FitConfig().prune.prox_every)


def test_prox_of_k_steps_is_one_prox_with_k_times_the_threshold():
    torch.manual_seed(0)
    a = build(preset("resnet8"), zero_init_residual=False)
    b = build(preset("resnet8"), zero_init_residual=False)
    b.load_state_dict(a.state_dict())
    lasso_a, lasso_b = GroupLasso(lam=0.003, weighting="size"), GroupLasso(lam=0.012, weighting="size")
    lasso_a.prox_(a, torch.optim.SGD(a.parameters(), lr=0.1), steps=4)
    lasso_b.prox_(b, torch.optim.SGD(b.parameters(), lr=0.1))
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q)
    assert any(bool((p == 0).any()) for p in a.parameters())  # the threshold was large enough to zero groups


def _penalty_bn_autograd(model) -> torch.Tensor:
    """The penalty with groups="bn", written out directly: each channel's BN scale and shift, and each
    identity-shortcut block's bn2, weighted by the square root of the group's size."""
    total = 0
    for conv, bn in {conv: bn for g in channel_groups(model) for conv, bn in g.writers}.items():
        total = total + 2**0.5 * (bn.weight.pow(2) + bn.bias.pow(2)).sqrt().sum()
    for stage in model.stages:
        for block in stage:
            if block.shortcut is None:
                ps = [block.bn2.weight, block.bn2.bias]
                total = total + sum(p.numel() for p in ps) ** 0.5 * sum(p.pow(2).sum() for p in ps).sqrt()
    return total


def test_bn_groups_penalize_only_bn_scales_and_shifts():
    torch.manual_seed(0)
    model = build(preset("resnet20"), zero_init_residual=False)
    ref = build(preset("resnet20"))
    ref.load_state_dict(model.state_dict())
    lasso = GroupLasso(lpr=0.2, lam=0.37, weighting="size", groups="bn")
    (0.37 * _penalty_bn_autograd(ref)).backward()
    lasso.add_grad_(model)
    torch.testing.assert_close(lasso.penalty(model), _penalty_bn_autograd(ref).detach())
    for (name, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        expected = q.grad if q.grad is not None else torch.zeros_like(q)
        got = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5, msg=name)
        if p.dim() > 1:  # convs and the head: no gradient at all
            assert got.abs().max() == 0, name
    # the proximal step leaves every conv and the head as they were, and shrinks BN parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lasso.prox_(model, opt)
    for n, p in model.named_parameters():
        if p.dim() > 1:
            assert torch.equal(p, before[n]), n
    assert model.stem[1].weight.abs().sum() < before["stem.1.weight"].abs().sum()


def test_bn_groups_remove_channels_and_blocks_exactly_while_their_filters_are_not_zero():
    from bonsai.surgery.channels import remove_channels_
    from bonsai.surgery.depth import dead_blocks, remove_blocks_

    torch.manual_seed(0)
    model = build(preset("resnet20"), zero_init_residual=False)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8))
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=1.0, momentum=0.0)  # tau = lambda
    inner = model.stages[0][0].bn1
    lasso = GroupLasso(lpr=0.2, lam=float((inner.weight.pow(2) + inner.bias.pow(2)).sqrt().median().detach()), weighting="none", groups="bn")
    with torch.no_grad():
        model.stages[1][1].bn2.weight.mul_(1e-6)  # a whole block's bn2 tiny: the block group goes to zero
        model.stages[1][1].bn2.bias.mul_(1e-6)
    lasso.prox_(model, opt)
    assert bool((model.stages[0][0].conv1.weight.flatten(1).norm(dim=1) > 0.1).all())  # the filters are untouched
    x = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8)
    before = model(x)
    # the weights rule sees no dead channel (the filters are not zero); the bn rule does
    assert "s0b0.inner" not in plan_keep(model, threshold=1e-4, min_width=1, round_to=1)
    assert dead_blocks(model, 1e-4) == []
    blocks = dead_blocks(model, 1e-4, bn_only=True)
    assert (1, 1) in blocks
    remove_blocks_(model, blocks, opt)
    keep = plan_keep(model, threshold=1e-4, min_width=1, round_to=1, bn_only=True)
    assert "s0b0.inner" in keep and len(keep["s0b0.inner"]) < 16
    remove_channels_(model, keep, opt)
    assert model.stages[0][0].conv1.out_channels == len(keep["s0b0.inner"])
    torch.testing.assert_close(model(x), before, atol=1e-5, rtol=1e-5)


def test_end_to_end_prune_run_with_bn_groups_removes_channels_and_keeps_training(tmp_path):
    import json

    run = _tiny_prune_run(tmp_path, 3, groups="bn")
    events = [e for e in map(json.loads, (run.dir / "events.jsonl").read_text().splitlines()) if e["event"] != "lasso"]
    assert events and events[0]["event"] == "prune" and events[0]["flops_after"] < events[0]["flops_before"]
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3] and metrics[-1]["flops_per_image"] < metrics[0]["flops_per_image"]
    assert "groups: bn" in (run.dir / "config.yaml").read_text()  # the run directory says how it pruned
