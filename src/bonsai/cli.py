"""Command line: ``bonsai fit | report | export | compress | predict | info | demo | config``."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import yaml

_FIT_HELP = """\
Train a ResNet on DATA and write a run directory: config.yaml, dataset.json, metrics.jsonl, events.jsonl,
arch.json + model.safetensors (best model by validation accuracy), checkpoint.safetensors (resumable),
predictions.csv (test images), summary.json.

DATA is an image folder (train/<class>/..., optional test/), a labels CSV (filename,label) beside the images,
or a .npz (x_train, y_train[, x_test, y_test, classes]) or a folder of *_partKofN.npz parts.

Stopping: --epochs N, --budget 10m (training + validation must end inside it), or train.patience=P (stop when
validation accuracy has not improved for P epochs); with none of them, 20 epochs.

Speed: with --budget and neither --arch nor --epochs, bonsai measures a few training steps of its default network
at several widths and picks the widest one expected to fit enough epochs to see train.plan_images (1 M) training
images, but at most train.plan_epochs (32) and at least one. By default (--adapt, unless --prune, --flops or
--no-adapt) it trains a narrower one for the first epoch and then grows it to the pick (Net2Net; a x0.5 pick
starts at itself, since narrower widths would fall below 16), and a controller
may prune or grow it further at plateaus; --no-adapt trains the pick as it is. Training starts on images at half
the working size, growing to full size over the first half (train.low_res=1 switches this off); predictions
average each image with its mirror and, for the final model, with copies shifted one pixel (train.tta_shift=0
drops the shifts, train.tta=false all test-time augmentation).

Shape: --prune removes channels and whole blocks that a FLOP-weighted group lasso drives to zero (prune.lpr,
default 0.2, is its strength; 10-epoch runs need about 0.35-0.5). --flops 40M then scales every width to that
many FLOPs per image (MorphNet). --adapt decides after every epoch to continue, prune, widen, deepen or stop;
with --budget it first moves the network to the FLOPs per image the budget affords (pruned down, or grown by
Net2Net), unless --flops gives the target; with no --arch it starts narrower than the planner's pick (when that
keeps every width at 16 or more) and grows to it after the first epoch (the default under --budget).

Several processes: `torchrun --nproc-per-node N -m bonsai fit ...` trains with DistributedDataParallel (gloo on
CPUs, NCCL on GPUs); batch_size stays the global batch, rank 0 writes the run directory, surgery runs in lockstep.

Any config key can be set as key=value (dotted, or a bare name that is unique): e.g. lr=0.2 augment.flip=false
data.image_size=48. `bonsai config --show` prints every key with its default.
"""

_EPILOG = """\
examples:
  bonsai demo                                   # train on the packaged CIFAR-10 subset (~2 minutes)
  bonsai info path/to/data                      # what bonsai finds in a dataset
  bonsai fit path/to/data --budget 10m          # train within 10 minutes
  bonsai fit data.npz --epochs 30 --arch resnet20 --out runs/r20 lr=0.2
  bonsai fit data.npz --epochs 10 --prune prune.lpr=0.5     # prune while training
  bonsai fit --resume runs/r20                  # continue an interrupted run
  torchrun --nproc-per-node 2 -m bonsai fit data.npz --epochs 10 --prune   # data-parallel, 2 processes
  bonsai predict runs/r20 new_images/ --out preds.csv
  bonsai report runs/r20                        # runs/r20/report.html: curves, widths, confusion matrix
  bonsai report runs/a runs/b --out cmp.html    # accuracy vs time of several runs, side by side

exit codes: 0 done; 2 bad input (one line naming the file); 1 a system error (e.g. an unwritable file, out of
memory); 70 an internal error (one line; BONSAI_DEBUG=1 shows its traceback); 130 / 143 stopped by Ctrl-C /
SIGTERM (resumable).
"""


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="bonsai",
        description="Train a compact CNN on an image-classification dataset it has never seen, fast.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = ap.add_subparsers(dest="command", metavar="COMMAND", required=True)

    f = sub.add_parser("fit", help="train on a dataset", description=_FIT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("args", nargs="*", metavar="DATA | key=value", help="the dataset, then config overrides")
    f.add_argument("--out", help="run directory (default runs/<data>-<time>)")
    f.add_argument("--budget", help="wall-clock budget for training + validation, e.g. 90s, 10m, 1h (validation then holds out at most about data.budget_val_max = 2000 images)")
    f.add_argument("--epochs", type=int, help="train for exactly N epochs")
    f.add_argument("--arch", help="auto (default: with --budget, the bonsai preset scaled to fit the budget, grown into from a narrower one unless --no-adapt or the pick is x0.5; else bonsai) | bonsai | resnet8 | resnet20 | resnet32 | resnet56 | path/to/arch.json")
    f.add_argument("--config", help="a YAML config (e.g. a previous run's config.yaml); overrides apply on top")
    f.add_argument("--seed", type=int)
    f.add_argument("--resume", metavar="RUN", help="continue RUN from its last checkpoint")
    f.add_argument("--prune", action="store_true", help="PruneTrain: prune channels while training (prune.* keys tune it)")
    f.add_argument(
        "--flops",
        metavar="N",
        help="MorphNet: prune (implies --prune), then scale the widths to at most N forward FLOPs per image, e.g. 40M "
        "(prune.target_flops; with --adapt, the controller's target)",
    )
    adapt = f.add_mutually_exclusive_group()
    adapt.add_argument(
        "--adapt",
        action="store_true",
        help="prune while training and let a controller decide after every epoch to continue, prune, widen, deepen or "
        "stop; with a FLOP target (--flops, or under --budget the FLOPs the budget affords) the network is first moved "
        "to it (adapt.* keys tune it; implies --prune). On by default under --budget with no --arch, --epochs, --prune or --flops",
    )
    adapt.add_argument(
        "--no-adapt",
        action="store_true",
        help="train the planned network as it is, with no controller (the default before --adapt measured ahead of it)",
    )
    f.add_argument("--quiet", action="store_true", help="no progress output")
    f.add_argument("--teacher", metavar="RUN", help="distill: also learn this run's soft targets (distill.* keys tune it)")
    f.add_argument("--log", metavar="LOGGERS", help="extra loggers, comma-separated: tensorboard (scalars in RUN/tensorboard/)")

    r = sub.add_parser(
        "report",
        help="write a run's HTML report, or compare several runs",
        description="One RUN: write RUN/report.html (plots and tables from the run directory's files, images inlined: "
        "it opens offline). Several RUNs: one page overlaying their accuracy-vs-time curves, with a table of final "
        "accuracy, time, FLOPs and parameters (default bonsai-compare.html).",
    )
    r.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    r.add_argument("--out", help="where to write the HTML (default RUN/report.html, or bonsai-compare.html for several runs)")
    r.add_argument("--screenshot", metavar="PNG", help="also save the page as headless Chromium draws it (needs chromium)")

    x = sub.add_parser("export", help="export a run's best model: ONNX + arch.json + model.safetensors")
    x.add_argument("run", help="a run directory")
    x.add_argument("--out", required=True, help="folder for model.onnx, arch.json, model.safetensors, dataset.json, predict.json")

    k = sub.add_parser(
        "compress",
        help="int8-quantize and Huffman-code a run's model, measuring size, latency and accuracy",
        description="The run's best model through PyTorch fp32 -> ONNX fp32 -> ONNX int8 -> int8 + Huffman, and "
        "weight sharing (k-means codebooks per layer + Huffman-coded indices; then with the codebooks fine-tuned), and with "
        "--sparsity the same after zeroing the smallest weights, each measured on this CPU (size on disk, batch-1/64 "
        "latency, validation and test accuracy on the run's own split). Fine-tunes use the run's own augmentation. "
        "Writes RUN/compressed/ and RUN/compression.json.",
    )
    k.add_argument("run", help="a run directory")
    k.add_argument("--data", help="the dataset (default: data.path from the run's config.yaml)")
    k.add_argument("--calibration", type=int, default=512, help="training images used to calibrate int8 ranges (default 512)")
    k.add_argument("--out", help="folder for the artifacts (default RUN/compressed)")
    k.add_argument("--lowrank", type=float, metavar="ENERGY", help="also measure SVD low-rank convs keeping this share of energy, e.g. 0.9")
    k.add_argument("--finetune-epochs", type=float, default=1.0, help="fine-tuning of the low-rank and sparse models on the training images (default 1)")
    k.add_argument("--share-bits", default="5,4", help="weight sharing: codebook sizes in bits, comma-separated (default 5,4; 0: none)")
    k.add_argument(
        "--share-finetune-epochs", type=float, default=1.0,
        help="fine-tuning of each weight-shared model's codebooks on the training images, indices fixed (default 1; 0: skip)",
    )
    k.add_argument(
        "--sparsity", type=float, default=0.0, metavar="S",
        help="also zero the smallest S of each layer's weights (e.g. 0.5), fine-tune the rest for --finetune-epochs, "
        "and weight-share that model too (Deep Compression's pruning; zeros cost under a bit each)",
    )
    k.add_argument("--teacher", metavar="RUN", help="every fine-tune also learns this run's (or exported model's) soft targets")
    k.add_argument("--rounds", type=int, default=5, help="latency timing rounds; a latency ratio is the median of the rounds' ratios (default 5)")
    k.add_argument("--repeats", type=int, default=10, help="calls per stage and batch size in each timing round (default 10)")

    p = sub.add_parser("predict", help="classify images with a trained run")
    p.add_argument("run", help="a run directory (arch.json + model.safetensors + dataset.json)")
    p.add_argument("images", help="an image file, a folder of images (searched recursively), or a .npz with x_test")
    p.add_argument("--out", help="write a CSV here (file,label,<class probabilities>); default: print to stdout")
    p.add_argument(
        "--tta", choices=("auto", "on", "off"), default="auto",
        help="average each image's prediction with its mirror and shifted copies; auto: as the run's final "
        "predictions did (an exported model: as its predict.json says); on: the mirror plus the run's shifts",
    )

    i = sub.add_parser("info", help="show what bonsai finds in a dataset")
    i.add_argument("data")
    i.add_argument("args", nargs="*", metavar="key=value", help="data.* overrides, e.g. data.image_size=48")

    d = sub.add_parser("demo", help="train on the packaged demo data (5,000 CIFAR-10 images, about 2 minutes)")
    d.add_argument("--out", help="run directory (default runs/demo-<time>)")
    d.add_argument("--budget", default="90s", help="training budget (default 90s)")
    d.add_argument("--quiet", action="store_true")

    c = sub.add_parser("config", help="print the fully resolved configuration")
    c.add_argument("--show", action="store_true", help="print it (the default action)")
    c.add_argument("--config", help="start from this YAML file")
    c.add_argument("args", nargs="*", metavar="key=value")
    return ap


def _split_args(items: list[str]) -> tuple[list[str], list[str]]:
    positional = [a for a in items if "=" not in a]
    overrides = [a for a in items if "=" in a]
    return positional, overrides


def _cmd_fit(ns) -> int:
    from bonsai import api, config
    from bonsai.errors import BonsaiError

    positional, items = _split_args(ns.args)
    if len(positional) > 1:
        raise BonsaiError(f"fit takes one DATA path, got {positional}")
    kw = dict(config.parse_override(item) for item in items)  # on top of --config or the resumed run's config
    flags = {"out": ns.out, "budget": ns.budget, "epochs": ns.epochs, "arch": ns.arch, "seed": ns.seed, "log": ns.log, "distill.teacher": ns.teacher}
    kw.update({k: v for k, v in flags.items() if v is not None})
    if ns.budget is not None and ns.epochs is None:
        kw["epochs"] = None  # a budget replaces the epoch count of a loaded config
    if ns.quiet:
        kw["quiet"] = True
    if ns.flops is not None:
        from bonsai.utils import parse_count

        kw["prune.target_flops"] = parse_count(ns.flops)
    if ns.adapt:
        kw["adapt.on"] = True
    if ns.no_adapt:
        kw["adapt.on"] = False
        if not ns.prune and ns.flops is None:  # the pick as it is, even from a config.yaml that --adapt resolved
            kw["prune.enabled"] = False
            kw["model.zero_init_residual"] = None
    if ns.prune or ns.flops is not None or ns.adapt:
        kw["prune.enabled"] = True
        if not any(k.split(".")[-1] == "zero_init_residual" for k in kw):
            kw["model.zero_init_residual"] = None  # re-derive it (off when pruning), even from an old config.yaml
    run = api.fit(positional[0] if positional else None, ns.config, resume=ns.resume, **kw)
    if run is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    _print_summary(run)
    return _exit_code(run)


def _exit_code(run) -> int:
    """0, or 130 / 143 for a fit stopped by Ctrl-C / SIGTERM (its best model and predictions are written)."""
    from bonsai.utils import STOP_SIGNALS

    reason = run.summary["stop_reason"]
    if reason in STOP_SIGNALS:
        print(f"bonsai: stopped by {reason.upper()}; continue with `bonsai fit --resume {run.dir}`", file=sys.stderr)
        return STOP_SIGNALS[reason]
    return 0


def _print_summary(run) -> None:
    s = run.summary
    test = f", test accuracy {s['test_acc']:.2%}" if s.get("test_acc") is not None else ""
    print(
        f"done: {run.dir}  val accuracy {s['val_acc']:.2%}{test}  ({s['epochs']} epochs, "
        f"{s['train_time_s']:.0f}s training, stopped by {s['stop_reason']})"
    )
    if (run.dir / "predictions.csv").is_file():
        print(f"predictions: {run.dir / 'predictions.csv'}")


def _cmd_report(ns) -> int:
    from bonsai.report.html import write_comparison, write_report

    if len(ns.runs) == 1:
        path = write_report(ns.runs[0], ns.out)
    else:
        path = write_comparison(ns.runs, ns.out or "bonsai-compare.html")
    print(f"wrote {path}")
    if ns.screenshot:
        from bonsai.report.browser import decoded_images, screenshot

        total, ok = decoded_images(path)
        print(f"wrote {screenshot(path, ns.screenshot)} (Chromium decoded {ok} of {total} images)")
    return 0


def _cmd_export(ns) -> int:
    from bonsai.compress.pipeline import export

    r = export(ns.run, ns.out)
    print(f"wrote {ns.out}: model.onnx (opset {r['opset']}, dynamic batch), arch.json, model.safetensors, dataset.json, predict.json")
    print(f"onnxruntime vs PyTorch: max abs logit difference {r['max_abs_logit_diff']:.2e}")
    return 0


def _cmd_compress(ns) -> int:
    from bonsai.compress.pipeline import compress
    from bonsai.errors import BonsaiError

    try:
        bits = tuple(int(b) for b in ns.share_bits.split(",") if b.strip() and int(b) != 0)
    except ValueError:
        raise BonsaiError(f"--share-bits {ns.share_bits!r}: expected comma-separated integers from 1 to 8") from None
    if any(not 1 <= b <= 8 for b in bits):
        raise BonsaiError(f"--share-bits {ns.share_bits!r}: each must be from 1 to 8")
    r = compress(
        ns.run, ns.data, ns.calibration, ns.out, lowrank=ns.lowrank, finetune_epochs=ns.finetune_epochs, share_bits=bits, share_finetune_epochs=ns.share_finetune_epochs,
        sparsity=ns.sparsity, teacher=ns.teacher, rounds=ns.rounds, repeats=ns.repeats,
    )
    w = max(len(st["stage"]) for st in r["stages"])
    print(f"{'stage':{w}s} {'size':>10s} {'val acc':>8s} {'test acc':>8s} {'b1 ms':>7s} {'b64 ms':>7s}")
    for st in r["stages"]:
        test = "-" if st["test_acc"] is None else f"{st['test_acc']:.2%}"
        print(f"{st['stage']:{w}s} {st['size_bytes'] / 1024:8.1f}KB {st['val_acc']:8.2%} {test:>8s} {st['latency_b1_ms']:7.2f} {st['latency_b64_ms']:7.1f}")
    print(f"int8 / fp32 onnxruntime latency at batch 64: {r['int8_latency_ratio_b64']:.3f} (the median of {ns.rounds} rounds' ratios)")
    print(
        f"final: {r['final_stage']} (the smallest within 0.5 points of fp32 on validation), "
        f"{r['size_reduction_vs_fp32']}x smaller than model.safetensors; wrote {Path(ns.run) / 'compression.json'}"
    )
    return 0


def _cmd_predict(ns) -> int:
    from bonsai import api

    preds = api.load(ns.run).predict(ns.images, tta={"auto": None, "on": True, "off": False}[ns.tta])
    if ns.out:
        preds.to_csv(ns.out)
        print(f"wrote {len(preds.names)} predictions to {ns.out}")
    else:
        for name, label, row in zip(preds.names, preds.labels, preds.probs):
            print(f"{name},{label},{row.max():.4f}")
    return 0


def _cmd_info(ns) -> int:
    from bonsai import api, config

    ds = api.read_dataset(ns.data, config.apply_overrides(config.FitConfig(), ns.args), progress=True)
    print(ds.describe())
    return 0


def _cmd_demo(ns) -> int:
    import time

    from bonsai import api
    from bonsai.data.demo import extract_demo
    from bonsai.train import distributed

    dist = distributed.current()  # under torchrun: rank 0 names the run and unpacks, the others wait for it
    out = Path(ns.out) if ns.out else Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(dist.broadcast_json(str(out)))
    if dist.main:
        data = extract_demo(out.parent / "demo-data")
        print(f"demo: 5,000 CIFAR-10 training images (500 per class) and 1,000 labeled test images in {data}")
    dist.barrier()
    if not dist.main:
        data = extract_demo(out.parent / "demo-data")  # there already
    run = api.fit(data, budget=ns.budget, out=str(out), quiet=ns.quiet)
    if run is None:  # a rank other than 0
        return 0
    _print_summary(run)
    return _exit_code(run)


def _cmd_config(ns) -> int:
    from bonsai import config

    cfg = config.load_yaml(ns.config) if ns.config else config.FitConfig()
    cfg = config.apply_overrides(cfg, ns.args).resolved()
    print(yaml.safe_dump(config.to_dict(cfg), sort_keys=False), end="")
    return 0


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is logged, not the stream at set-up: a caller that swaps
    or closes stderr after calling :func:`main` (pytest's capture, an embedding program) never leaves the
    ``bonsai`` logger writing to a closed stream."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self):  # noqa: D102
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"bonsai: {record.levelname.lower()}: {record.getMessage()}"


def main(argv: list[str] | None = None) -> int:
    """The ``bonsai`` command: returns its exit code. Under torchrun the process leaves with that code at once
    (``os._exit``), once its files are written, its output flushed and the process group destroyed: gloo's worker
    threads outlive ``destroy_process_group`` and may still be releasing a finished collective's tensors when
    the interpreter shuts down, which needs the GIL there and aborts the process (SIGABRT, "terminate called
    without an active exception"; seen once in about 30 two-process runs on a 2-core host)."""
    try:
        code = _main(argv)
    except BaseException as e:
        if not _leave_process_group():
            raise
        if isinstance(e, SystemExit):
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        else:  # BONSAI_DEBUG's re-raised fault: its traceback, then out like any other exit
            import traceback

            traceback.print_exc()
            code = 1
        _exit_now(code)
    if _leave_process_group():
        _exit_now(code)
    return code


def _exit_now(code: int) -> None:
    """Flush what the process printed and logged, then leave without the interpreter's shutdown (see main)."""
    for flush in (sys.stdout.flush, sys.stderr.flush, logging.shutdown):
        try:
            flush()
        except (OSError, ValueError):  # a closed or broken stream: nothing more can reach it
            pass
    os._exit(code)


def _main(argv: list[str] | None) -> int:
    from bonsai.errors import BonsaiError, Interrupted

    handler = _StderrHandler()
    handler.setFormatter(_Formatter())
    logger = logging.getLogger("bonsai")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    parser = _parser()
    ns, extra = parser.parse_known_args(argv)
    # positionals (DATA, key=value) may follow options: argparse leaves those for us to collect
    stray = [a for a in extra if a.startswith("-") or not hasattr(ns, "args")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        ns.args = list(ns.args) + extra
    commands = {"fit": _cmd_fit, "report": _cmd_report, "export": _cmd_export, "compress": _cmd_compress, "predict": _cmd_predict, "info": _cmd_info, "demo": _cmd_demo, "config": _cmd_config}
    try:
        return commands[ns.command](ns)
    except Interrupted as e:
        print(f"bonsai: {e}", file=sys.stderr)
        return e.code
    except BonsaiError as e:
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. an --out path that cannot be written: the message names the file
        print(f"bonsai: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("bonsai: interrupted; resume with `bonsai fit --resume RUN`", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a fault of bonsai's, not of the input: one line, its traceback on request
        from bonsai.train.engine import is_out_of_memory

        if isinstance(e, MemoryError) or is_out_of_memory(e):  # Python's allocator, or PyTorch's RuntimeError / OutOfMemoryError
            print("bonsai: error: out of memory (a smaller batch_size, or data.in_memory=no for a large dataset)", file=sys.stderr)
            return 1
        if os.environ.get("BONSAI_DEBUG"):
            raise
        first = str(e).split("\n")[0][:300]
        print(f"bonsai: internal error: {type(e).__name__}: {first} (BONSAI_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 70


def _leave_process_group() -> bool:
    """Under torchrun, leave the process group while the interpreter is whole (PyTorch's documented shutdown);
    whether there was one to leave. Local: no rank waits for another."""
    tdist = sys.modules.get("torch.distributed")
    if tdist is not None and tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()
        return True
    return False


if __name__ == "__main__":
    sys.exit(main())
