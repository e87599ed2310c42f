"""Depth surgery: removing whole residual blocks, in place, optimizer state included.

A block with an identity shortcut computes ``relu(x + bn2(conv2(relu(bn1(conv1(x))))))``. When every weight of its
residual branch is zero (both convs and both BNs' scales and shifts), the branch outputs exactly zero, in training
and in eval mode, and the block computes ``relu(x)``. Its input ``x`` is the output of a ReLU (the stem's or the
previous block's), so ``relu(x) == x``: the block is the identity and removing it leaves the network's function
unchanged. Blocks with a projection shortcut (where a stage changes stride or width) are never removed, and every
stage keeps at least one block.

A block can also be stuck: every inner channel dead (conv1's filters with bn1's scale and shift, or conv2's input
columns, at ``max |w| <= threshold``) while bn2's shift is not. Its branch then outputs a per-channel constant
``c = bn2.bias - bn2.weight * running_mean / sqrt(running_var + eps)`` whatever the input, and no gradient reaches
its weights again (bn1's zero scale and ReLU's zero slope at 0 stop them), so it costs a block's time for ever and
learns nothing. Channel pruning alone keeps it at ``prune.min_width`` zero channels. With ``constant=True``,
:func:`dead_blocks` lists such blocks too; removing one changes the function by exactly dropping ``c`` from the
block's sum (``relu(x + c)`` becomes ``x``), which :func:`branch_constant` gives for the event log.

On this CPU a block costs more time than its FLOPs suggest (batch norm, ReLU and the residual add are memory-bound
and do not shrink with the inner width), so removing blocks shortens training far more than thinning them:
``benchmarks/prune_costs.py`` measures it.

>>> from bonsai.models.arch import preset
>>> from bonsai.models.resnet import build
>>> m = build(preset("resnet20"))
>>> remove_blocks_(m, [(0, 2), (1, 1)])
>>> [s.depth for s in m.spec.stages]
[2, 2, 3]
"""

from __future__ import annotations

import torch

from bonsai.errors import BonsaiError
from bonsai.models.resnet import BasicBlock, ResNet


def branch_params(block: BasicBlock) -> list[torch.Tensor]:
    """The residual branch's parameters: both convs' weights and both BNs' scales and shifts."""
    return [block.conv1.weight, block.bn1.weight, block.bn1.bias, block.conv2.weight, block.bn2.weight, block.bn2.bias]


def _small(t: torch.Tensor, threshold: float) -> bool:
    return t.numel() == 0 or float(t.detach().abs().max()) <= threshold


def stuck(block: BasicBlock, threshold: float, bn_only: bool = False) -> bool:
    """Whether every inner channel of ``block`` is dead, so that its branch outputs a constant (module docstring;
    ``bn_only``: bn1's scales and shifts alone decide whether the inner channels are dead)."""
    writers = (bn_only or _small(block.conv1.weight, threshold)) and _small(block.bn1.weight, threshold) and _small(block.bn1.bias, threshold)
    return writers or _small(block.conv2.weight, threshold)


@torch.no_grad()
def branch_constant(block: BasicBlock) -> torch.Tensor:
    """The per-channel constant a :func:`stuck` block's branch outputs in eval mode."""
    bn = block.bn2
    return bn.bias - bn.weight * bn.running_mean / torch.sqrt(bn.running_var + bn.eps)


@torch.no_grad()
def dead_blocks(model: ResNet, threshold: float, constant: bool = False, bn_only: bool = False) -> list[tuple[int, int]]:
    """(stage, block) of the blocks whose residual branch has ``max |w| <= threshold`` everywhere (``bn_only``: in
    bn2's scales and shifts, which make the branch output zero whatever its convs) and, if ``constant``, of the
    :func:`stuck` ones, that can be removed while every stage keeps at least one block (when all of a stage's blocks
    qualify, its first stays)."""
    out = []
    for s, stage in enumerate(model.stages):
        dead = [
            b
            for b, block in enumerate(stage)
            if block.shortcut is None
            and (
                all(_small(p, threshold) for p in ([block.bn2.weight, block.bn2.bias] if bn_only else branch_params(block)))
                or (constant and stuck(block, threshold, bn_only))
            )
        ]
        if len(dead) == len(stage):
            dead = dead[1:]
        out += [(s, b) for b in dead]
    return out


def remove_blocks_(model: ResNet, blocks: list[tuple[int, int]], opt: torch.optim.Optimizer | None = None) -> None:
    """Remove blocks ``(stage, block)`` (indices before any removal) from ``model`` in place.

    The removed parameters leave the optimizer's parameter groups and state; every other parameter, and its
    momentum buffer, is untouched. ``model.spec`` loses the blocks' entries. Exact when each removed block's residual
    branch is zero (see the module docstring); otherwise the network changes.
    """
    blocks = sorted(set((int(s), int(b)) for s, b in blocks))
    for s, b in blocks:
        if not 0 <= s < len(model.stages) or not 0 <= b < len(model.stages[s]):
            raise BonsaiError(f"remove_blocks_: no block {b} in stage {s}")
        if model.stages[s][b].shortcut is not None:
            raise BonsaiError(f"remove_blocks_: block {b} of stage {s} has a projection shortcut and cannot be removed")
    for s in {s for s, _ in blocks}:
        if sum(1 for t, _ in blocks if t == s) >= len(model.stages[s]):
            raise BonsaiError(f"remove_blocks_: stage {s} must keep at least one block")
    gone: set[int] = set()
    for s, b in reversed(blocks):  # descending, so earlier indices stay valid
        gone |= {id(p) for p in model.stages[s][b].parameters()}
        del model.stages[s][b]  # nn.Sequential renumbers the blocks after it, matching a network built from the spec
        del model.spec.stages[s].inner[b]
    if opt is not None:
        for group in opt.param_groups:
            group["params"] = [p for p in group["params"] if id(p) not in gone]
        for p in [p for p in opt.state if id(p) in gone]:
            del opt.state[p]
    model.spec.validate()


def layout(model: ResNet) -> tuple:
    """What caches keyed on the network's shape must check: every width and every stage's depth."""
    return tuple(model.spec.widths()), tuple(s.depth for s in model.spec.stages)

