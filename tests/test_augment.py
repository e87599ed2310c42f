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


def test_alternating_flips_mirror_each_image_in_every_other_epoch():
    from bonsai.data.loader import Loader
    from bonsai.data.sources import Split

    n = 40
    x = torch.zeros(n, 1, 1, 4, dtype=torch.uint8)
    x[:, 0, 0, 0] = 1  # unflipped images have their marker on the left
    split = Split(names=[str(i) for i in range(n)], y=torch.arange(n), x=x)

    def flipped(loader: Loader, epoch: int) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.bool)
        seen = torch.zeros(n, dtype=torch.bool)
        for xb, yb in loader.batches(epoch):
            out[yb] = xb[:, 0, 0, 3] == 1
            seen[yb] = True
        assert seen.all()
        return out

    alternating = Loader(split, 8, torch.device("cpu"), train=True, flip=True, alternate_flip=True, seed=3, channels_last=False)
    e0, e1, e2 = flipped(alternating, 0), flipped(alternating, 1), flipped(alternating, 2)
    assert 10 < e0.sum() < 30  # a random half in the first epoch
    assert (e1 == ~e0).all() and (e2 == e0).all()  # then each image alternates
    by_chance = Loader(split, 8, torch.device("cpu"), train=True, flip=True, seed=3, channels_last=False)
    r0, r1 = flipped(by_chance, 0), flipped(by_chance, 1)
    assert 10 < r0.sum() < 30 and 10 < r1.sum() < 30
    assert (r1 == r0).any()  # by chance, some images are seen on the same side twice in a row
