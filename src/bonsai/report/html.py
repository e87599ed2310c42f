"""Self-contained HTML reports drawn only from a run directory's files, and comparisons of several runs.

A report needs nothing but the run directory: ``dataset.json``, ``metrics.jsonl``, ``events.jsonl``,
``summary.json``, ``arch.json``, ``confusion.json`` and ``samples.png`` (both written by ``fit``),
``compression.json`` when present. Figures are PNGs drawn with matplotlib (Agg) and inlined as data URIs, so the
page opens without network access. A file that is missing leaves its section saying so; it never stops the report.

>>> write_report("runs/demo")  # doctest: +SKIP
PosixPath('runs/demo/report.html')
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

from bonsai.errors import BonsaiError
from bonsai.report.log import read_jsonl
from bonsai.utils import atomic_write_text

SECTIONS = ("Summary", "Dataset", "Training curves", "Learning rate and batch size", "Network shape over time",
            "FLOPs", "Confusion matrix", "Final architecture", "Events", "Compression")

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222}
h1{font-size:1.6em} h2{font-size:1.25em;border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3} td:first-child,th:first-child,.text td:last-child{text-align:left} img{max-width:100%} .note{color:#666;font-size:.9em}
"""


# ---- reading a run directory ------------------------------------------------------------------------------


def _json(path: Path) -> dict | None:
    """A run file's JSON object; None when it is missing, damaged or not an object (a report shows what it can)."""
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError
        return None
    return d if isinstance(d, dict) else None


def read_run(run_dir: str | Path) -> dict:
    """Everything a report shows, read from ``run_dir``; absent files give None / empty lists."""
    d = Path(run_dir)
    if not d.is_dir():
        raise BonsaiError(f"{d}: not a run directory")
    if not (d / "metrics.jsonl").is_file() and not (d / "summary.json").is_file():
        raise BonsaiError(f"{d}: not a run directory (no metrics.jsonl or summary.json)")
    samples = d / "samples.png"
    return {
        "dir": d,
        "name": d.name,
        "dataset": _json(d / "dataset.json"),
        "summary": _json(d / "summary.json"),
        "arch": _json(d / "arch.json"),
        "confusion": _json(d / "confusion.json"),
        "compression": _json(d / "compression.json"),
        "metrics": read_jsonl(d / "metrics.jsonl"),
        "events": read_jsonl(d / "events.jsonl"),
        "config": (d / "config.yaml").read_text(encoding="utf-8", errors="replace") if (d / "config.yaml").is_file() else None,
        "samples": samples.read_bytes() if samples.is_file() else None,
    }


def layer_names(arch: dict) -> list[str]:
    """Names for ``ArchSpec.widths()``'s entries: stem, then s<stage>.b<block>.conv1 / conv2."""
    names = ["stem"]
    for s, stage in enumerate(arch["stages"], 1):
        for b in range(1, len(stage["inner"]) + 1):
            names += [f"s{s}.b{b}.conv1", f"s{s}.b{b}.conv2"]
    return names


def _grew(event: dict) -> bool:
    """An --adapt decision that widened or deepened the network."""
    return event.get("event") == "adapt" and event.get("decision") in ("widen", "deepen")


def aligned_widths(metrics: list[dict]) -> tuple[list[list[float]], list[str] | None]:
    """Every metrics line's ``widths`` laid out as the starting network's layers (plus any inserted later), so rows
    stay the same layers when pruning removes blocks or growth inserts them (``block_ids``: per stage, the ids of the
    blocks present, the starting network's being 0..depth-1); an absent block's two convs are NaN. Also the layers'
    names, or None when the lines carry no ``block_ids``."""
    if not metrics or "block_ids" not in metrics[0]:
        return [list(m["widths"]) for m in metrics], None
    # the first line precedes any surgery; blocks inserted later have ids past the starting network's
    full = [len(ids) for ids in metrics[0]["block_ids"]]
    for m in metrics:
        for s, ids in enumerate(m.get("block_ids") or []):
            if s < len(full) and ids:
                full[s] = max(full[s], max(ids) + 1)
    names = ["stem"] + [f"s{s + 1}.b{b + 1}.conv{k}" for s, d in enumerate(full) for b in range(d) for k in (1, 2)]
    rows = []
    for m in metrics:
        ids, w = m.get("block_ids") or [list(range(d)) for d in full], m["widths"]
        row, i = [w[0]], 1
        for s, d in enumerate(full):
            alive = set(ids[s]) if s < len(ids) else set()
            for b in range(d):
                if b in alive:
                    row += w[i : i + 2]
                    i += 2
                else:
                    row += [float("nan")] * 2
        rows.append(row)
    return rows, names


def write_samples(split, classes: list[str], path: str | Path, size: int, channels: int, per_class: int = 8, max_classes: int = 20) -> None:
    """A PNG grid of ``per_class`` training images per class (one row per class, first ``max_classes`` classes),
    taken at evenly spaced positions of each class, so the report can show the data without reading it again."""
    import numpy as np
    from PIL import Image

    from bonsai.data.sources import read_image

    if split.y is None or len(split) == 0:
        return
    y = split.y.numpy()
    rows = []
    for c in range(min(len(classes), max_classes)):
        idx = np.flatnonzero(y == c)
        picks = idx[np.linspace(0, len(idx) - 1, min(per_class, len(idx))).astype(int)] if len(idx) else []
        tiles = []
        for i in picks:
            if split.x is not None:
                tiles.append(split.x[int(i)].permute(1, 2, 0).numpy())
            else:
                try:
                    tiles.append(read_image(split.files[int(i)], size, channels))
                except (OSError, ValueError):
                    continue
        tiles += [np.full((size, size, channels), 255, np.uint8)] * (per_class - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    grid = np.concatenate(rows, axis=0)
    grid = grid[:, :, 0] if channels == 1 else grid
    scale = max(1, 48 // size)  # small images are enlarged (nearest) so they can be seen
    im = Image.fromarray(grid)
    im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    from bonsai.utils import atomic_write_bytes

    atomic_write_bytes(path, buf.getvalue())


# ---- drawing ----------------------------------------------------------------------------------------------


def _subplots(nrows: int = 1, ncols: int = 1, figsize=(8, 3), **kw):
    """A figure on its own Agg canvas: pyplot's global state (backend, open figures, rcParams) is left alone, so
    writing a report inside a notebook changes nothing there."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")  # one layout pass; bbox_inches="tight" would draw twice
    FigureCanvasAgg(fig)
    return fig, fig.subplots(nrows, ncols, **kw)


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'


def _col(metrics: list[dict], key: str) -> list[float]:
    return [math.nan if m.get(key) is None else float(m[key]) for m in metrics]


def _mark_events(ax, events: list[dict], x_of_epoch) -> None:
    for e in events:
        if (e.get("event") in ("prune", "morph", "rollback", "out_of_memory") or _grew(e)) and e.get("epoch"):
            ax.axvline(x_of_epoch(e["epoch"]), color="tab:red" if e["event"] != "prune" else "tab:purple", lw=0.8, ls=":")


def _curves(run: dict) -> str:
    m, ev = run["metrics"], run["events"]
    fig, axes = _subplots(1, 3, figsize=(14, 3.6))
    ep, clock = _col(m, "epoch"), [c / 60 for c in _col(m, "clock_s")]
    for key, label in (("train_acc", "train"), ("val_acc", "validation"), ("test_acc", "test")):
        ys = _col(m, key)
        if not all(math.isnan(y) for y in ys):
            axes[0].plot(ep, ys, marker=".", label=label)
            axes[1].plot(clock, ys, marker=".", label=label)
    axes[2].plot(ep, _col(m, "train_loss"), marker=".", color="tab:gray")
    by_epoch = dict(zip(ep, clock, strict=True))
    _mark_events(axes[0], ev, lambda e: e)
    _mark_events(axes[1], ev, lambda e: by_epoch.get(float(e), math.nan))
    axes[0].set(xlabel="epoch", ylabel="accuracy", title="accuracy vs epoch")
    axes[1].set(xlabel="wall time (min, budget clock)", ylabel="accuracy", title="accuracy vs time")
    axes[2].set(xlabel="epoch", ylabel="training loss", title="loss vs epoch")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    axes[2].grid(alpha=0.3)
    return _img(_png(fig), "accuracy and loss")


def _lr_batch(run: dict) -> str:
    m = run["metrics"]
    fig, ax = _subplots(figsize=(8, 3.2))
    ep = _col(m, "epoch")
    ax.plot(ep, _col(m, "lr"), marker=".", color="tab:blue")
    ax.set(xlabel="epoch", title="learning rate at the end of each epoch and batch size")
    ax.set_ylabel("learning rate", color="tab:blue")
    ax2 = ax.twinx()
    ax2.step(ep, _col(m, "batch_size"), where="pre", color="tab:orange")  # a value holds during its epoch
    ax2.set_ylabel("batch size", color="tab:orange")
    _mark_events(ax, run["events"], lambda e: e)
    return _img(_png(fig), "learning rate and batch size")


def _shape(run: dict) -> str:
    import numpy as np

    m = [x for x in run["metrics"] if x.get("widths")]
    if not m:
        return '<p class="note">no widths recorded</p>'
    rows, names = aligned_widths(m)
    depth = max(len(r) for r in rows)
    grid = np.full((depth, len(m)), np.nan)
    for j, r in enumerate(rows):
        grid[: len(r), j] = r
    if names is None:
        names = layer_names(run["arch"]) if run["arch"] and len(layer_names(run["arch"])) == depth else [str(i) for i in range(depth)]
    fig, ax = _subplots(figsize=(min(14, 3 + 0.35 * len(m)), 1.5 + 0.2 * depth))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_yticks(range(depth), names, fontsize=7)
    epochs = [x["epoch"] for x in m]
    step = max(1, len(epochs) // 20)
    ax.set_xticks(range(0, len(epochs), step), epochs[::step])
    ax.set(xlabel="epoch (widths at its end)", title="every conv's output width per epoch (blank: block removed)")
    fig.colorbar(im, ax=ax, label="channels")
    for e in run["events"]:
        if (e.get("event") in ("prune", "morph") or _grew(e)) and e.get("epoch") in epochs:
            x = epochs.index(e["epoch"]) + 0.5  # the surgery happens after that epoch's line was written
            ax.axvline(x, color="white", lw=1.2, ls="--")
    note = '<p class="note">Dashed lines: surgeries (prune / morph / widen / deepen), listed under Events.</p>'
    return _img(_png(fig), "network shape over time") + note


def _flops(run: dict) -> str:
    m = run["metrics"]
    fig, axes = _subplots(1, 2, figsize=(12, 3.2))
    axes[0].step(_col(m, "epoch"), [f / 1e6 for f in _col(m, "flops_per_image")], where="pre")
    axes[0].set(xlabel="epoch", ylabel="MFLOPs per image (forward)", title="FLOPs per image")
    axes[1].plot([c / 60 for c in _col(m, "clock_s")], [f / 1e12 for f in _col(m, "train_flops")], marker=".")
    axes[1].set(xlabel="wall time (min)", ylabel="TFLOPs", title="cumulative training FLOPs")
    for ax in axes:
        ax.grid(alpha=0.3)
    return _img(_png(fig), "FLOPs")


def _confusion(run: dict) -> str:
    import numpy as np

    c = run["confusion"]
    if not c:
        return '<p class="note">no confusion.json in this run directory</p>'
    parts = []
    classes = c["classes"]
    for split in ("val", "test"):
        if not c.get(split):
            continue
        mat = np.asarray(c[split], dtype=float)
        n = len(classes)
        fig, axes = _subplots(1, 2, figsize=(12, 0.3 * n + 3), gridspec_kw={"width_ratios": [3, 2]})
        rows = mat / np.maximum(mat.sum(1, keepdims=True), 1)
        axes[0].imshow(rows, cmap="Blues", vmin=0, vmax=1)
        if n <= 40:
            axes[0].set_xticks(range(n), classes, rotation=90, fontsize=7)
            axes[0].set_yticks(range(n), classes, fontsize=7)
            if n <= 15:
                for i in range(n):
                    for j in range(n):
                        axes[0].text(j, i, int(mat[i, j]), ha="center", va="center", fontsize=7, color="white" if rows[i, j] > 0.5 else "black")
        axes[0].set(xlabel="predicted", ylabel="true", title=f"{split}: confusion (rows normalised)")
        acc = np.diag(mat) / np.maximum(mat.sum(1), 1)
        axes[1].barh(range(n), acc)
        axes[1].set_yticks(range(n), classes if n <= 40 else [""] * n, fontsize=7)
        axes[1].invert_yaxis()
        axes[1].set(xlim=(0, 1), xlabel="accuracy", title=f"{split}: per-class accuracy (overall {np.trace(mat) / max(mat.sum(), 1):.1%})")
        parts.append(_img(_png(fig), f"{split} confusion matrix"))
    return "".join(parts) or '<p class="note">no labelled split to score</p>'


# ---- tables -------------------------------------------------------------------------------------------------


def _table(header: list[str] | None, rows: list[list], cls: str = "") -> str:
    """An HTML table; ``header`` None for a two-column key/value table."""
    head = "" if header is None else "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in r) + "</tr>" for r in rows)
    return f'<table class="{cls}">{head}{body}</table>'


def _fmt(v) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return "-" if v is None else str(v)


def _pct(v) -> str:
    return "-" if v is None else f"{v:.2%}"


def _summary_rows(run: dict) -> list[list]:
    s = run["summary"] or {}
    return [
        ["validation accuracy (best model, every test-time view)", _pct(s.get("val_acc"))],
        ["validation accuracy after the best epoch (mirror only)", _pct(s.get("best_epoch_val_acc", s.get("val_acc")))],
        ["test accuracy", _pct(s.get("test_acc"))],
        ["epochs (best)", f"{s.get('epochs', '-')} ({s.get('best_epoch', '-')})"],
        ["stopped by", s.get("stop_reason", "-")],
        ["training time (steps only)", f"{s['train_time_s']:.0f} s" if "train_time_s" in s else "-"],
        ["wall time on the budget clock", f"{s['clock_s']:.0f} s" if "clock_s" in s else "-"],
        ["FLOPs per image (final)", f"{s['flops_per_image'] / 1e6:.1f} M" if "flops_per_image" in s else "-"],
        ["training FLOPs", f"{s['train_flops'] / 1e12:.2f} T" if "train_flops" in s else "-"],
        ["parameters", f"{s['params']:,}" if "params" in s else "-"],
        ["device, precision, torch", f"{s.get('device', '-')}, {s.get('precision', '-')}, {s.get('torch', '-')}"],
    ]


def _dataset(run: dict) -> str:
    ds = run["dataset"]
    if not ds:
        return '<p class="note">no dataset.json</p>'
    rows = [
        ["source", ds.get("source")],
        ["classes", f"{len(ds.get('classes', []))}: " + ", ".join(ds.get("classes", [])[:30]) + (" ..." if len(ds.get("classes", [])) > 30 else "")],
        ["working image size", f"{ds.get('image_size')} px, {ds.get('channels')} channel(s)"],
        ["training images (used for training / held out)", f"{ds.get('train_images')} ({ds.get('train_images_used')} / {ds.get('val_images')})"],
        ["test images", f"{ds.get('test_images')} ({'labelled' if ds.get('test_labeled') else 'unlabelled'})"],
        ["files skipped as unreadable", ds.get("skipped_files", 0)],
    ]
    out = _table(None, rows)
    counts = ds.get("class_counts")
    if counts:
        out += _table(["class", "training images"], list(zip(ds["classes"], counts, strict=False)))
    if run["samples"]:
        uri = "data:image/png;base64," + base64.b64encode(run["samples"]).decode("ascii")
        out += "<p>Sample training images, one row per class:</p>" + _img(uri, "sample images per class")
    return out


def _arch(run: dict) -> str:
    a = run["arch"]
    if not a:
        return '<p class="note">no arch.json</p>'
    rows = [["stem", 1, "-", a["stem"]]]
    for s, stage in enumerate(a["stages"], 1):
        for b, inner in enumerate(stage["inner"], 1):
            stride = (f"{stage['stride']} (max-pool)" if stage.get("pool") else stage["stride"]) if b == 1 else 1
            rows.append([f"s{s}.b{b}", stride, inner, stage["width"]])
    head = f"<p>{html.escape(a.get('name', 'custom'))}: {a['in_channels']} input channel(s), {a['num_classes']} classes, " \
           f"working size {a.get('image_size', '-')} px.</p>"
    return head + _table(["block", "stride", "conv1 width", "conv2 width (the stage's residual width)"], rows)


def _event_detail(e: dict) -> str:
    kind = e.get("event")
    if kind == "prune":
        return (f"FLOPs/image {e['flops_before'] / 1e6:.1f}M -> {e['flops_after'] / 1e6:.1f}M, batch "
                f"{e.get('batch_size_before')} -> {e.get('batch_size')}, removed {sum(e.get('removed', {}).values())} channels")
    skip = {"epoch", "event", "widths_before", "widths_after"}
    return ", ".join(f"{k} {v}" for k, v in e.items() if k not in skip)[:300]


def _events(run: dict) -> str:
    if not run["events"]:
        return '<p class="note">no events: the network kept its shape and training ran without faults</p>'
    return _table(["epoch", "event", "detail"], [[e.get("epoch"), e.get("event"), _event_detail(e)] for e in run["events"]], cls="text")


def _compression(run: dict) -> str:
    c = run["compression"]
    if not c:
        return '<p class="note">no compression.json: this run was not compressed</p>'
    stages = c if isinstance(c, list) else c.get("stages", []) if isinstance(c, dict) else []
    if not stages:
        return '<p class="note">compression.json has no stages</p>'
    rows = [
        [st.get("stage"), st.get("file"), None if st.get("size_bytes") is None else f"{st['size_bytes'] / 1024:.1f} KB",
         st.get("params"), None if st.get("flops_per_image") is None else f"{st['flops_per_image'] / 1e6:.1f} M",
         _pct(st.get("val_acc")), _pct(st.get("test_acc")), st.get("latency_b1_ms"), st.get("latency_b64_ms")]
        for st in stages
    ]
    head = ["stage", "file", "size", "params", "FLOPs/image", "val acc", "test acc", "batch-1 ms", "batch-64 ms"]
    notes = "".join(f"<li>{html.escape(str(st['stage']))}: {html.escape(str(st['note']))}</li>" for st in stages if st.get("note"))
    return _table(head, rows) + (f'<ul class="note">{notes}</ul>' if notes else "")


# ---- pages --------------------------------------------------------------------------------------------------


def _page(title: str, body: str) -> str:
    return (f"<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>\n")


def render_report(run: dict) -> str:
    def section(draw, needs_metrics: bool = False) -> str:
        if needs_metrics and not run["metrics"]:
            return '<p class="note">no epochs recorded</p>'
        try:
            return draw(run)
        except Exception as e:  # noqa: BLE001 - a file with unexpected content costs its section, not the report
            return f'<p class="note">could not draw this section ({html.escape(type(e).__name__)}: {html.escape(str(e)[:200])})</p>'

    sections = {
        "Summary": section(lambda r: _table(None, _summary_rows(r))),
        "Dataset": section(_dataset),
        "Training curves": section(_curves, True),
        "Learning rate and batch size": section(_lr_batch, True),
        "Network shape over time": section(_shape, True),
        "FLOPs": section(_flops, True),
        "Confusion matrix": section(_confusion),
        "Final architecture": section(_arch),
        "Events": section(_events),
        "Compression": section(_compression),
    }
    body = "".join(f'<h2 id="{k.lower().replace(" ", "-")}">{k}</h2>{v}' for k, v in sections.items())
    if run["config"]:
        body += f"<h2>Config</h2><p class=\"note\">re-run with <code>bonsai fit --config {html.escape(str(run['dir'] / 'config.yaml'))}</code></p>"
        body += f"<pre>{html.escape(run['config'])}</pre>"
    return _page(f"bonsai run {run['name']}", body)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write ``run_dir/report.html`` (or ``out``) from the run directory's files; returns its path."""
    run = read_run(run_dir)
    path = Path(out) if out else run["dir"] / "report.html"
    atomic_write_text(path, render_report(run))
    return path


def _unique_labels(runs: list[dict]) -> list[str]:
    names = [r["name"] for r in runs]
    if len(set(names)) == len(names):
        return names
    return [str(r["dir"]) for r in runs]


def write_comparison(run_dirs: list[str | Path], out: str | Path) -> Path:
    """One page overlaying accuracy vs time (and FLOPs per image vs time) of several runs, with a table of final
    accuracy, time, FLOPs and parameters."""
    runs = [read_run(d) for d in run_dirs]
    labels = _unique_labels(runs)
    fig, axes = _subplots(1, 2, figsize=(13, 4))
    for r, label in zip(runs, labels, strict=True):
        m = r["metrics"]
        clock = [c / 60 for c in _col(m, "clock_s")]
        axes[0].plot(clock, _col(m, "val_acc"), marker=".", label=label)
        axes[1].step(clock, [f / 1e6 for f in _col(m, "flops_per_image")], where="pre", label=label)
    axes[0].set(xlabel="wall time (min, budget clock)", ylabel="validation accuracy", title="accuracy vs time")
    axes[1].set(xlabel="wall time (min)", ylabel="MFLOPs per image", title="network cost vs time")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    rows = []
    for r, label in zip(runs, labels, strict=True):
        s = r["summary"] or {}
        rows.append([
            label, _pct(s.get("val_acc")), _pct(s.get("test_acc")), s.get("epochs"),
            None if s.get("train_time_s") is None else f"{s['train_time_s']:.0f} s",
            None if s.get("flops_per_image") is None else f"{s['flops_per_image'] / 1e6:.1f} M",
            None if s.get("train_flops") is None else f"{s['train_flops'] / 1e12:.2f} T",
            None if s.get("params") is None else f"{s['params']:,}",
        ])
    table = _table(["run", "val acc", "test acc", "epochs", "training time", "FLOPs/image", "training FLOPs", "params"], rows)
    body = f"<h2>Accuracy vs time</h2>{_img(_png(fig), 'accuracy vs time')}<h2>Final figures</h2>{table}"
    body += "<p class=\"note\">" + "<br>".join(html.escape(f"{lb}: {r['dir']}") for lb, r in zip(labels, runs, strict=True)) + "</p>"
    path = Path(out)
    atomic_write_text(path, _page(f"bonsai: {len(runs)} runs compared", body))
    return path
