"""PruneTrain: group lasso during training, then physically removing the channels it drove to zero.

Lym et al., "PruneTrain: Fast Neural Network Training by Dynamic Sparse Model Reconfiguration", SC'19.

* **Groups.** Every conv's output channel ``W[c]`` (together with its BN scale and shift, so that a dead channel's
  output becomes exactly zero and removing it is exact) and every conv's input channel ``W[:, k]``, plus the
  linear head's input columns. Excluded: the first conv's input (the image) and the head's outputs (the classes).
* **Penalty.** ``lambda * sum of group L2 norms``, applied as an explicit gradient after ``backward()``
  (``lasso.add_grad_(model)``): the training loss that is logged stays the plain cross-entropy.
* **lambda** comes from the lasso penalty ratio (LPR), the single knob: at the first step
  ``lambda = LPR * CE / (GL * (1 - LPR))``, so the penalty is the share LPR of the total loss; then it stays fixed.
* **Dead channels.** A channel of a channel group (see :mod:`bonsai.surgery.channels`) is dead when every writer's
  output group has ``max |w| <= threshold`` or every reader's input group has ``max |w| <= threshold`` (absolute
  values: negative weights count too).
"""

from __future__ import annotations

import torch
from torch import nn

from bonsai.models.resnet import ResNet
from bonsai.surgery.channels import channel_groups

_EPS = 1e-12  # keeps w / ||w|| finite for a group that is exactly zero


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

    def __init__(self, lpr: float = 0.2, lam: float | None = None):
        if not 0 < lpr < 1:
            raise ValueError("lpr must be in (0, 1)")
        self.lpr = lpr
        self.lam = lam
        self._pairs: tuple[ResNet, list] | None = None  # (model, its conv/BN pairs), built once per model

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

    def _walk(self, model: ResNet, add_grad: bool) -> torch.Tensor:
        if self._pairs is None or self._pairs[0] is not model:
            self._pairs = (model, _conv_bn_pairs(model))
        total = torch.zeros((), device=model.head.weight.device)
        first = model.stem[0]

        def add(p: torch.Tensor, g: torch.Tensor) -> None:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.add_(g.to(p.grad.dtype), alpha=self.lam)

        for conv, bn in self._pairs[1]:
            w = conv.weight
            sq = w.float().pow(2)
            # output channels: the filter with its BN scale and shift
            out_norm = (sq.sum(dim=(1, 2, 3)) + bn.weight.float().pow(2) + bn.bias.float().pow(2)).sqrt()
            inv = 1.0 / (out_norm + _EPS)
            scale = inv.view(-1, 1, 1, 1)
            if conv is not first:  # input channels (the image's channels are never pruned)
                in_norm = sq.sum(dim=(0, 2, 3)).sqrt()
                scale = scale + 1.0 / (in_norm + _EPS).view(1, -1, 1, 1)
            if add_grad:
                add(w, w * scale)
                add(bn.weight, bn.weight * inv)
                add(bn.bias, bn.bias * inv)
            else:
                total += out_norm.sum() + (in_norm.sum() if conv is not first else 0.0)
        h = model.head.weight  # the head's input columns
        in_norm = h.float().pow(2).sum(dim=0).sqrt()
        if add_grad:
            add(h, h / (in_norm + _EPS).view(1, -1))
        else:
            total += in_norm.sum()
        return total


@torch.no_grad()
def dead_channels(model: ResNet, threshold: float, groups: list | None = None) -> dict[str, torch.Tensor]:
    """Boolean masks (True = dead) per channel group; see the module docstring for the rule."""
    out = {}
    for g in groups if groups is not None else channel_groups(model):
        writers_dead = torch.ones(g.width, dtype=torch.bool, device=model.head.weight.device)
        for conv, bn in g.writers:
            amax = torch.maximum(conv.weight.abs().amax(dim=(1, 2, 3)), torch.maximum(bn.weight.abs(), bn.bias.abs()))
            writers_dead &= amax <= threshold
        readers_dead = torch.ones_like(writers_dead)
        for r in g.readers:
            w = r.weight
            readers_dead &= (w.abs().amax(dim=(0, 2, 3)) if w.dim() == 4 else w.abs().amax(dim=0)) <= threshold
        out[g.name] = (writers_dead | readers_dead).cpu()
    return out


@torch.no_grad()
def plan_keep(model: ResNet, threshold: float, min_width: int = 8, round_to: int = 8) -> dict[str, torch.Tensor]:
    """Channel indices to keep per group: the live ones, at least ``min_width`` (never zero), rounded up to a
    multiple of ``round_to`` (never above the current width). Extra channels are the dead ones with the largest
    weights. Only groups that shrink appear in the result."""
    keep = {}
    groups = channel_groups(model)
    masks = dead_channels(model, threshold, groups)
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
