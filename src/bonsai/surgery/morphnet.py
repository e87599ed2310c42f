"""MorphNet's width-multiplier step (Gordon et al., CVPR 2018), on weights that are kept.

MorphNet alternates a shrink step, a FLOP-weighted sparsity penalty that removes the channels that buy the least
(bonsai's ``--prune`` with ``prune.weighting=flops`` is exactly that), and an expand step: every width of the shrunk
network is multiplied by one factor ``omega``, the largest for which the network's FLOPs stay within the target
``zeta``. The original retrains each resulting architecture from scratch; bonsai carries the weights over instead:
:func:`resize_` grows a channel group with Net2WiderNet (:func:`bonsai.surgery.grow.widen_`, function-preserving
without its symmetry-breaking noise) and shrinks one by keeping its strongest channels.

* :func:`scaled_spec` multiplies every width (stem, residual widths, inner widths) by ``omega`` and rounds up to a
  multiple of ``round_to``, never below ``min_width``; depths stay.
* :func:`fit_multiplier` finds the largest ``omega`` whose scaled spec has at most ``zeta`` FLOPs by bisection (the
  FLOPs of ``scaled_spec(spec, omega)`` never decrease as ``omega`` grows), so the target is never exceeded.
* :func:`fit_widths` tops that spec up channel group by channel group (see there), to within one group's step of
  ``zeta`` (the tests ask for 2%).
* :func:`blocks_to_shed` (bonsai's addition, for ``--adapt``): the weakest residual blocks whose removal takes a
  network over ``zeta`` to or under it, so that a shrink removes depth before width. On this CPU a block costs more
  time than its FLOPs (batch norm, ReLU and the residual add do not shrink with the width; see
  ``benchmarks/prune_costs.py``), so a network thinned to a target runs slower than a shallower one of equal FLOPs.

>>> from bonsai.models.arch import preset
>>> spec = preset("resnet20")
>>> omega = fit_multiplier(spec, 0.5 * spec_flops(spec), round_to=1)
>>> 0.68 < omega < 0.71
True
"""

from __future__ import annotations

import copy
import math

import torch

from bonsai.errors import BonsaiError
from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import ResNet
from bonsai.surgery.channels import channel_groups, remove_channels_
from bonsai.surgery.grow import widen_


def _scale(w: int, omega: float, round_to: int, min_width: int) -> int:
    n = max(min_width, math.ceil(w * omega - 1e-9))
    return -(-n // round_to) * round_to


def scaled_spec(spec: ArchSpec, omega: float, round_to: int = 1, min_width: int = 1) -> ArchSpec:
    """``spec`` with every width times ``omega``, rounded up to a multiple of ``round_to``, at least ``min_width``."""
    if omega <= 0:
        raise BonsaiError(f"width multiplier must be > 0, got {omega}")
    out = copy.deepcopy(spec)
    out.stem = _scale(spec.stem, omega, round_to, min_width)
    for s, t in zip(spec.stages, out.stages):
        t.width = _scale(s.width, omega, round_to, min_width)
        t.inner = [_scale(w, omega, round_to, min_width) for w in s.inner]
    return out.validate()


def fit_multiplier(spec: ArchSpec, zeta: float, round_to: int = 1, min_width: int = 1, tol: float = 1e-4) -> float:
    """The largest ``omega`` (to ``tol``) with ``count_flops(scaled_spec(spec, omega)) <= zeta``.

    Raises BonsaiError when even the narrowest network allowed (every width at ``min_width``) exceeds ``zeta``."""
    flops = lambda o: spec_flops(scaled_spec(spec, o, round_to, min_width))  # noqa: E731
    floor = 1e-6  # every width at min_width (or round_to)
    if flops(floor) > zeta:
        raise BonsaiError(
            f"a FLOP target of {zeta / 1e6:.2f}M is below the narrowest network of this shape "
            f"({flops(floor) / 1e6:.2f}M with every width at {max(min_width, round_to)})"
        )
    guess = math.sqrt(zeta / spec_flops(spec))  # conv FLOPs grow about with the square of the widths
    lo, hi = guess / 2, guess * 2
    while lo > floor and flops(lo) > zeta:
        lo, hi = lo / 2, lo
    lo = max(lo, floor)
    while flops(hi) <= zeta:  # widen the bracket until it exceeds the target
        lo, hi = hi, hi * 2
        if hi > 1e4:
            raise BonsaiError(f"a FLOP target of {zeta / 1e6:.2f}M needs more than 10,000x the widths")
    while hi - lo > tol * lo:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if flops(mid) <= zeta else (lo, mid)
    return lo


def spec_flops(spec: ArchSpec, image_size: int | None = None) -> int:
    """Forward FLOPs per image, counted from the spec alone (equal to :func:`~bonsai.models.resnet.count_flops`,
    tested; fast enough for searches that try many specs)."""
    size = image_size or spec.image_size
    total = 2 * size * size * spec.in_channels * spec.stem * 9
    cin = spec.stem
    for st in spec.stages:
        for b, inner in enumerate(st.inner):
            stride = st.stride if b == 0 else 1
            out = (size - 1) // stride + 1
            first = size if st.pool and stride == 2 else out  # a pooled block's first conv runs at full resolution
            total += 2 * 9 * (first * first * cin * inner + out * out * inner * st.width)
            if stride != 1 or cin != st.width:
                total += 2 * out * out * cin * st.width
            size, cin = out, st.width
    return total + 2 * cin * spec.num_classes


def block_strength(block) -> float:
    """How much a residual block's branch adds: the root mean square of its last BN's scales and shifts, which set
    the branch's output level (its conv's output is normalised). Comparable across stages of different widths; 0
    for a branch that outputs zero (:mod:`bonsai.surgery.depth`)."""
    bn = block.bn2
    return float(torch.sqrt((bn.weight.detach().float().pow(2) + bn.bias.detach().float().pow(2)).mean()))


@torch.no_grad()
def blocks_to_shed(model: ResNet, zeta: float) -> list[tuple[int, int]]:
    """(stage, block) of the weakest blocks (:func:`block_strength`) whose removal brings the network's FLOPs to at
    most ``zeta``, weakest first: none when it is within ``zeta`` already; as many as may go when even that is not
    enough. Only blocks :func:`~bonsai.surgery.depth.remove_blocks_` can remove: no projection shortcut, and every
    stage keeps a block. Removing a block whose branch is not zero changes the function (by dropping that branch);
    after a penalty phase the weakest are close to zero."""
    spec = model.spec
    order = sorted(
        (block_strength(blk), s, b) for s, stage in enumerate(model.stages) for b, blk in enumerate(stage) if blk.shortcut is None
    )
    left = [len(stage) for stage in model.stages]
    out: list[tuple[int, int]] = []
    for _, s, b in order:
        if spec_flops(without_blocks(spec, out)) <= zeta:
            break
        if left[s] > 1:
            out.append((s, b))
            left[s] -= 1
    return out


def without_blocks(spec: ArchSpec, blocks: list[tuple[int, int]]) -> ArchSpec:
    """A copy of ``spec`` without blocks ``(stage, block)``: the spec :func:`~bonsai.surgery.depth.remove_blocks_`
    leaves (unchecked)."""
    out = copy.deepcopy(spec)
    for s, stage in enumerate(out.stages):
        stage.inner = [w for b, w in enumerate(stage.inner) if (s, b) not in blocks]
    return out


def _fields(spec: ArchSpec) -> list[list[tuple]]:
    """The spec fields of each channel group (fields in one group must keep one width)."""
    with torch.device("meta"):
        model = ResNet(spec)
    return [g.spec_fields for g in channel_groups(model)]


def get_field(spec: ArchSpec, f: tuple) -> int:
    """The width a channel group's spec field names: ("stem",), ("width", stage) or ("inner", stage, block)."""
    return spec.stem if f[0] == "stem" else spec.stages[f[1]].width if f[0] == "width" else spec.stages[f[1]].inner[f[2]]


def set_field(spec: ArchSpec, f: tuple, v: int) -> None:
    """Set the width a spec field names (see :func:`get_field`)."""
    if f[0] == "stem":
        spec.stem = v
    elif f[0] == "width":
        spec.stages[f[1]].width = v
    else:
        spec.stages[f[1]].inner[f[2]] = v


def fit_widths(spec: ArchSpec, zeta: float, round_to: int = 1, min_width: int = 1) -> tuple[ArchSpec, float]:
    """Widths for a FLOP target: ``scaled_spec`` at :func:`fit_multiplier`'s ``omega``, then topped up.

    One factor moves every width at once, so its FLOPs rise in steps (all layers of a width gain a channel at the
    same ``omega``) and can stop several percent short of ``zeta``. The top-up adds ``round_to`` channels at a
    time to the channel group furthest below ``omega`` times its starting width, among those that still fit, until
    none fits: the shape stays that of ``omega``, and FLOPs end within one group's step of ``zeta``, never above.
    Returns (spec, omega)."""
    omega = fit_multiplier(spec, zeta, round_to, min_width)
    out = scaled_spec(spec, omega, round_to, min_width)
    groups = _fields(spec)
    flops = spec_flops(out)
    while True:
        best = None
        for fields in groups:
            width = get_field(out, fields[0])
            trial = copy.deepcopy(out)
            for f in fields:
                set_field(trial, f, width + round_to)
            f_trial = spec_flops(trial)
            if f_trial <= zeta:
                ratio = width / max(omega * get_field(spec, fields[0]), 1e-9)
                if best is None or (ratio, f_trial - flops) < best[0]:
                    best = ((ratio, f_trial - flops), trial, f_trial)
        if best is None:
            return out.validate(), omega
        _, out, flops = best


@torch.no_grad()
def resize_(
    model: ResNet, target: ArchSpec, opt: torch.optim.Optimizer | None = None, generator: torch.Generator | None = None, noise: float = 0.0
) -> None:
    """Give ``model`` the widths of ``target`` (same depths), in place, carrying the weights over: a group that
    grows is widened with Net2WiderNet (the function is kept, exactly with ``noise`` 0), a group that shrinks
    keeps its strongest channels (largest squared norm over its writers' filters and BN scales and shifts; exact
    when the dropped ones are zero).
    Momentum buffers follow the weights; ``noise`` is Net2WiderNet's symmetry-breaking noise (:func:`widen_`)."""
    if [s.depth for s in target.stages] != [s.depth for s in model.spec.stages]:
        raise BonsaiError("resize_: the target has other depths than the network; widths only")
    def field(f: tuple) -> int:
        return target.stem if f[0] == "stem" else target.stages[f[1]].width if f[0] == "width" else target.stages[f[1]].inner[f[2]]

    for g in channel_groups(model):
        wants = {field(f) for f in g.spec_fields}
        if len(wants) > 1:  # e.g. the stem and an identity-shortcut first stage share one channel set
            raise BonsaiError(f"resize_: the target gives channel group {g.name} several widths {sorted(wants)}")
        want = wants.pop()
        if want > g.width:
            widen_(model, g.name, want, opt, noise=noise, generator=generator)
        elif want < g.width:
            strength = torch.zeros(g.width, device=g.writers[0][0].weight.device)
            for conv, bn in g.writers:
                strength += conv.weight.float().pow(2).sum(dim=(1, 2, 3)) + bn.weight.float().pow(2) + bn.bias.float().pow(2)
            remove_channels_(model, {g.name: strength.topk(want).indices.sort().values}, opt)
