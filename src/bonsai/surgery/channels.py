"""Channel groups of a ResNet, and removing channels from them in place, optimizer state included.

A *channel group* is one channel space: the convs (with their BNs) that write it and the layers that read it.
Every block's inner width is its own group. All convs that write into the same residual sum share one group
(channel union): each block's second conv of a stage, the stage's projection shortcut, and, where a stage starts
with an identity shortcut, the previous stage's group (or the stem) as well. Removing channel ``c`` of a group
slices output channel ``c`` out of every writer (conv weight, BN scale/shift/running statistics) and input
channel ``c`` out of every reader (conv or the linear head), so the network stays a plain dense network with no
index tensors in its forward pass; the ArchSpec is updated to match.

>>> from bonsai.models.arch import preset
>>> from bonsai.models.resnet import build
>>> [g.name for g in channel_groups(build(preset("resnet8")))]
['stem+s0', 's0b0.inner', 's1b0.inner', 's1', 's2b0.inner', 's2']
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from bonsai.errors import BonsaiError
from bonsai.models.resnet import ResNet


@dataclass(eq=False)
class ChannelGroup:
    """One channel space: its writers (conv + BN), its readers, and which ArchSpec fields give its width."""

    name: str
    writers: list[tuple[nn.Conv2d, nn.BatchNorm2d]] = field(default_factory=list)
    readers: list[nn.Module] = field(default_factory=list)  # nn.Conv2d (input dim 1) or nn.Linear (input dim 1)
    spec_fields: list[tuple] = field(default_factory=list)  # ("stem",), ("width", s) or ("inner", s, b)

    @property
    def width(self) -> int:
        return self.writers[0][0].out_channels


def channel_groups(model: ResNet) -> list[ChannelGroup]:
    """The channel groups of ``model`` in forward order (see the module docstring)."""
    cur = ChannelGroup("stem", writers=[(model.stem[0], model.stem[1])], spec_fields=[("stem",)])
    groups = [cur]
    for s, stage in enumerate(model.stages):
        for b, block in enumerate(stage):
            cur.readers.append(block.conv1)
            groups.append(ChannelGroup(f"s{s}b{b}.inner", [(block.conv1, block.bn1)], [block.conv2], [("inner", s, b)]))
            if block.shortcut is not None:
                cur.readers.append(block.shortcut[0])
                cur = ChannelGroup(f"s{s}", writers=[(block.shortcut[0], block.shortcut[1])], spec_fields=[("width", s)])
                groups.append(cur)
            elif b == 0:
                # identity shortcut at the stage start: the stage adds into the previous channel space
                cur.name += f"+s{s}"
                cur.spec_fields.append(("width", s))
            cur.writers.append((block.conv2, block.bn2))
    cur.readers.append(model.head)
    return groups


def _slice_(p: torch.Tensor, dim: int, idx: torch.Tensor, opt: torch.optim.Optimizer | None) -> None:
    """Keep entries ``idx`` along ``dim`` of a parameter or buffer, in place; its momentum buffer likewise.

    The tensor object is kept (only ``.data`` changes), so the optimizer's param_groups and state stay attached.
    """
    cl = p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    old_shape = p.shape
    p.data = p.data.index_select(dim, idx.to(p.device)).contiguous(memory_format=fmt)
    if isinstance(p, nn.Parameter):
        p.grad = None
        state = opt.state.get(p, {}) if opt is not None else {}
        for k, buf in state.items():
            if torch.is_tensor(buf) and buf.shape == old_shape:  # per-element state such as momentum_buffer
                state[k] = buf.index_select(dim, idx.to(buf.device)).contiguous(memory_format=fmt)


def remove_channels_(model: ResNet, keep: dict[str, torch.Tensor], opt: torch.optim.Optimizer | None = None) -> None:
    """Keep only channels ``keep[group_name]`` (sorted indices) of each named group, in place.

    Writers lose output channels (conv weight, BN weight/bias/running_mean/running_var), readers lose input
    channels, momentum buffers are sliced with the same indices, and ``model.spec`` gets the new widths. A channel
    whose writers are all zero (conv filter and BN scale/shift) is removed without changing the network's output.

    >>> from bonsai.models.arch import preset
    >>> from bonsai.models.resnet import build
    >>> m = build(preset("resnet8"))
    >>> remove_channels_(m, {"s0b0.inner": torch.arange(10)})
    >>> m.spec.stages[0].inner
    [10]
    """
    groups = {g.name: g for g in channel_groups(model)}
    unknown = set(keep) - set(groups)
    if unknown:
        raise BonsaiError(f"remove_channels_: unknown channel groups {sorted(unknown)} (have {sorted(groups)})")
    for name, idx in keep.items():
        g = groups[name]
        idx = torch.as_tensor(idx, dtype=torch.long).unique(sorted=True)
        if len(idx) == 0 or idx[0] < 0 or idx[-1] >= g.width:
            raise BonsaiError(f"remove_channels_: group {name} must keep 1..{g.width} valid channel indices")
        if len(idx) == g.width:
            continue
        for conv, bn in g.writers:
            _slice_(conv.weight, 0, idx, opt)
            conv.out_channels = len(idx)
            for t in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
                _slice_(t, 0, idx, opt)
            bn.num_features = len(idx)
        for r in g.readers:
            _slice_(r.weight, 1, idx, opt)
            if isinstance(r, nn.Conv2d):
                r.in_channels = len(idx)
            else:
                r.in_features = len(idx)
        for f in g.spec_fields:
            if f[0] == "stem":
                model.spec.stem = len(idx)
            elif f[0] == "width":
                model.spec.stages[f[1]].width = len(idx)
            else:
                model.spec.stages[f[1]].inner[f[2]] = len(idx)
    model.spec.validate()
