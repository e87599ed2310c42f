"""Small shared helpers: atomic file writes and duration parsing."""

from __future__ import annotations

import math
import os
import re
import tempfile
from pathlib import Path

from bonsai.errors import ConfigError


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either the old or the new content, never a torn file (SIGKILL-safe)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:  # the folder cannot be made or written: the error names the file to be written
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # a full disk names no file by itself: the error names the one being written
        Path(tmp).unlink(missing_ok=True)
        raise OSError(e.errno, e.strerror or str(e), str(path)) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def existing_ancestor(path: str | Path) -> Path:
    """``path`` itself when it exists, else its nearest existing parent (where a new run directory would go)."""
    existing = Path(path)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return existing


def atomic_write_text(path: str | Path, text: str) -> None:
    """UTF-8; file names that are not valid UTF-8 (held as surrogates) are written back as their original bytes."""
    atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|s)")


def parse_duration(value: str | float | int) -> float:
    """Seconds from ``90``, ``"90s"``, ``"10m"``, ``"1h"`` or ``"1h30m"``.

    >>> parse_duration("1h30m")
    5400.0
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or _DURATION.sub("", text).strip():
                raise ConfigError(f"budget {value!r}: use a duration like 90s, 10m, 1h or 1h30m") from None
            seconds = sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)
    if not seconds > 0:
        raise ConfigError(f"budget {value!r}: must be positive")
    if not math.isfinite(seconds):  # an endless budget would hold the learning-rate schedule at its start
        raise ConfigError(f"budget {value!r}: must be finite; train without --budget for a fixed number of epochs")
    return seconds


def parse_count(value: str | float | int, what: str = "FLOPs") -> float:
    """A positive count from ``40000000``, ``"40M"``, ``"1.5G"`` or ``"800k"``.

    >>> parse_count("40M")
    40000000.0
    """
    text = str(value).strip().lower().replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "g": 1e9}.get(text[-1:], 1.0)
    try:
        n = float(text[:-1] if scale != 1.0 else text) * scale
    except ValueError:
        raise ConfigError(f"{what} {value!r}: use a number like 40M, 1.5G or 800k") from None
    if not n > 0 or not math.isfinite(n):
        raise ConfigError(f"{what} {value!r}: must be positive and finite")
    return n


STOP_SIGNALS = {"sigint": 130, "sigterm": 143}  # a run's stop_reason after a signal -> the exit code the CLI returns
