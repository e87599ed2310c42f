"""Growing a network without changing its function (Net2Net: Chen, Goodfellow & Shlens, ICLR 2016).

* :func:`widen_` (Net2WiderNet) grows one channel group (see :mod:`bonsai.surgery.channels`: a block's inner width,
  or a residual stage's width with every conv writing into that stream) from ``n`` to ``m`` channels. New channel
  ``j`` copies a randomly chosen existing channel ``g(j)``: every writer's filter, BN scale, shift and running
  statistics. Copies of a channel then produce identical activations, in training mode (same batch statistics) and
  in eval mode. Every reader's input weights of a replicated channel, the original's included, are divided by its
  number of copies, so the readers see the same sums. With ``noise > 0`` the copies' filters get relative Gaussian
  noise to break their symmetry (the function then changes slightly).
* :func:`deepen_` (Net2DeeperNet) inserts a BasicBlock with an identity shortcut into a stage. Its convs get the
  usual He initialisation and its first BN the usual scale 1; its last BN's scale and shift are zero, so the
  residual branch outputs exactly zero and the block computes ``relu(x) = x`` (its input is the output of a ReLU).
  The alternative, Dirac kernels with BN undoing the statistics, would be exact only in eval mode: in training, BN
  renormalises by the batch's statistics. A zero last scale is exact in both modes, and the block trains because
  the gradient of that scale is not zero (the branch's convs are random, not zero).
* :func:`pad_widths_` rounds every channel group's width up to a multiple (e.g. 16, for int8 kernels) with
  channels that are exactly zero: zero filters, BN scale, shift and running mean zero (running variance one), and
  zero input weights in every reader. A zero channel stays zero through BN and ReLU, in both modes, so the function
  is kept exactly; unlike copies, it leaves the existing weights (and their quantization scales) untouched. For
  inference only: the optimizer is not told.
* **Optimizer state.** New parameters in an existing tensor get their momentum copied and scaled exactly like the
  weights (copied for a writer's new filters, divided by the copy count for a reader's inputs). The momentum is a
  velocity in weight space: scaled like the weights, the next step's momentum part moves the widened network's
  function exactly as it would have moved the original one (tested). An inserted block's parameters join the
  optimizer's parameter groups (weight decay for conv weights only, as the engine sets it up) with no state.

>>> from bonsai.models.arch import preset
>>> from bonsai.models.resnet import build
>>> m = build(preset("resnet20"))
>>> src = widen_(m, "s1", 48)  # the channel each new one copies
>>> block = deepen_(m, stage=2, index=1)
>>> m.spec.stages[1].width, m.spec.stages[2].depth
(48, 4)
"""

from __future__ import annotations

import torch
from torch import nn

from bonsai.errors import BonsaiError
from bonsai.models.resnet import BasicBlock, ResNet
from bonsai.surgery.channels import channel_groups


def _memory_format(p: torch.Tensor) -> torch.memory_format:
    """The layout a grown copy of ``p`` keeps: channels_last for a channels_last conv weight."""
    cl = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format


def _extend_(p: torch.Tensor, dim: int, idx: torch.Tensor, divide: torch.Tensor | None, opt, noise: float, gen) -> None:
    """Append ``p``'s entries ``idx`` along ``dim`` (and the same for its momentum buffer); then, if ``divide`` is
    given (one count per entry along ``dim`` after growing), divide every entry by its count. In place: the tensor
    object stays, so the optimizer keeps tracking it."""
    fmt = _memory_format(p)
    idx = idx.to(p.device)

    def grow(t: torch.Tensor, add_noise: bool) -> torch.Tensor:
        extra = t.index_select(dim, idx)
        if add_noise and noise > 0:
            extra = extra + noise * extra.std(correction=0) * torch.randn(extra.shape, generator=gen).to(extra)
        out = torch.cat([t, extra], dim=dim)
        if divide is not None:
            shape = [1] * t.dim()
            shape[dim] = -1
            out = out / divide.to(out).view(shape)
        return out.contiguous(memory_format=fmt)

    old_shape = p.shape
    p.data = grow(p.data, add_noise=isinstance(p, nn.Parameter) and divide is None and p.dim() > 1)
    if isinstance(p, nn.Parameter):
        p.grad = None
        state = opt.state.get(p, {}) if opt is not None else {}
        for k, buf in state.items():
            if torch.is_tensor(buf) and buf.shape == old_shape:
                state[k] = grow(buf, add_noise=False)


@torch.no_grad()
def widen_(
    model: ResNet,
    group: str,
    width: int,
    opt: torch.optim.Optimizer | None = None,
    noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Grow channel group ``group`` (a name from :func:`~bonsai.surgery.channels.channel_groups`, e.g. ``"s1"`` or
    ``"s0b2.inner"``) to ``width`` channels, in place; see the module docstring. Returns the source channel of
    every new channel."""
    groups = {g.name: g for g in channel_groups(model)}
    if group not in groups:
        raise BonsaiError(f"widen_: unknown channel group {group!r} (have {sorted(groups)})")
    g = groups[group]
    n = g.width
    if width < n:
        raise BonsaiError(f"widen_: group {group} has {n} channels; widening to {width} would shrink it")
    if width == n:
        return torch.zeros(0, dtype=torch.long)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    # every channel is copied once before any is copied twice, so growth spreads evenly over the units
    order = torch.cat([torch.randperm(n, generator=gen) for _ in range(-(-(width - n) // n))])
    src = order[: width - n]
    counts = torch.ones(n).index_add_(0, src, torch.ones(width - n))
    per_channel = torch.cat([counts, counts[src]])  # every channel's number of copies, new ones included
    for conv, bn in g.writers:
        _extend_(conv.weight, 0, src, None, opt, noise, gen)
        conv.out_channels = width
        for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
            _extend_(t, 0, src, None, opt, 0.0, gen)
        bn.num_features = width
    for r in g.readers:
        _extend_(r.weight, 1, src, per_channel, opt, 0.0, gen)
        if isinstance(r, nn.Conv2d):
            r.in_channels = width
        else:
            r.in_features = width
    _set_width(model, g, width)
    model.spec.validate()
    return src


def _set_width(model: ResNet, g, width: int) -> None:
    """Record channel group ``g``'s new width in every ArchSpec field that gives it."""
    for f in g.spec_fields:
        if f[0] == "stem":
            model.spec.stem = width
        elif f[0] == "width":
            model.spec.stages[f[1]].width = width
        else:
            model.spec.stages[f[1]].inner[f[2]] = width


@torch.no_grad()
def deepen_(model: ResNet, stage: int, index: int, inner: int | None = None, opt: torch.optim.Optimizer | None = None) -> BasicBlock:
    """Insert an identity-initialised BasicBlock as block ``index`` of ``stage`` (1 <= index <= depth: after the
    stage's first block, which may change stride or width), with ``inner`` channels (default: the stage's width);
    see the module docstring. Returns the new block."""
    if not 0 <= stage < len(model.stages):
        raise BonsaiError(f"deepen_: no stage {stage} (the network has {len(model.stages)})")
    blocks = model.stages[stage]
    if not 1 <= index <= len(blocks):
        raise BonsaiError(f"deepen_: a block goes after the stage's first one: index must be in 1..{len(blocks)}")
    width = model.spec.stages[stage].width
    inner = width if inner is None else int(inner)
    if inner < 1:
        raise BonsaiError("deepen_: the new block needs at least one inner channel")
    ref = blocks[0].conv2.weight
    block = BasicBlock(width, inner, width, 1)
    for m in block.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    nn.init.zeros_(block.bn2.weight)
    nn.init.zeros_(block.bn2.bias)
    fmt = torch.channels_last if ref.is_contiguous(memory_format=torch.channels_last) and not ref.is_contiguous() else torch.contiguous_format
    block = block.to(device=ref.device, dtype=ref.dtype, memory_format=fmt)
    block.train(blocks.training)
    mods = list(blocks)
    mods.insert(index, block)
    model.stages[stage] = nn.Sequential(*mods)
    model.spec.stages[stage].inner.insert(index, inner)
    model.spec.validate()
    if opt is not None:
        decay = [g for g in opt.param_groups if g.get("weight_decay", 0) > 0]
        plain = [g for g in opt.param_groups if g.get("weight_decay", 0) == 0]
        for p in block.parameters():
            target = (decay or plain) if p.ndim > 1 else (plain or decay)
            target[0]["params"].append(p)
    return block


@torch.no_grad()
def pad_widths_(model: ResNet, multiple: int) -> dict[str, tuple[int, int]]:
    """Round every channel group's width up to a multiple of ``multiple`` with zero channels, in place (see the
    module docstring); returns ``{group: (old, new)}`` for the groups that grew. For inference: kernels such as
    onnxruntime's int8 convolutions run full tiles only on multiples of 16 channels."""
    if multiple < 1:
        raise BonsaiError(f"pad_widths_: multiple must be >= 1, got {multiple}")

    def pad(p: torch.Tensor, dim: int, extra: int, value: float = 0.0) -> None:
        shape = list(p.shape)
        shape[dim] = extra
        zeros = torch.full(shape, value, dtype=p.dtype, device=p.device)
        p.data = torch.cat([p.data, zeros], dim=dim).contiguous(memory_format=_memory_format(p))

    grown = {}
    for g in channel_groups(model):
        n = g.width
        width = -(-n // multiple) * multiple
        if width == n:
            continue
        for conv, bn in g.writers:
            pad(conv.weight, 0, width - n)
            conv.out_channels = width
            for t, value in ((bn.weight, 0.0), (bn.bias, 0.0), (bn.running_mean, 0.0), (bn.running_var, 1.0)):
                pad(t, 0, width - n, value)
            bn.num_features = width
        for r in g.readers:
            pad(r.weight, 1, width - n)
            if isinstance(r, nn.Conv2d):
                r.in_channels = width
            else:
                r.in_features = width
        _set_width(model, g, width)
        grown[g.name] = (n, width)
    model.spec.validate()
    return grown
