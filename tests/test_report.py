"""HTML reports from a run directory (a fixture written by hand: no training), comparisons, the CLI, and what
fit itself writes for them (samples.png, confusion.json, report.html, TensorBoard scalars)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bonsai.data.sources import Split
from bonsai.errors import BonsaiError
from bonsai.models.arch import preset
from bonsai.report.html import SECTIONS, layer_names, write_comparison, write_report, write_samples


def _fixture_run(d: Path, name_widths=(16, 12), val=(0.4, 0.6, 0.7)) -> Path:
    """A run directory as fit leaves it after 3 epochs with one prune after epoch 2."""
    d.mkdir(parents=True)
    spec = preset("resnet8", 3, 3, 16)
    arch = spec.to_dict()
    widths0 = spec.widths()
    widths1 = [name_widths[1] if i == 1 else w for i, w in enumerate(widths0)]
    classes = ["cat", "dog", "fox"]
    (d / "dataset.json").write_text(json.dumps({
        "source": "data", "kind": "folder", "classes": classes, "channels": 3, "image_size": 16, "train_images": 30,
        "test_images": 9, "test_labeled": True, "skipped_files": 0, "val_images": 6, "train_images_used": 24,
        "class_counts": [10, 10, 10],
    }))
    metrics = []
    for e in (1, 2, 3):
        metrics.append({
            "epoch": e, "train_time_s": 10.0 * e, "clock_s": 11.0 * e, "train_loss": 1.0 / e, "train_acc": 0.3 + 0.1 * e,
            "val_acc": val[e - 1], "test_acc": val[e - 1] - 0.05, "lr": 0.1 / e, "batch_size": 16 if e < 3 else 24,
            "images_per_s": 100.0, "flops_per_image": 2e6 if e < 3 else 1.5e6, "params": 5000, "train_flops": 1e9 * e,
            "widths": widths0 if e < 3 else widths1,
        })
    (d / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    event = {"epoch": 2, "event": "prune", "widths_before": widths0, "widths_after": widths1, "flops_before": 2e6,
             "flops_after": 1.5e6, "params_after": 4000, "batch_size_before": 16, "batch_size": 24, "peak_lr": 0.1, "removed": {"s1.b1": 4}}
    (d / "events.jsonl").write_text(json.dumps(event) + "\n")
    arch["stages"][0]["inner"][0] = name_widths[1]
    (d / "arch.json").write_text(json.dumps(arch))
    (d / "summary.json").write_text(json.dumps({
        "stop_reason": "epochs", "epochs": 3, "best_epoch": 3, "val_acc": val[-1], "test_acc": val[-1] - 0.05,
        "train_time_s": 30.0, "clock_s": 33.0, "train_flops": 3e9, "flops_per_image": 1.5e6, "params": 4000,
        "device": "cpu", "precision": "bfloat16", "torch": torch.__version__,
    }))
    (d / "confusion.json").write_text(json.dumps({"classes": classes, "val": [[2, 0, 0], [1, 1, 0], [0, 0, 2]], "test": [[3, 0, 0], [0, 2, 1], [0, 1, 2]]}))
    (d / "config.yaml").write_text("seed: 0\n")
    x = torch.randint(0, 256, (30, 3, 16, 16), dtype=torch.uint8)
    write_samples(Split(names=[str(i) for i in range(30)], y=torch.arange(30) % 3, x=x), classes, d / "samples.png", 16, 3)
    return d


def _external_urls(page: str) -> list[str]:
    return re.findall(r"""(?:src|href)\s*=\s*["']?(?!data:|#)[a-z]+://[^"' >]+|url\(\s*["']?(?!data:)[a-z]+://""", page, re.I)


def test_report_is_self_contained_and_has_every_section(tmp_path: Path):
    run = _fixture_run(tmp_path / "r")
    path = write_report(run)
    assert path == run / "report.html"
    page = path.read_text()
    for section in SECTIONS:
        assert f">{section}</h2>" in page, section
    assert _external_urls(page) == []
    images = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) >= 7  # samples, curves, lr/batch, shape, flops, val and test confusion
    import base64

    assert all(base64.b64decode(b)[:8] == b"\x89PNG\r\n\x1a\n" for b in images)
    assert "FLOPs/image 2.0M -&gt; 1.5M, batch 16 -&gt; 24, removed 4 channels" in page  # the prune event, escaped
    assert "70.00%" in page and "s1.b1" in page


def test_writing_a_report_leaves_pyplot_alone(tmp_path: Path):
    import matplotlib
    import matplotlib.pyplot as plt

    run = _fixture_run(tmp_path / "r")
    backend, layout, figures = matplotlib.get_backend(), plt.rcParams["figure.constrained_layout.use"], plt.get_fignums()
    write_report(run)
    write_comparison([run, run], tmp_path / "c.html")
    assert (matplotlib.get_backend(), plt.rcParams["figure.constrained_layout.use"], plt.get_fignums()) == (backend, layout, figures)


def test_a_file_with_unexpected_content_costs_its_section_only(tmp_path: Path):
    run = _fixture_run(tmp_path / "r")
    (run / "compression.json").write_text('["not", "stages"]')
    (run / "arch.json").write_text('{"stem": 8}')
    page = write_report(run).read_text()
    assert "could not draw this section (KeyError" in page and "Training curves</h2><img" in page


def test_report_with_files_missing_says_so_instead_of_failing(tmp_path: Path):
    run = _fixture_run(tmp_path / "r")
    for name in ("confusion.json", "samples.png", "events.jsonl", "arch.json"):
        (run / name).unlink()
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"epoch": 4, "trunc')  # torn last line
    page = write_report(run).read_text()
    assert "no confusion.json" in page and "no arch.json" in page and "no events" in page
    assert "no compression.json" in page


def test_logs_and_files_damaged_by_hand_are_read_for_what_they_hold(tmp_path: Path):
    """A line that is no JSON object or not UTF-8 in a log, and a summary.json holding a list, do not stop a
    report or a comparison."""
    from bonsai.report.log import read_jsonl

    run = _fixture_run(tmp_path / "r")
    good = read_jsonl(run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'[1, 2]\n"text"\n{"epoch": 9, "note": "\xff\xfe"}\n')
    records = read_jsonl(run / "metrics.jsonl")
    assert records[: len(good)] == good and [r["epoch"] for r in records[len(good):]] == [9]
    (run / "summary.json").write_text("[1, 2]")
    page = write_report(run).read_text()
    assert "Training curves</h2><img" in page and "could not draw" not in page
    assert "<td>r</td>" in write_comparison([run, _fixture_run(tmp_path / "b")], tmp_path / "cmp.html").read_text()


def test_report_of_a_folder_that_is_no_run_is_a_clear_error(tmp_path: Path):
    with pytest.raises(BonsaiError, match="not a run directory"):
        write_report(tmp_path)


def test_comparison_overlays_runs_and_tabulates_them(tmp_path: Path):
    a = _fixture_run(tmp_path / "a")
    b = _fixture_run(tmp_path / "b", val=(0.5, 0.8, 0.9))
    page = write_comparison([a, b], tmp_path / "cmp.html").read_text()
    assert "<td>a</td><td>70.00%</td>" in page and "<td>b</td><td>90.00%</td>" in page
    assert _external_urls(page) == [] and page.count("data:image/png;base64,") == 1


def test_report_cli(tmp_path: Path):
    a = _fixture_run(tmp_path / "a")
    b = _fixture_run(tmp_path / "b")
    r = subprocess.run([sys.executable, "-m", "bonsai", "report", str(a)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (a / "report.html").is_file(), r.stderr
    r = subprocess.run([sys.executable, "-m", "bonsai", "report", str(a), str(b), "--out", str(tmp_path / "c.html")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and (tmp_path / "c.html").is_file(), r.stderr
    r = subprocess.run([sys.executable, "-m", "bonsai", "report", str(tmp_path / "nope")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [f"bonsai: error: {tmp_path / 'nope'}: not a run directory"]


def test_layer_names_match_the_widths():
    spec = preset("resnet20")
    names = layer_names(spec.to_dict())
    assert len(names) == len(spec.widths()) and names[:3] == ["stem", "s1.b1.conv1", "s1.b1.conv2"]


def test_samples_grid_has_one_row_per_class(tmp_path: Path):
    from PIL import Image

    x = torch.zeros(12, 1, 8, 8, dtype=torch.uint8)
    y = torch.tensor([0, 1, 2] * 4)
    x[y == 1] = 255
    write_samples(Split(names=[str(i) for i in range(12)], y=y, x=x), ["a", "b", "c"], tmp_path / "s.png", 8, 1, per_class=4)
    im = np.asarray(Image.open(tmp_path / "s.png"))
    scale = 48 // 8
    assert im.shape == (3 * 8 * scale, 4 * 8 * scale)
    assert (im[8 * scale : 16 * scale] == 255).all() and (im[: 8 * scale] == 0).all()


@pytest.mark.report
def test_fit_writes_report_confusion_samples_and_tensorboard(npz_data: Path, tmp_path: Path):
    import bonsai

    run = bonsai.fit(npz_data, epochs=2, out=str(tmp_path / "r"), arch="resnet8", batch_size=16, quiet=True, precision="fp32", log="tensorboard")
    conf = json.loads((run.dir / "confusion.json").read_text())
    ds = json.loads((run.dir / "dataset.json").read_text())
    assert sum(map(sum, conf["val"])) == ds["val_images"]
    assert sum(conf["val"][i][i] for i in range(len(conf["classes"]))) / ds["val_images"] == pytest.approx(run.summary["val_acc"])
    assert (run.dir / "samples.png").read_bytes()[:4] == b"\x89PNG"
    page = (run.dir / "report.html").read_text()
    assert all(f">{s}</h2>" in page for s in SECTIONS)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.dir / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("val_acc")] == [1, 2]
    metrics = [json.loads(x) for x in (run.dir / "metrics.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("train_loss")] == pytest.approx([m["train_loss"] for m in metrics], rel=1e-6)


@pytest.mark.browser
@pytest.mark.skipif(__import__("bonsai.report.browser", fromlist=["x"]).find_chromium() is None, reason="no chromium installed")
def test_report_renders_in_headless_chromium(tmp_path: Path):
    from PIL import Image

    from bonsai.report.browser import decoded_images, screenshot

    page = write_report(_fixture_run(tmp_path / "r"))
    total, decoded = decoded_images(page)
    assert total >= 7 and decoded == total  # every inlined figure decodes, offline
    png = screenshot(page, tmp_path / "shot.png", width=1000, height=3000)
    im = np.asarray(Image.open(png).convert("L"))
    assert im.shape == (3000, 1000)
    assert im.std() > 20 and (im < 100).mean() > 0.01  # text and figures were drawn, not a blank page


def test_widths_stay_aligned_to_the_starting_layers_when_blocks_are_removed():
    from bonsai.report.html import aligned_widths

    metrics = [
        {"widths": [16, 16, 16, 16, 16, 32, 32], "block_ids": [[0, 1], [0]]},
        {"widths": [16, 8, 16, 32, 32], "block_ids": [[1], [0]]},  # stage 1's first block removed
    ]
    rows, names = aligned_widths(metrics)
    assert names == ["stem", "s1.b1.conv1", "s1.b1.conv2", "s1.b2.conv1", "s1.b2.conv2", "s2.b1.conv1", "s2.b1.conv2"]
    assert rows[0] == [16, 16, 16, 16, 16, 32, 32]
    assert rows[1][:1] == [16] and all(v != v for v in rows[1][1:3]) and rows[1][3:] == [8, 16, 32, 32]
    assert aligned_widths([{"widths": [1, 2, 3]}]) == ([[1, 2, 3]], None)
