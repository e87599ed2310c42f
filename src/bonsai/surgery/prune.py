"""PruneTrain: group lasso during training, then physically removing the channels it drove to zero.

Lym et al., "PruneTrain: Fast Neural Network Training by Dynamic Sparse Model Reconfiguration", SC'19.

* **Groups.** Every conv's output channel ``W[c]`` (together with its BN scale and shift, so that a dead channel's
  output becomes exactly zero and removing it is exact) and every conv's input channel ``W[:, k]``, plus the
  linear head's input columns. Excluded: the first conv's input (the image) and the head's outputs (the classes).
* **Penalty.** ``lambda * sum of group L2 norms``, applied in one of two visible ways, never folded into the loss
  (the training loss that is logged stays the plain cross-entropy):

  - ``lasso.prox_(model, opt)`` after ``opt.step()`` (the default, ``prune.proximal``; every ``prune.prox_every``
    steps, with that many steps' threshold at once): the proximal operator of the
    penalty, a group soft-threshold ``w <- w * max(0, 1 - tau / ||w||)`` with ``tau = lr * lambda / (1 - momentum)``
    (momentum SGD moves a weight by ``lr / (1 - momentum)`` times a steady gradient, so LPR means the same in both
    ways). A group below ``tau`` becomes exactly zero and its momentum is cleared, so it stays zero unless the loss's
    own gradient is strong enough to revive it. Short schedules need this: a plain gradient makes the norms hover
    around zero instead of reaching it.
  - ``lasso.add_grad_(model)`` after ``backward()``: the penalty's subgradient, as in the PruneTrain paper.
* **Blocks** (``depth``, on by default): the whole residual branch of every block with an identity shortcut (both
  convs, both BNs' scales and shifts) is one more group. When the proximal step drives it to zero the block is the
  identity, and :func:`bonsai.surgery.depth.remove_blocks_` removes it; on this CPU a removed block saves far more
  time than thinning it (memory-bound BN, ReLU and add do not shrink with the inner width). A block whose inner
  channels all died while bn2's shift did not is stuck (its branch adds a constant and can no longer learn); it is
  removed too, dropping the constant (:mod:`bonsai.surgery.depth`).
* **Group weights** (``weighting``): ``flops`` (the default) weighs each group by the multiply-adds per image that
  removing it saves (a channel: its share of its conv; a block: both its convs), so the penalty is a convex
  stand-in for the network's FLOPs; ``size`` by the square root of the group's size; ``none`` by 1.
* **lambda** comes from the lasso penalty ratio (LPR), the single knob: at the first step
  ``lambda = LPR * CE / (GL * (1 - LPR))``, so the penalty is the share LPR of the total loss; then it stays fixed.
* **BN groups** (``groups="bn"``; ``"weights"``, PruneTrain's, is the default). Every conv here feeds a BN, which
  normalizes each output channel: scaling a conv's filter changes nothing but its effective learning rate (the
  gradient scales with the inverse of the filter's norm). A penalty on the filters therefore shrinks every live
  filter too, and raises every layer's effective learning rate while it lasts. With ``"bn"`` the groups are each
  channel's BN scale and shift (Network Slimming's and MorphNet's gamma penalty, made group-wise) and, for blocks,
  bn2's scales and shifts; a channel whose BN scale and shift are zero outputs exactly zero whatever its filter, and
  a block whose bn2 is all zero is the identity, so removing either stays exact. No input-channel or head groups:
  a dead writer already silences its readers.
* **Dead channels.** A channel of a channel group (see :mod:`bonsai.surgery.channels`) is dead when every writer's
  output group has ``max |w| <= threshold`` or every reader's input group has ``max |w| <= threshold`` (absolute
  values: negative weights count too); with ``groups="bn"``, when every writer's BN scale and shift are.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from bonsai.models.resnet import BasicBlock, ResNet
from bonsai.surgery.channels import channel_groups
from bonsai.surgery.depth import branch_params, layout

_EPS = 1e-12  # keeps w / ||w|| finite for a group that is exactly zero
WEIGHTINGS = ("flops", "size", "none")
GROUPS = ("weights", "bn")


@torch.no_grad()
def _output_pixels(model: ResNet) -> dict[nn.Conv2d, int]:
    """Output pixels (H x W) of every conv at the architecture's working image size, from one tiny forward pass in
    eval mode (BN statistics untouched)."""
    pixels: dict[nn.Conv2d, int] = {}
    hooks = [
        m.register_forward_hook(lambda mod, _inp, out: pixels.__setitem__(mod, out.shape[-2] * out.shape[-1]))
        for m in model.modules()
        if isinstance(m, nn.Conv2d)
    ]
    was_training = model.training
    try:
        model.eval()
        size = model.spec.image_size
        model(torch.zeros(1, model.spec.in_channels, size, size, device=model.head.weight.device))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return pixels


def _conv_bn_pairs(model: ResNet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
    """Every conv with the BN after it. Surgery edits these modules in place, so the list stays valid."""
    return [pair for g in channel_groups(model) for pair in g.writers]


class GroupLasso:
    """Group-lasso penalty over channels, added to gradients after ``backward()``.

    >>> from bonsai.models.arch import preset
    >>> from bonsai.models.resnet import build
    >>> model = build(preset("resnet8"))
    >>> lasso = GroupLasso(lpr=0.2)
    >>> lasso.set_lambda(ce=2.0, model=model) > 0
    True
    """

    def __init__(self, lpr: float = 0.2, lam: float | None = None, weighting: str = "flops", depth: bool = True, groups: str = "weights"):
        if not 0 < lpr < 1:
            raise ValueError("lpr must be in (0, 1)")
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}")
        if groups not in GROUPS:
            raise ValueError(f"groups must be one of {', '.join(GROUPS)}")
        self.lpr = lpr
        self.bn_only = groups == "bn"
        self.lam = lam
        self.weighting = weighting
        self.depth = depth
        self._rows: tuple | None = None  # (model, its layout, channel rows, block rows): rebuilt only after surgery

    @torch.no_grad()
    def penalty(self, model: ResNet) -> torch.Tensor:
        """Sum of all group norms (without lambda)."""
        return self._walk(model, add_grad=False)

    def set_lambda(self, ce: float, model: ResNet) -> float:
        """lambda such that lambda * GL is the share ``lpr`` of CE + lambda * GL."""
        gl = float(self.penalty(model))
        self.lam = self.lpr * ce / (max(gl, _EPS) * (1 - self.lpr))
        return self.lam

    @torch.no_grad()
    def add_grad_(self, model: ResNet) -> None:
        """``p.grad += lambda * d(sum of group norms)/dp`` for every grouped parameter."""
        if self.lam is None:
            raise RuntimeError("GroupLasso.add_grad_ before set_lambda")
        self._walk(model, add_grad=True)

    @torch.no_grad()
    def prox_(self, model: ResNet, opt: torch.optim.Optimizer, steps: int = 1) -> None:
        """Group soft-threshold of every group (see the module docstring), after ``opt.step()``.

        Output groups are thresholded first, then input groups, then blocks. ``steps``: the penalty of that many
        steps at once (``tau`` times ``steps``), for applying it every few steps only: it costs a few dozen small
        tensor operations per conv, several percent of a small network's step on a CPU."""
        if self.lam is None:
            raise RuntimeError("GroupLasso.prox_ before set_lambda")
        g0 = opt.param_groups[0]
        tau = steps * g0["lr"] * self.lam / (1.0 - g0.get("momentum", 0.0))

        def shrink(params: list[torch.Tensor], norm: torch.Tensor, weight: float, shape) -> None:
            factor = (1.0 - tau * weight / norm.clamp_min(_EPS)).clamp_min(0.0)
            dead = factor == 0
            any_dead = bool(dead.any())
            for p in params:
                p.mul_(factor.view(shape).to(p.dtype))
                buf = opt.state.get(p, {}).get("momentum_buffer")
                if buf is not None and any_dead:
                    buf.mul_((~dead).view(shape).to(buf.dtype))

        for conv, bn, w_out, w_in in self._groups(model):
            w = conv.weight
            out_norm = bn.weight.float().pow(2) + bn.bias.float().pow(2)
            if self.bn_only:
                shrink([bn.weight, bn.bias], out_norm.sqrt(), w_out, (-1,))
                continue
            out_norm = (out_norm + w.float().pow(2).sum(dim=(1, 2, 3))).sqrt()
            shrink([w], out_norm, w_out, (-1, 1, 1, 1))
            shrink([bn.weight, bn.bias], out_norm, w_out, (-1,))
            if w_in:
                shrink([w], w.float().pow(2).sum(dim=(0, 2, 3)).sqrt(), w_in, (1, -1, 1, 1))
        if not self.bn_only:
            h = model.head.weight
            shrink([h], h.float().pow(2).sum(dim=0).sqrt(), self._head_weight(model), (1, -1))
        for block, w_block in self._blocks(model):
            params = self._block_params(block)
            norm = sum(p.float().pow(2).sum() for p in params).sqrt().view(1)
            for p in params:
                shrink([p], norm, w_block, (1,) * p.dim())

    def _groups(self, model: ResNet) -> list[tuple[nn.Conv2d, nn.BatchNorm2d, float, float]]:
        """(conv, bn, output-group weight, input-group weight or 0 for the image's channels) per conv; see
        ``weighting``. Cached until surgery changes the network's shape."""
        return self._cache(model)[0]

    def _blocks(self, model: ResNet) -> list[tuple[BasicBlock, float]]:
        """(block, weight) of every block whose residual branch is a group (identity shortcut), if ``depth``."""
        return self._cache(model)[1]

    def _block_params(self, block: BasicBlock) -> list[torch.Tensor]:
        """A block's group: its whole residual branch, or with ``groups="bn"`` bn2's scales and shifts."""
        return [block.bn2.weight, block.bn2.bias] if self.bn_only else branch_params(block)

    def invalidate(self) -> None:
        """Forget the cached groups: call after any surgery (a removed block and an inserted one can leave the
        widths and depths as they were, while the modules are others)."""
        self._rows = None

    def _cache(self, model: ResNet) -> tuple[list, list]:
        shape = layout(model)
        if self._rows is not None and self._rows[0] is model and self._rows[1] == shape:
            return self._rows[2], self._rows[3]
        pixels = _output_pixels(model)
        first = model.stem[0]
        rows = []
        for conv, bn in _conv_bn_pairs(model):
            o, i, kh, kw = conv.weight.shape
            if self.weighting == "flops":  # multiply-adds per image that one output / input channel costs
                w_out, w_in = pixels[conv] * i * kh * kw, pixels[conv] * o * kh * kw
            elif self.weighting == "size":
                w_out, w_in = math.sqrt(2 if self.bn_only else i * kh * kw + 2), math.sqrt(o * kh * kw)
            else:
                w_out, w_in = 1.0, 1.0
            rows.append((conv, bn, float(w_out), 0.0 if conv is first or self.bn_only else float(w_in)))
        blocks = []
        for stage in model.stages if self.depth else ():
            for block in stage:
                if block.shortcut is not None:
                    continue
                if self.weighting == "flops":  # both convs' multiply-adds per image
                    w = sum(pixels[c] * c.weight[0].numel() * c.out_channels for c in (block.conv1, block.conv2))
                elif self.weighting == "size":
                    w = math.sqrt(sum(p.numel() for p in self._block_params(block)))
                else:
                    w = 1.0
                blocks.append((block, float(w)))
        self._rows = (model, shape, rows, blocks)
        return rows, blocks

    def _head_weight(self, model: ResNet) -> float:
        n = model.head.weight.shape[0]
        return {"flops": float(n), "size": math.sqrt(n)}.get(self.weighting, 1.0)

    def _walk(self, model: ResNet, add_grad: bool) -> torch.Tensor:
        total = torch.zeros((), device=model.head.weight.device)

        def add(p: torch.Tensor, g: torch.Tensor) -> None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g.to(p.grad.dtype), alpha=self.lam)

        for conv, bn, w_out, w_in in self._groups(model):
            w = conv.weight
            sq = None if self.bn_only else w.float().pow(2)
            # output channels: the filter with its BN scale and shift (with groups="bn": the scale and shift only)
            out_norm = bn.weight.float().pow(2) + bn.bias.float().pow(2)
            out_norm = (out_norm if sq is None else out_norm + sq.sum(dim=(1, 2, 3))).sqrt()
            inv = w_out / (out_norm + _EPS)
            scale = inv.view(-1, 1, 1, 1)
            if w_in:  # input channels (the image's channels are never pruned)
                in_norm = sq.sum(dim=(0, 2, 3)).sqrt()
                scale = scale + w_in / (in_norm + _EPS).view(1, -1, 1, 1)
            if add_grad:
                if not self.bn_only:
                    add(w, w * scale)
                add(bn.weight, bn.weight * inv)
                add(bn.bias, bn.bias * inv)
            else:
                total += w_out * out_norm.sum() + (w_in * in_norm.sum() if w_in else 0.0)
        if not self.bn_only:
            h = model.head.weight  # the head's input columns
            w_h = self._head_weight(model)
            in_norm = h.float().pow(2).sum(dim=0).sqrt()
            if add_grad:
                add(h, w_h * h / (in_norm + _EPS).view(1, -1))
            else:
                total += w_h * in_norm.sum()
        for block, w_block in self._blocks(model):  # whole residual branches (or their bn2)
            params = self._block_params(block)
            norm = sum(p.float().pow(2).sum() for p in params).sqrt()
            if add_grad:
                for p in params:
                    add(p, w_block * p / (norm + _EPS))
            else:
                total += w_block * norm
        return total


@torch.no_grad()
def dead_channels(model: ResNet, threshold: float, groups: list | None = None, bn_only: bool = False) -> dict[str, torch.Tensor]:
    """Boolean masks (True = dead) per channel group; see the module docstring for the rule (``bn_only``: the
    writers' BN scales and shifts alone decide, as for ``GroupLasso(groups="bn")``)."""
    out = {}
    for g in groups if groups is not None else channel_groups(model):
        writers_dead = torch.ones(g.width, dtype=torch.bool, device=model.head.weight.device)
        for conv, bn in g.writers:
            amax = torch.maximum(bn.weight.abs(), bn.bias.abs())
            if not bn_only:
                amax = torch.maximum(conv.weight.abs().amax(dim=(1, 2, 3)), amax)
            writers_dead &= amax <= threshold
        readers_dead = torch.ones_like(writers_dead)
        for r in g.readers:
            w = r.weight
            readers_dead &= (w.abs().amax(dim=(0, 2, 3)) if w.dim() == 4 else w.abs().amax(dim=0)) <= threshold
        out[g.name] = (writers_dead | readers_dead).cpu()
    return out


@torch.no_grad()
def plan_keep(model: ResNet, threshold: float, min_width: int = 8, round_to: int = 8, bn_only: bool = False) -> dict[str, torch.Tensor]:
    """Channel indices to keep per group: the live ones, at least ``min_width`` (never zero), rounded up to a
    multiple of ``round_to`` (never above the current width). Extra channels are the dead ones with the largest
    weights. Only groups that shrink appear in the result."""
    keep = {}
    groups = channel_groups(model)
    masks = dead_channels(model, threshold, groups, bn_only)
    for g in groups:
        dead = masks[g.name]
        alive = int((~dead).sum())
        n = max(alive, min(min_width, g.width), 1)
        if round_to > 1:
            n = min(g.width, -(-n // round_to) * round_to)
        if n >= g.width:
            continue
        score = _channel_strength(g).cpu()
        score[~dead] = float("inf")  # live channels are always kept
        keep[g.name] = score.topk(n).indices.sort().values.cpu()
    return keep


def _channel_strength(g) -> torch.Tensor:
    s = torch.zeros(g.width, device=g.writers[0][0].weight.device)
    for conv, bn in g.writers:
        s += conv.weight.float().pow(2).sum(dim=(1, 2, 3)) + bn.weight.float().pow(2) + bn.bias.float().pow(2)
    return s
