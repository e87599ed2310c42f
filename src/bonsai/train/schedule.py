"""Learning-rate schedules as functions of training progress (0..1), and the budget clock."""

from __future__ import annotations

import math
import time


def lr_factor(progress: float, schedule: str, warmup: float) -> float:
    """Multiplier of the peak LR at ``progress`` in [0, 1] of the planned training.

    A linear warm-up over the first ``warmup`` share precedes every schedule. ``onecycle`` then decays with a
    cosine to 0; ``step`` is PruneTrain's (x0.1 at 50% and again at 75%); ``constant`` stays at the peak.

    >>> lr_factor(0.0, "onecycle", 0.1), lr_factor(1.0, "onecycle", 0.1)
    (0.0, 0.0)
    >>> lr_factor(0.6, "step", 0.0)
    0.1
    """
    p = min(max(progress, 0.0), 1.0)
    if warmup > 0 and p < warmup:
        return p / warmup
    if schedule == "onecycle":
        return 0.5 * (1.0 + math.cos(math.pi * (p - warmup) / (1.0 - warmup)))
    if schedule == "step":
        return 1.0 if p < 0.5 else 0.1 if p < 0.75 else 0.01
    return 1.0


def train_size(progress: float, full: int, low_res: float, share: float) -> int:
    """Input size for a training step at ``progress`` under progressive resizing.

    The size grows linearly from ``low_res * full`` to ``full`` over the first ``share`` of training, rounded down
    to a multiple of 4 pixels (never below 8, never above ``full``), and stays at ``full`` after that.

    >>> [train_size(p, 32, 0.5, 0.5) for p in (0.0, 0.2, 0.4, 0.5, 0.9)]
    [16, 20, 28, 32, 32]
    """
    if low_res >= 1 or share <= 0 or progress >= share:
        return full
    scale = low_res + (1.0 - low_res) * max(progress, 0.0) / share
    return min(full, max(8, int(scale * full) // 4 * 4))


class Clock:
    """Seconds spent in timed sections (training steps, validation), excluding everything else."""

    def __init__(self, elapsed: float = 0.0):
        self.elapsed = elapsed
        self._start: float | None = None

    def __enter__(self) -> "Clock":
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.elapsed += time.perf_counter() - self._start
        self._start = None

    def charge(self, seconds: float) -> None:
        """Count ``seconds`` of work that ran outside the timed sections (see ``Engine._anytime``)."""
        self.elapsed += seconds

    def now(self) -> float:
        """Elapsed seconds including a section that is still running."""
        return self.elapsed + (0.0 if self._start is None else time.perf_counter() - self._start)
