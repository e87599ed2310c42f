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
from bonsai.utils import existing_ancestor

log = logging.getLogger("bonsai")

WORKSPACE_BYTES = 256 * 2**20  # allocator slack, the input batch, convolution workspaces
MEMORY_SHARE = 0.8  # of the memory available when training starts


def _cgroup_room() -> int | None:
    """Bytes left under this process's container memory limit (cgroup v2, else v1), or None without a limit."""
    for limit_path, usage_path in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_path).read_text().strip()
            usage = int(Path(usage_path).read_text().strip())
        except (OSError, ValueError):
            continue
        if limit == "max" or not limit.isdigit() or int(limit) >= 2**60:
            return None
        return max(0, int(limit) - usage)
    return None


def available_memory(device: torch.device) -> int:
    """Bytes free for training on ``device``: free GPU memory; on the CPU the kernel's MemAvailable, or the room
    left under a container's memory limit when that is smaller."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            free = 8 * 2**30
    room = _cgroup_room()
    return free if room is None else min(free, room)


def train_memory_bytes(spec: ArchSpec, batch_size: int, half: bool, params: int, image_size: int | None = None) -> int:
    """Estimated peak memory of one training step at ``batch_size`` (``half``: bf16/fp16 autocast)."""
    per_image = activation_elements(spec, image_size) * (4 if half else 8)
    return WORKSPACE_BYTES + 16 * params + batch_size * per_image


def fit_batch(spec: ArchSpec, batch_size: int, half: bool, params: int, available: int) -> int:
    """``batch_size`` if its estimated step fits in ``MEMORY_SHARE`` of ``available`` bytes, else the first that
    fits of its successive halvings (rounded down to a multiple of 8 above 16); at least 1."""
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
    try:
        free = shutil.disk_usage(existing_ancestor(out)).free
    except OSError as e:
        raise BonsaiError(f"{out}: cannot tell the free disk space ({e.strerror or e})") from None
    if free < need:
        raise BonsaiError(
            f"{out}: only {free / 2**20:.0f} MB free on its disk, and the run needs about {need / 2**20:.0f} MB "
            "for checkpoints and predictions; free some space or choose another --out"
        )
