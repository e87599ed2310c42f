"""Tiny synthetic datasets built on the fly (never downloaded, never written into the working directory).

Each class has its own colour pattern, so a tiny network can learn it in a few steps.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

CLASSES = ["cat", "dog", "fox"]


def make_images(n_per_class: int, size: int = 16, channels: int = 3, seed: int = 0, n_classes: int = 3):
    """uint8 (N, size, size, channels) images and int64 labels; class c is brightest in a band c of the image."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(n_classes):
        x = rng.integers(0, 60, size=(n_per_class, size, size, channels), dtype=np.uint8)
        band = slice(c * size // n_classes, (c + 1) * size // n_classes)
        x[:, band, :, :] += 150
        xs.append(x)
        ys.append(np.full(n_per_class, c, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys)


def write_folder(root: Path, n_train: int = 8, n_test: int = 3, size: int = 16, labeled_test: bool = False, ext: str = "png") -> Path:
    x, y = make_images(n_train + n_test, size)
    for c, name in enumerate(CLASSES):
        idx = np.flatnonzero(y == c)
        for k, i in enumerate(idx):
            split = "train" if k < n_train else "test"
            folder = root / split / name if split == "train" or labeled_test else root / "test"
            folder.mkdir(parents=True, exist_ok=True)
            stem = f"{name}_{k:03d}" if split == "test" and not labeled_test else f"{k:03d}"
            Image.fromarray(x[i]).save(folder / f"{stem}.{ext}")
    return root


@pytest.fixture(autouse=True)
def _no_report_at_the_end_of_fit(request, monkeypatch):
    """The end-of-fit HTML report (about 2 s of plotting) is drawn only in tests marked ``report``; the others
    train dozens of tiny runs and check other things. Subprocess runs (the CLI tests) still write it."""
    if request.node.get_closest_marker("report") is None:
        monkeypatch.setattr("bonsai.api.write_report", lambda *a, **k: None)


@pytest.fixture(autouse=True)
def _seed_log_and_cwd(caplog, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # whatever a test writes by default (runs/...) lands in its own tmp dir
    torch.manual_seed(0)
    np.random.seed(0)
    logging.getLogger("bonsai").propagate = True  # the CLI turns propagation off; caplog needs it
    caplog.set_level(logging.WARNING, logger="bonsai")


@pytest.fixture
def folder_data(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "data")


@pytest.fixture
def npz_data(tmp_path: Path) -> Path:
    x, y = make_images(20)
    xt, yt = make_images(5, seed=1)
    path = tmp_path / "data.npz"
    np.savez(path, x_train=x, y_train=y, x_test=xt, y_test=yt, classes=np.array(CLASSES))
    return path


def _default_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def signal_after_epochs(args: list[str], run: Path, epochs: int, sig: int, ignore_sigint: bool = False, poll: float = 0.01) -> subprocess.Popen:
    """Start ``bonsai fit ARGS --out RUN`` and send ``sig`` as soon as ``epochs`` lines are in its metrics.jsonl.

    The child gets default signal handling, as a user's foreground command has it (a test run started in the
    background would otherwise hand down an ignored SIGINT), or an ignored SIGINT with ``ignore_sigint``."""

    def prepare() -> None:
        _default_signals()
        if ignore_sigint:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

    cmd = [sys.executable, "-m", "bonsai", "fit", *args, "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=prepare)
    metrics = run / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= epochs:
            os.kill(proc.pid, sig)
            break
        time.sleep(poll)
    return proc


def randomize_bn_(model) -> None:
    """Non-trivial BN scales, shifts and running statistics, as after training: surgery tests need them to mean
    anything (a fresh BN is the identity in eval mode)."""
    import torch
    from torch import nn

    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)


def trained_looking(spec):
    """A seeded network for ``spec`` without zero-initialised residuals, its BNs randomized (``randomize_bn_``)."""
    import torch

    from bonsai.models.resnet import build

    torch.manual_seed(0)
    model = build(spec, zero_init_residual=False)
    randomize_bn_(model)
    return model
