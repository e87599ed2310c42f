"""Batches for training and evaluation: from one in-memory uint8 tensor, or streamed from image files.

Both paths yield uint8 (N, C, H, W) batches on the training device (channels_last when asked); normalization is
part of the network. Shuffling and augmentation draw from a generator seeded by (seed, epoch), so an epoch is
reproducible on its own, which is what makes resuming mid-run exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from bonsai.data.augment import alternating_flips, augment_batch
from bonsai.data.sources import Split, error_reason, read_image
from bonsai.errors import DatasetError


def worker_message(text: str) -> str:
    """The original one-line message of an error a DataLoader worker raised (PyTorch re-raises it with the
    worker's traceback as its text, whose last line is ``module.Type: message``); ``text`` itself otherwise.

    >>> worker_message("Caught DatasetError in DataLoader worker process 0.\\nOriginal Traceback (most recent call last):\\n  ...\\nbonsai.errors.DatasetError: a.png: unreadable")
    'a.png: unreadable'
    """
    if "Original Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


class _FileImages(torch.utils.data.Dataset):
    def __init__(self, files: list[Path], size: int, channels: int):
        self.files, self.size, self.channels = files, size, channels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        try:
            a = read_image(self.files[i], self.size, self.channels)
        except Exception as e:  # noqa: BLE001 - read when the dataset was loaded; changed on disk since
            raise DatasetError(
                f"{self.files[i]}: unreadable now ({error_reason(e)}), though it was read when the dataset was loaded; "
                "restore it and continue the run with `bonsai fit --resume RUN`"
            ) from None
        return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


class Loader:
    """Iterate a Split in batches.

    Args:
        split: the images (in memory or files) and labels.
        batch_size: images per batch; with ``train=True`` a last partial batch is dropped (every image is still
            seen across epochs, as the order is reshuffled).
        train: shuffle and augment.
        translate, flip: augmentation (train only).
        alternate_flip: with ``flip``, mirror each image every other epoch (see
            :func:`bonsai.data.augment.alternating_flips`) instead of by chance; which epochs is drawn once from
            ``seed``, the same on every rank.
        size, channels: needed to decode files on the streaming path.
        rank, world: this process's share under data-parallel training. Training: every rank draws the same
            order and takes every ``world``-th image of each global batch of ``batch_size`` (its augmentation has
            its own generator); evaluation: rank ``rank``'s contiguous chunk of the split (see
            :func:`bonsai.train.distributed.shard_range`). The streaming path decodes only this rank's files.
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        device: torch.device,
        train: bool = False,
        translate: int = 0,
        flip: bool = False,
        alternate_flip: bool = False,
        seed: int = 0,
        channels_last: bool = True,
        size: int = 32,
        channels: int = 3,
        workers: int = 0,
        rank: int = 0,
        world: int = 1,
    ):
        self.split, self.device, self.train = split, device, train
        self.translate, self.flip, self.seed = translate, flip, seed
        self.flip_base = None
        if train and flip and alternate_flip:
            self.flip_base = (torch.rand(len(split), generator=epoch_generator(seed + 104_729, 0)) < 0.5).to(device)
        self.channels_last = channels_last
        n = len(split)
        self.batch_size = min(batch_size, n) if train else batch_size
        self.size, self.channels, self.workers = size, channels, workers
        self.rank, self.world = rank, world
        self.x = None if split.x is None else split.x.to(device)
        self.y = None if split.y is None else split.y.to(device)

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.train else -(-n // self.batch_size)

    @property
    def images_per_epoch(self) -> int:
        return len(self) * self.batch_size if self.train else len(self.split)

    def _order(self, gen: torch.Generator) -> torch.Tensor:
        n = len(self.split)
        return torch.randperm(n, generator=gen) if self.train else torch.arange(n)

    def _batches_from_files(self, batches: list[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = _FileImages(self.split.files, self.size, self.channels)
        dl = torch.utils.data.DataLoader(ds, batch_sampler=[b.tolist() for b in batches], num_workers=self.workers)
        try:
            for xb, idx in zip(dl, batches):
                yield xb.to(self.device, non_blocking=True), idx
        except DatasetError as e:  # from a worker process, PyTorch wraps the message in its traceback: keep the message
            raise DatasetError(worker_message(str(e))) from None

    def _index_batches(self, order: torch.Tensor) -> list[torch.Tensor]:
        """This rank's image indices, batch by batch."""
        b = self.batch_size
        if self.train:
            return [order[i * b : (i + 1) * b][self.rank :: self.world] for i in range(len(self))]
        if self.world > 1:
            from bonsai.train.distributed import shard_range

            start, end = shard_range(len(order), self.rank, self.world)
            order = order[start:end]
        return [order[i : i + b] for i in range(0, len(order), b)]

    def batches(self, epoch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Yield (images uint8, labels or None) for one epoch (this rank's share of it)."""
        gen = epoch_generator(self.seed, epoch)
        order = self._order(gen)
        # one process: augmentation continues the order's generator; ranks each draw their own
        aug = gen if self.world == 1 else epoch_generator(self.seed + 7919 * self.rank, epoch)
        if self.x is not None:
            source = ((self.x[idx], idx) for idx in self._index_batches(order.to(self.device)))
        else:
            source = self._batches_from_files(self._index_batches(order))
        for xb, idx in source:
            if self.train and (self.translate or self.flip):
                mask = None if self.flip_base is None else alternating_flips(self.flip_base, idx, epoch)
                xb = augment_batch(xb, self.translate, self.flip, aug, mask)
            if self.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            yb = None if self.y is None else self.y[idx.to(self.device)]  # a no-op unless streaming to a GPU
            yield xb, yb
