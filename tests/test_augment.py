"""Batched augmentation does what it claims on known images."""

import torch

from bonsai.data.augment import flip_batch, translate_batch


def test_translate_shifts_each_image_by_its_own_offset_with_zero_fill():
    x = torch.arange(1, 1 + 2 * 1 * 5 * 5, dtype=torch.uint8).view(2, 1, 5, 5)
    gen = torch.Generator().manual_seed(0)
    out = translate_batch(x, 2, gen)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randint(0, 5, (2,), generator=gen) - 2
    dx = torch.randint(0, 5, (2,), generator=gen) - 2
    for n in range(2):
        for i in range(5):
            for j in range(5):
                si, sj = i + dy[n].item(), j + dx[n].item()
                inside = 0 <= si < 5 and 0 <= sj < 5
                assert out[n, 0, i, j] == (x[n, 0, si, sj] if inside else 0)


def test_flip_mirrors_about_half_of_a_large_batch():
    x = torch.arange(4, dtype=torch.uint8).repeat(1000, 1, 1, 1)  # (1000, 1, 1, 4)
    out = flip_batch(x, torch.Generator().manual_seed(1))
    flipped = (out[:, 0, 0, 0] == 3).sum().item()
    assert 400 < flipped < 600
    assert ((out[:, 0, 0] == torch.tensor([0, 1, 2, 3])).all(1) | (out[:, 0, 0] == torch.tensor([3, 2, 1, 0])).all(1)).all()
