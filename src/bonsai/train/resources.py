"""Resources checked before training: room on disk for the run directory, and a batch that fits in memory.

The memory model is an estimate, calibrated on this project's CPU (``benchmarks/faults.py`` records estimate
against measured peak for a few shapes): per image, every layer output is kept for the backward pass; measured
2.8 bytes per element under bf16 autocast and 7.4 under fp32 (resnet20, batch 128 -> 256), counted as 4 and 8
to stay on the safe side. On top come the weights,
gradients, momentum and low-precision copies (16 bytes per parameter) and a fixed workspace.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from bonsai.errors import BonsaiError
from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import activation_elements

log = logging.getLogger("bonsai")

WORKSPACE_BYTES = 256 * 2**20  # allocator slack, the input batch, convolution workspaces
MEMORY_SHARE = 0.8  # of the memory available when training starts


def available_memory(device: torch.device) -> int:
    """Bytes free for training on ``device``: free GPU memory, or the kernel's MemAvailable on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def train_memory_bytes(spec: ArchSpec, batch_size: int, half: bool, params: int, image_size: int | None = None) -> int:
    """Estimated peak memory of one training step at ``batch_size`` (``half``: bf16/fp16 autocast)."""
    per_image = activation_elements(spec, image_size) * (4 if half else 8)
    return WORKSPACE_BYTES + 16 * params + batch_size * per_image


def fit_batch(spec: ArchSpec, batch_size: int, half: bool, params: int, available: int) -> int:
    """The largest batch up to ``batch_size`` whose estimated step fits in ``MEMORY_SHARE`` of ``available``
    bytes: a multiple of 8 when above 8, at least 1."""
    limit = MEMORY_SHARE * available
    b = batch_size
    while b > 1 and train_memory_bytes(spec, b, half, params) > limit:
        b = b // 2 if b <= 16 else (b // 2) // 8 * 8
    return max(b, 1)


def run_dir_bytes(params_and_buffers: int, n_test: int, num_classes: int) -> int:
    """Disk the run directory needs at its peak: the checkpoint (weights, buffers, momentum) and the best model,
    each written beside its previous version before the atomic rename, plus predictions and logs."""
    weights = 4 * params_and_buffers
    checkpoint = 2 * weights
    return 2 * (checkpoint + weights) + n_test * (num_classes * 12 + 64) + 16 * 2**20


def check_disk(out: Path, need: int) -> None:
    """A clear error before training when ``out``'s file system has less than ``need`` bytes free."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError as e:
        raise BonsaiError(f"{out}: cannot tell the free disk space ({e.strerror or e})") from None
    if free < need:
        raise BonsaiError(
            f"{out}: only {free / 2**20:.0f} MB free on its disk, and the run needs about {need / 2**20:.0f} MB "
            "for checkpoints and predictions; free some space or choose another --out"
        )
