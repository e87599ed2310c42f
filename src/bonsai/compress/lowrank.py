"""Low-rank factorization of convolutions by SVD, kept only where it is measured to be faster.

A conv's kernel W (out, in, k, k) reshaped to a matrix (out, in*k*k) is split by SVD, W ~ U_r S_r V_r^T, into two
thinner convs: ``in -> r`` with the original k x k kernel, stride and padding (rows of V_r^T), then a 1x1
``r -> out`` (U_r S_r) carrying the original bias. At full rank the pair computes the same function. The rank is
the smallest that keeps ``energy`` of the squared singular values. A layer is factorized only when its rank saves
multiply-adds, r * (in*k*k + out) < out * in*k*k, and when the pair runs faster than the original conv on this
machine at the layer's own input shape (median of timed forward passes at batch 64).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from torch import nn


def rank_for_energy(singular_values: torch.Tensor, energy: float) -> int:
    """Smallest r whose first r singular values hold ``energy`` of the total squared sum (at least 1)."""
    e = singular_values.double() ** 2
    share = torch.cumsum(e, 0) / e.sum().clamp_min(1e-30)
    return int(min(len(e), int((share < energy - 1e-12).sum()) + 1))


@torch.no_grad()
def factorize_conv(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The two-conv factorization of ``conv`` at ``rank`` (grouped and dilated convs are not supported)."""
    if conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError("only dense, undilated convs can be factorized")
    out_c, in_c, kh, kw = conv.weight.shape
    u, s, vh = torch.linalg.svd(conv.weight.detach().double().reshape(out_c, in_c * kh * kw), full_matrices=False)
    r = max(1, min(rank, len(s)))
    first = nn.Conv2d(in_c, r, (kh, kw), stride=conv.stride, padding=conv.padding, bias=False)
    second = nn.Conv2d(r, out_c, 1, bias=conv.bias is not None)
    first.weight.copy_(vh[:r].reshape(r, in_c, kh, kw).to(conv.weight.dtype))
    second.weight.copy_((u[:, :r] * s[:r]).reshape(out_c, r, 1, 1).to(conv.weight.dtype))
    if conv.bias is not None:
        second.bias.copy_(conv.bias)
    return nn.Sequential(first, second).to(conv.weight.device)


def _median_ms(module: nn.Module, x: torch.Tensor, repeats: int) -> float:
    with torch.no_grad():
        module(x)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


def _input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes, hooks = {}, []
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(lambda mod, inp, out, n=name: shapes.__setitem__(n, tuple(inp[0].shape[1:]))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def factorize(model: nn.Module, example: torch.Tensor, energy: float = 0.9, batch: int = 64, repeats: int = 7, timed: bool = True) -> tuple[nn.Module, list[dict]]:
    """A copy of ``model`` with every conv replaced by its factorization where that pays (see the module doc);
    returns (copy, one record per conv: name, shape, rank, FLOPs share kept, times, whether it was replaced)."""
    model = copy.deepcopy(model).eval()
    shapes = _input_shapes(model, example)
    records = []
    for name, conv in list(model.named_modules()):
        if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or name not in shapes:
            continue
        out_c, in_c, kh, kw = conv.weight.shape
        s = torch.linalg.svdvals(conv.weight.detach().double().reshape(out_c, in_c * kh * kw))
        r = rank_for_energy(s, energy)
        ratio = r * (in_c * kh * kw + out_c) / (out_c * in_c * kh * kw)
        rec = {"conv": name, "out": out_c, "in": in_c, "kernel": kh, "rank": r, "max_rank": len(s), "flops_ratio": round(ratio, 3), "replaced": False}
        if ratio < 1:
            pair = factorize_conv(conv, r)
            if timed:
                x = torch.randn(batch, *shapes[name])
                rec["ms_before"] = round(_median_ms(conv, x, repeats), 3)
                rec["ms_after"] = round(_median_ms(pair, x, repeats), 3)
            if not timed or rec["ms_after"] < rec["ms_before"]:
                parent_name, _, attr = name.rpartition(".")
                parent = model.get_submodule(parent_name) if parent_name else model
                if attr.isdigit():  # inside an nn.Sequential (the stem, a shortcut)
                    parent[int(attr)] = pair
                else:
                    setattr(parent, attr, pair)
                rec["replaced"] = True
        records.append(rec)
    return model, records


def finetune_(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: float = 1.0, lr: float = 0.02, batch: int = 256, seed: int = 0,
    translate: int | None = None, teacher: nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.5,
    hook: Callable[[int, int], None] | None = None,
) -> nn.Module:
    """A short fine-tune after factorizing, in place: SGD (Nesterov momentum 0.9, weight decay 5e-4) with the LR
    falling from ``lr`` to 0 on a cosine, label smoothing 0.1, bf16 autocast where the CPU has it. ``x``: uint8
    NCHW training images (never the validation or test images).

    The augmentation is bonsai's training one, a random shift of up to ``translate`` pixels (zero padded; default
    image size // 8, as ``bonsai fit``) and a random mirror. It has to match the training's: BatchNorm re-estimates
    its statistics from these batches, and statistics from unshifted images cost a trained CIFAR-10 resnet32 two
    points of validation accuracy within 17 steps at LR 0. ``teacher``: also learn its soft targets
    (:func:`bonsai.train.distill.distillation_loss` with ``temperature`` and ``alpha``). ``hook(step, steps)`` runs
    before each step (gradual pruning sets its masks there)."""
    import math

    from torch.nn import functional as F

    from bonsai.data.augment import augment_batch
    from bonsai.train.distill import distillation_loss
    from bonsai.train.engine import _cpu_has_bf16

    if teacher is not None:
        teacher.eval()
    translate = x.shape[-1] // 8 if translate is None else translate

    g = torch.Generator().manual_seed(seed)
    steps = max(1, int(epochs * len(x) // batch))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    order = torch.cat([torch.randperm(len(x), generator=g) for _ in range(math.ceil(steps * batch / len(x)) + 1)])
    for step in range(steps):
        if hook is not None:
            hook(step, steps)
        idx = order[step * batch : (step + 1) * batch]
        xb, yb = x[idx], y[idx]
        xb = augment_batch(xb, translate, True, g)
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        with torch.autocast("cpu", torch.bfloat16, enabled=_cpu_has_bf16()), torch.enable_grad():
            out = model(xb).float()
            if teacher is None:
                loss = F.cross_entropy(out, yb, label_smoothing=0.1)
            else:
                with torch.no_grad():
                    soft = teacher(xb).float()
                loss = distillation_loss(out, soft, yb, temperature, alpha, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
        opt.step()
    return model.eval()
