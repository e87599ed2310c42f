"""The packaged demo dataset: 5,000 training and 1,000 test images of CIFAR-10 (500/100 per class, lossless)."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from importlib import resources
from pathlib import Path

ARCHIVE = "cifar10_demo.tar.gz"


def extract_demo(dest: str | Path) -> Path:
    """Unpack the demo to ``dest`` (an ImageFolder: train/<class>/, test/<class>/) unless already there."""
    dest = Path(dest)
    if (dest / "train").is_dir() and (dest / "test").is_dir():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    try:
        with resources.as_file(resources.files(__name__) / ARCHIVE) as archive, tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)  # atomic: a killed extraction never leaves a half-filled dataset
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
