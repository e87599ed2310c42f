"""Batched augmentation on whole uint8 tensors (no per-image Python work)."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def translate_batch(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift every image by its own random offset in [-pad, pad] pixels per axis, filling with zeros.

    ``x`` is (N, C, H, W); the same as padding by ``pad`` and taking a random crop of the original size.
    """
    if pad <= 0:
        return x
    n, c, h, w = x.shape
    xp = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return xp[batch, chan, rows, cols]


def shift_batch(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Shift every image of a batch by the same ``dy`` rows and ``dx`` columns (down/right when positive), filling
    with zeros: one fixed view of what :func:`translate_batch` draws at random.

    >>> shift_batch(torch.arange(1, 5).reshape(1, 1, 2, 2), 1, 0).flatten().tolist()
    [0, 0, 1, 2]
    """
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) < h and abs(dx) < w:  # else every pixel is shifted out
        out[..., max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[..., max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)]
    return out


def flip_batch(x: torch.Tensor, gen: torch.Generator, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror the images left-right where ``mask`` (bool, one per image) is true; without a mask, a random half."""
    if mask is None:
        mask = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(mask.to(x.device)[:, None, None, None], x.flip(3), x)


def alternating_flips(base: torch.Tensor, idx: torch.Tensor, epoch: int) -> torch.Tensor:
    """Which images of a batch to mirror under alternating flips (airbench): image ``i`` is mirrored in the epochs
    where ``base[i]`` (one random bit per image, drawn once per run) differs from the epoch's parity, so each image
    is seen mirrored and unmirrored in turn, rather than by chance.

    >>> alternating_flips(torch.tensor([True, False]), torch.tensor([0, 1]), 2).tolist()
    [True, False]
    >>> alternating_flips(torch.tensor([True, False]), torch.tensor([0, 1]), 3).tolist()
    [False, True]
    """
    return base[idx.to(base.device)] ^ bool(epoch % 2)


def augment_batch(x: torch.Tensor, translate: int, flip: bool, gen: torch.Generator, flip_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Random translate (zero padded) then horizontal flip, on a uint8 batch: of the images ``flip_mask`` names, or
    of a random half without it.

    >>> g = torch.Generator().manual_seed(0)
    >>> augment_batch(torch.zeros(4, 3, 8, 8, dtype=torch.uint8), 1, True, g).shape
    torch.Size([4, 3, 8, 8])
    """
    x = translate_batch(x, translate, gen)
    return flip_batch(x, gen, flip_mask) if flip else x


def resize_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Downscale a batch (uint8 or float, NCHW) to ``size`` x ``size`` pixels with an antialiased bilinear filter;
    float output in the input's pixel range, in the input's memory format.

    >>> resize_batch(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), 16).shape
    torch.Size([2, 3, 16, 16])
    """
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    y = F.interpolate(x.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return y.contiguous(memory_format=torch.channels_last) if channels_last else y
