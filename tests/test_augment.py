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
    loader = Loader(split, 8, torch.device("cpu"), train=True, flip=True, alternate_flip=True, seed=3, channels_last=False)

    def flipped(epoch: int) -> torch.Tensor:
        out = torch.zeros(n, dtype=torch.bool)
        seen = torch.zeros(n, dtype=torch.bool)
        for xb, yb in loader.batches(epoch):
            out[yb] = xb[:, 0, 0, 3] == 1
            seen[yb] = True
        assert seen.all()
        return out

    e0, e1, e2 = flipped(0), flipped(1), flipped(2)
    assert 10 < e0.sum() < 30  # a random half in the first epoch
    assert (e1 == ~e0).all() and (e2 == e0).all()  # then each image alternates
    random_loader = Loader(split, 8, torch.device("cpu"), train=True, flip=True, seed=3, channels_last=False)
    loader = random_loader
    assert not all((flipped(e + 1) == ~flipped(e)).all() for e in range(3))  # by chance, images repeat a side
