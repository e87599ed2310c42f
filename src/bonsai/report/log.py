"""The run directory's logs: one JSON object per line, appended and flushed as they happen."""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_jsonl(path: str | Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    out = []
    for line in path.read_bytes().decode("utf-8", "replace").splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                break  # a line torn by a kill mid-write ends the log
            if isinstance(record, dict):  # bonsai writes only objects; anything else was put there by hand
                out.append(record)
    return out


def truncate_jsonl(path: str | Path, keep) -> None:
    """Rewrite ``path`` keeping only the records for which ``keep(record)`` is true (used on resume)."""
    from bonsai.utils import atomic_write_text

    path = Path(path)
    if path.exists():
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in read_jsonl(path) if keep(r)))
