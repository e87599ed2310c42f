"""``bonsai compress RUN`` and ``bonsai export RUN``: the run's best model through the compression stages, each
measured on this CPU (size on disk, parameters, FLOPs, batch-1 and batch-64 latency, validation and test accuracy),
recorded in ``RUN/compression.json``.

Stages: the PyTorch fp32 model (``model.safetensors``), its ONNX export, the int8-quantized ONNX model, the
Huffman-packed int8 model (restored bit for bit before it is scored), and weight sharing (k-means codebooks of
2**bits values per layer, indices Huffman-coded; Deep Compression's quantization) at 5 and 4 bits, each also with
its codebooks fine-tuned for an epoch (Deep Compression's trained quantization). The validation images are the ones
the run held out (same split, same seed); calibration and fine-tuning use training images only.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from bonsai.compress import onnx_export as ox
from bonsai.compress.sharing import finetune_shared_, pack_shared, unpack_shared
from bonsai.errors import BonsaiError
from bonsai.models.resnet import count_flops, count_params, save_model, state_bytes
from bonsai.surgery.grow import pad_widths_
from bonsai.utils import atomic_write_bytes, atomic_write_text

log = logging.getLogger("bonsai")

# onnxruntime's int8 convolutions run full tiles on multiples of 16 channels; a pruned network's widths (multiples
# of 8) are padded to this before quantizing (measured both ways by benchmarks/compress.py; see the README)
INT8_MULTIPLE = 16
FINAL_TOLERANCE = 0.005  # validation accuracy the final artifact may lose against the fp32 model (0.5 points)


def _images(split, size: int, channels: int) -> torch.Tensor:
    """uint8 NCHW pixels of a split, decoding its files when it streams."""
    if split.x is not None:
        return split.x
    from bonsai.data.sources import read_files

    decoded, bad = read_files(split.files, None, size, channels)
    if bad:
        raise BonsaiError(f"{bad[0][0]}: unreadable while compressing ({bad[0][1]})")
    return decoded.x


def _data(run, data: str | Path | None):
    """((train images, labels), val images, val labels, (test images, labels) or None, the run's config, the
    dataset) as the run saw them."""
    from bonsai import api, config
    from bonsai.data.sources import split_hash, split_validation

    cfg_path = run.dir / "config.yaml"
    if not cfg_path.is_file():
        raise BonsaiError(f"{run.dir}: no config.yaml; cannot tell which data the run used")
    cfg = config.load_yaml(cfg_path, run=True)
    cfg.data.image_size = run.image_size
    source = data or cfg.data.path
    if source is None:
        raise BonsaiError(f"{cfg_path}: names no data.path; give the dataset with --data")
    ds = api.read_dataset(source, cfg)
    if ds.classes != run.classes:
        raise BonsaiError(f"{source}: its classes differ from the run's ({len(ds.classes)} vs {len(run.classes)})")
    # the same images as well: other training images would draw another validation split, overlapping what the
    # run trained on, and every accuracy the pipeline compares on it would read high
    api.check_same_data(run.dir / "dataset.json", ds.meta(), f"give the run's own data with --data, not {source}")
    tr, va = split_validation(ds.train.y, cfg.data.val_fraction, cfg.seed, cfg.holdout_max)
    api.check_same_data(run.dir / "dataset.json", {"val_images": len(va), "val_split": split_hash(va)}, "cannot compare accuracies on its validation split")
    x = _images(ds.train, run.image_size, run.channels)
    test = None
    if ds.test is not None and ds.test.y is not None:
        test = (_images(ds.test, run.image_size, run.channels), ds.test.y)
    tr_t, va_t = torch.as_tensor(tr), torch.as_tensor(va)
    return (x[tr_t], ds.train.y[tr_t]), x[va_t], ds.train.y[va_t], test, cfg, ds


def finetune_kwargs(cfg, ds, image_size: int, teacher: str | Path | None = None) -> dict:
    """The fine-tunes' settings from the run's config: its augmentation's shift, and with ``teacher`` (a run
    directory or exported model, checked against the dataset as ``bonsai fit --teacher`` checks it) the frozen
    teacher with the run's ``distill.temperature`` and ``distill.alpha``."""
    out = {"translate": cfg.augment.pixels(image_size), "teacher": None}
    if teacher is not None:
        from bonsai.api import _teacher

        cfg.distill.teacher = str(teacher)
        out |= {"teacher": _teacher(cfg, ds, torch.device("cpu")).float(), "temperature": cfg.distill.temperature, "alpha": cfg.distill.alpha}
    return out


def _acc(logits: np.ndarray, y: torch.Tensor) -> float:
    return float((torch.as_tensor(logits).argmax(1) == y).float().mean())


@torch.no_grad()
def _torch_logits(model, x: torch.Tensor, batch: int = 256) -> np.ndarray:
    return torch.cat([model(x[i : i + batch]) for i in range(0, len(x), batch)]).numpy()


def _measure(name: str, file: Path, logits_fn, val, test, params: int, flops: int, runners: list) -> dict:
    """Size, parameters, FLOPs and accuracy of one stage; its latency is timed later, interleaved with the other
    stages' (see :func:`_latencies`), so that the host's noise falls on all of them alike."""
    xv, yv = val
    row = {
        "stage": name,
        "file": file.name,
        "size_bytes": file.stat().st_size,
        "params": params,
        "flops_per_image": flops,
        "val_acc": _acc(logits_fn(xv), yv),
        "test_acc": None if test is None else _acc(logits_fn(test[0]), test[1]),
    }
    runners.append((row, logits_fn))
    return row


def _latencies(runners: list, x: torch.Tensor, repeats: int, rounds: int = 1, warmup: int = 3) -> None:
    """Wall time of one call at batch 1 and 64 for every stage, taken round-robin within each runtime (PyTorch
    stages, then onnxruntime stages): each pass times every stage of the group once, and ``rounds`` rounds of
    ``repeats`` passes follow each other. A stage's ``latency_b{1,64}_ms`` is the median of all its calls, and
    ``latency_b{1,64}_ms_rounds`` holds each round's median, so that two stages can be compared round by round
    (:func:`latency_ratio`). The two runtimes are not interleaved with each other, as one's idle worker threads
    slow the other."""
    groups: dict[bool, list] = {}
    for row, fn in runners:
        groups.setdefault(row["stage"].startswith("ONNX"), []).append((row, fn))
    for group in groups.values():
        for b in (1, 64):
            sample = x[:b] if len(x) >= b else x[torch.arange(b) % len(x)]
            for _, fn in group:
                for _ in range(warmup):
                    fn(sample)
            times = [[[] for _ in range(rounds)] for _ in group]
            for r in range(rounds):
                for _ in range(repeats):
                    for i, (_, fn) in enumerate(group):
                        t0 = time.perf_counter()
                        fn(sample)
                        times[i][r].append(time.perf_counter() - t0)
            for (row, _), t in zip(group, times, strict=True):
                row[f"latency_b{b}_ms"] = round(1000 * float(np.median([v for tr in t for v in tr])), 3)
                row[f"latency_b{b}_ms_rounds"] = [round(1000 * float(np.median(tr)), 3) for tr in t]
    for row, _ in runners:
        log.info("%-54s %8.1f KB  val %.2f%%  b1 %.2f ms  b64 %.1f ms", row["stage"], row["size_bytes"] / 1024, 100 * row["val_acc"], row["latency_b1_ms"], row["latency_b64_ms"])


def round_ratios(stage: dict, reference: dict, batch: int = 64) -> list[float]:
    """``stage``'s latency over ``reference``'s in each timing round (the ratio of their medians in that round)."""
    key = f"latency_b{batch}_ms_rounds"
    return [a / b for a, b in zip(stage[key], reference[key], strict=True)]


def latency_ratio(stage: dict, reference: dict, batch: int = 64) -> float:
    """``stage``'s latency over ``reference``'s: the median over timing rounds of :func:`round_ratios`. Both were
    timed in the same rounds, call by call in turn, so each round's ratio compares the two at one moment; a shared
    host that changes pace between rounds changes which rounds are slow, not what a round compares (though a slow
    phase need not slow both stages alike)."""
    return round(float(np.median(round_ratios(stage, reference, batch))), 3)


def _module_flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x[:1])
    return int(counter.get_total_flops())


def compress(
    run_dir: str | Path, data: str | Path | None = None, calibration: int = 512, out: str | Path | None = None, repeats: int = 10,
    lowrank: float | None = None, finetune_epochs: float = 1.0, share_bits: tuple[int, ...] = (5, 4), share_finetune_epochs: float = 1.0,
    sparsity: float = 0.0, teacher: str | Path | None = None, rounds: int = 5,
) -> dict:
    """Run every stage on ``run_dir``'s best model; write the artifacts to ``out`` (default RUN/compressed) and
    ``RUN/compression.json``; return the record. ``lowrank``: also measure the SVD-factorized fp32 model keeping
    this share of each kernel's energy, before and after ``finetune_epochs`` of fine-tuning (a side branch: the
    int8 stages start from the unfactorized model). ``share_bits``: weight sharing at each of these codebook sizes
    (k-means, then Huffman; decoded to a PyTorch fp32 model to be scored and timed), each also after
    ``share_finetune_epochs`` of fine-tuning its codebooks on the training images (0: skip). ``sparsity``: also
    zero this share of the smallest weights of each layer (:func:`~bonsai.compress.sharing.sparsify_`), fine-tune
    the rest for ``finetune_epochs``, and share that model's weights at each of ``share_bits`` (plain and
    fine-tuned). ``teacher``: a run directory or exported model whose soft targets every fine-tune learns too
    (knowledge distillation; the run's own ``distill.temperature`` and ``distill.alpha``). Latency: ``rounds``
    rounds of ``repeats`` calls per stage and batch size (:func:`_latencies`)."""
    from bonsai.api import load

    if repeats < 1 or rounds < 1:
        raise BonsaiError(f"latency timing needs at least one round of one call, got rounds={rounds}, repeats={repeats}")
    if not 0 <= sparsity < 1:
        raise BonsaiError(f"sparsity must be in [0, 1), got {sparsity}")
    if calibration < 1:
        raise BonsaiError(f"calibration needs at least one training image, got {calibration}")
    if lowrank is not None and not 0 < lowrank <= 1:
        raise BonsaiError(f"lowrank is the share of each conv's energy to keep, in (0, 1], got {lowrank}")
    if not all(math.isfinite(e) and e >= 0 for e in (finetune_epochs, share_finetune_epochs)):
        raise BonsaiError(f"fine-tuning epochs must be >= 0, got {finetune_epochs} and {share_finetune_epochs}")

    run = load(run_dir)
    out = Path(out) if out else run.dir / "compressed"
    out.mkdir(parents=True, exist_ok=True)
    (train_x, train_y), xv, yv, test, cfg, ds = _data(run, data)
    seed = cfg.seed
    distill = finetune_kwargs(cfg, ds, run.image_size, teacher)
    how = "" if teacher is None else ", distilled from the teacher"
    g = torch.Generator().manual_seed(seed)
    calib = train_x[torch.randperm(len(train_x), generator=g)[:calibration]]
    model = run.model.float().eval()
    params, flops = count_params(model), count_flops(model.spec)
    val = (xv, yv)
    runners: list = []
    stages = [_measure("PyTorch fp32", run.dir / "model.safetensors", lambda x: _torch_logits(model, x), val, test, params, flops, runners)]

    lowrank_layers = None
    if lowrank is not None:
        from bonsai.compress.lowrank import factorize, finetune_

        small, lowrank_layers = factorize(model, xv[:2], energy=lowrank)
        n_small = f"{sum(r['replaced'] for r in lowrank_layers)} of {len(lowrank_layers)} convs factorized"
        path = out / "model.lowrank.safetensors"
        atomic_write_bytes(path, state_bytes(small))
        name = f"PyTorch fp32 low-rank {lowrank:g}"
        flops_small = _module_flops(small, xv[:1])
        stages.append(_measure(name, path, lambda x: _torch_logits(small, x), val, test, count_params(small), flops_small, runners))
        stages[-1]["note"] = f"{n_small}; no fine-tuning; a side branch"
        if finetune_epochs > 0:
            finetune_(small, train_x, train_y, finetune_epochs, seed=seed, **distill)
            atomic_write_bytes(path, state_bytes(small))
            name = f"{name} + fine-tune"
            stages.append(_measure(name, path, lambda x: _torch_logits(small, x), val, test, count_params(small), flops_small, runners))
            stages[-1]["note"] = f"{n_small}; fine-tuned {finetune_epochs:g} epoch(s) on the training images{how}; a side branch"

    fp32 = ox.export_onnx(model, out / "model.onnx")
    s32 = ox.session(fp32)
    parity = float(np.abs(ox.ort_logits(s32, xv[:256]) - _torch_logits(model, xv[:256])).max())
    stages.append(_measure("ONNX fp32", fp32, lambda x: ox.ort_logits(s32, x), val, test, params, flops, runners))

    # int8 kernels fill their tiles with 16 channels: the quantized model gets its widths padded with zero channels
    # to multiples of INT8_MULTIPLE (exact: pad_widths_), and where that changed them, the unpadded one is measured too
    padded = copy.deepcopy(model)
    grown = pad_widths_(padded, INT8_MULTIPLE)
    if grown:
        unpadded = ox.quantize_int8(fp32, out / "model.int8.unpadded.onnx", calib)
        s8u = ox.session(unpadded)
        stages.append(_measure("ONNX int8, widths as trained", unpadded, lambda x: ox.ort_logits(s8u, x), val, test, params, flops, runners))
        stages[-1]["note"] = "a side branch: the int8 stages below pad the widths"
        src = ox.export_onnx(padded, out / "model.padded.onnx")
        try:
            int8 = ox.quantize_int8(src, out / "model.int8.onnx", calib)
        finally:
            src.unlink(missing_ok=True)
    else:
        int8 = ox.quantize_int8(fp32, out / "model.int8.onnx", calib)
    s8 = ox.session(int8)
    p8, f8 = count_params(padded), count_flops(padded.spec)
    stages.append(_measure("ONNX int8", int8, lambda x: ox.ort_logits(s8, x), val, test, p8, f8, runners))
    if grown:
        stages[-1]["note"] = f"widths padded with zero channels to multiples of {INT8_MULTIPLE}: " + ", ".join(f"{g} {a}->{b}" for g, (a, b) in grown.items())

    packed, stats = ox.pack_onnx(int8)
    packed_path = out / "model.int8.bhf"
    atomic_write_bytes(packed_path, packed)
    restored = ox.unpack_onnx(packed_path.read_bytes(), str(packed_path))
    sh = ox.session(restored)
    stages.append(_measure("ONNX int8 + Huffman", packed_path, lambda x: ox.ort_logits(sh, x), val, test, p8, f8, runners))

    sharing = {}

    def share_stages(base_model, tag: str) -> None:
        """Weight sharing of ``base_model`` at each of ``share_bits``, plain and with its codebooks fine-tuned."""
        for bits in share_bits:
            key = f"{tag.strip().replace(' ', '_')}_{bits}" if tag else bits
            blob, sharing[key] = pack_shared(base_model, bits)
            path = out / f"model{tag.strip().replace(' ', '').replace('%', '')}.shared{bits}.bsw"
            atomic_write_bytes(path, blob)
            shared = unpack_shared(path.read_bytes(), str(path))
            name = f"PyTorch{tag} k-means {bits}-bit"
            stages.append(_measure(f"{name} + Huffman", path, lambda x, m=shared: _torch_logits(m, x), val, test, params, flops, runners))
            stages[-1]["note"] = f"{2**bits} shared values per layer, indices at {sharing[key]['index_bits_per_weight']:.2f} bits per weight; decoded to fp32 to run"
            if share_finetune_epochs > 0:
                tuned = finetune_shared_(copy.deepcopy(base_model), bits, train_x, train_y, share_finetune_epochs, seed=seed, **distill)
                blob, sharing[f"{key}_finetuned"] = pack_shared(tuned, bits)
                path = path.with_suffix(".tuned.bsw")
                atomic_write_bytes(path, blob)
                shared = unpack_shared(path.read_bytes(), str(path))
                stages.append(_measure(f"{name} fine-tuned + Huffman", path, lambda x, m=shared: _torch_logits(m, x), val, test, params, flops, runners))
                stages[-1]["note"] = (
                    f"codebooks fine-tuned {share_finetune_epochs:g} epoch(s) on the training images{how}, indices fixed; "
                    f"indices at {sharing[f'{key}_finetuned']['index_bits_per_weight']:.2f} bits per weight; decoded to fp32 to run"
                )

    share_stages(model, "")
    if sparsity > 0:
        from bonsai.compress.lowrank import finetune_
        from bonsai.compress.sharing import sparsify_, unshare_

        tag = f" sparse {sparsity:.0%}"
        sparse = sparsify_(copy.deepcopy(model), sparsity)
        if finetune_epochs > 0:
            finetune_(sparse, train_x, train_y, finetune_epochs, seed=seed, **distill)
        sparse = unshare_(sparse).eval()
        path = out / f"model.sparse{sparsity:g}.safetensors"
        atomic_write_bytes(path, state_bytes(sparse))
        stages.append(_measure(f"PyTorch fp32{tag}", path, lambda x: _torch_logits(sparse, x), val, test, params, flops, runners))
        tuned = f", then fine-tuned {finetune_epochs:g} epoch(s){how}" if finetune_epochs > 0 else ""
        stages[-1]["note"] = f"the smallest {sparsity:.0%} of each layer's weights (stem conv aside) set to zero{tuned}; zeros stored densely"
        share_stages(sparse, tag)

    _latencies(runners, xv, repeats, rounds)
    base = stages[0]
    by_name = {st["stage"]: st for st in stages}
    # the final artifact: the smallest stage (low-rank side branch aside) whose validation accuracy is within
    # FINAL_TOLERANCE of the fp32 model's; the test set plays no part in the choice
    final = min(
        (st for st in stages if "low-rank" not in st["stage"] and st["val_acc"] >= base["val_acc"] - FINAL_TOLERANCE),
        key=lambda st: st["size_bytes"],
    )
    record = {
        "run": str(run.dir),
        "calibration_images": len(calib),
        "teacher": cfg.distill.teacher if teacher is not None else None,
        "sparsity": sparsity,
        "onnx_parity_max_abs_logit_diff": parity,
        "huffman": stats,
        "weight_sharing": sharing,
        "stages": stages,
        "final_stage": final["stage"],
        "size_reduction_vs_fp32": round(base["size_bytes"] / final["size_bytes"], 2),
        "val_acc_drop_points": round(100 * (base["val_acc"] - final["val_acc"]), 2),
        "int8_latency_ratio_b64": latency_ratio(by_name["ONNX int8"], by_name["ONNX fp32"]),
        "lowrank_layers": lowrank_layers,
        "threads": torch.get_num_threads(),
    }
    atomic_write_text(run.dir / "compression.json", json.dumps(record, indent=1) + "\n")
    return record


def export(run_dir: str | Path, out: str | Path) -> dict:
    """An exported model folder: ``model.onnx`` plus the native ``arch.json`` + ``model.safetensors``, the
    ``dataset.json`` that ``bonsai predict`` reads, and ``predict.json`` with the run's test-time augmentation and
    precision, so ``bonsai predict`` on the folder predicts as on the run. The ONNX graph itself classifies the
    image alone. Returns the onnxruntime parity figures."""
    from bonsai.api import PREDICT_FILE, load, predict_settings

    run = load(run_dir)
    out = Path(out)
    if out.resolve() == run.dir.resolve():
        raise BonsaiError(f"{out}: export into a different folder than the run")
    out.mkdir(parents=True, exist_ok=True)
    model = run.model.float().eval()
    save_model(model, out)  # arch.json as the weights have it, even where the run's own copy was stale
    atomic_write_bytes(out / "dataset.json", (run.dir / "dataset.json").read_bytes())
    atomic_write_text(out / PREDICT_FILE, json.dumps(predict_settings(run), indent=1) + "\n")
    path = ox.export_onnx(model, out / "model.onnx")
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, run.channels, run.image_size, run.image_size), dtype=torch.uint8, generator=g)
    with torch.no_grad():
        diff = float(np.abs(ox.ort_logits(ox.session(path), x) - model(x).numpy()).max())
    return {"onnx": str(path), "max_abs_logit_diff": diff, "opset": ox.OPSET}
