"""Data-parallel training (bonsai.train.distributed): data shards, agreement checks, and real 2-process gloo runs
on loopback (torchrun), pruning and growing in lockstep."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from bonsai.data.loader import Loader
from bonsai.data.sources import Split
from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import build
from bonsai.train.distributed import Dist, shard_range, state_digest

from conftest import make_images


@pytest.mark.parametrize("n,world", [(10, 2), (11, 2), (7, 3), (2, 4), (0, 2)])
def test_shard_range_gives_contiguous_chunks_that_cover_the_split(n: int, world: int):
    ranges = [shard_range(n, r, world) for r in range(world)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    sizes = [e - s for s, e in ranges]
    assert max(sizes) - min(sizes) <= 1


def _numbered_split(n: int) -> Split:
    """Images whose first pixel is their index, so a batch tells which images it holds."""
    x = torch.zeros(n, 3, 8, 8, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return Split(names=[str(i) for i in range(n)], y=torch.arange(n) % 3, x=x)


def _ids(loader: Loader, epoch: int = 3) -> list[list[int]]:
    return [xb[:, 0, 0, 0].tolist() for xb, _ in loader.batches(epoch)]


def test_training_ranks_split_every_global_batch_like_a_distributed_sampler():
    split = _numbered_split(50)
    kw = dict(batch_size=8, device=torch.device("cpu"), train=True, seed=5, channels_last=False)
    whole = _ids(Loader(split, **kw))
    ranks = [_ids(Loader(split, rank=r, world=2, **kw)) for r in range(2)]
    assert len(whole) == len(ranks[0]) == len(ranks[1]) == 50 // 8
    for step, batch in enumerate(whole):
        assert ranks[0][step] == batch[0::2] and ranks[1][step] == batch[1::2]
    assert Loader(split, rank=1, world=2, **kw).images_per_epoch == 48  # the global count drives the schedule


def test_evaluation_ranks_hold_contiguous_chunks_in_order():
    split = _numbered_split(23)
    kw = dict(batch_size=4, device=torch.device("cpu"), channels_last=False)
    parts = [sum(_ids(Loader(split, rank=r, world=3, **kw)), []) for r in range(3)]
    assert parts[0] + parts[1] + parts[2] == list(range(23))
    assert [len(p) for p in parts] == [8, 8, 7]


def test_a_streaming_rank_decodes_only_its_own_files(tmp_path: Path, monkeypatch):
    from bonsai.data import loader as loader_mod

    decoded = []
    real = loader_mod._FileImages.__getitem__
    monkeypatch.setattr(loader_mod._FileImages, "__getitem__", lambda self, i: decoded.append(i) or real(self, i))
    files = []
    for i in range(12):
        a = np.zeros((8, 8, 3), dtype=np.uint8)
        a[0, 0, 0] = i * 10
        files.append(tmp_path / f"{i}.png")
        Image.fromarray(a).save(files[-1])
    split = Split(names=[f.name for f in files], y=torch.arange(12) % 3, files=files)
    kw = dict(batch_size=4, device=torch.device("cpu"), train=True, seed=1, channels_last=False, size=8)
    memory = _numbered_split(12)
    for r in range(2):
        decoded.clear()
        streamed = [[v // 10 for v in b] for b in _ids(Loader(split, rank=r, world=2, **kw))]
        assert streamed == _ids(Loader(memory, rank=r, world=2, **kw))  # same order and shard as in memory
        assert all(len(b) == 2 for b in streamed)
        assert sorted(decoded) == sorted(sum(streamed, []))  # no other rank's file was read


def test_one_process_communicates_nothing():
    d = Dist()
    assert not d.on and d.main
    assert d.max(1.5, 2.0) == [1.5, 2.0] and d.any(False) is False and d.min_int(7) == 7
    assert d.broadcast_json({"a": [1]}) == {"a": [1]}
    t = torch.rand(5, 3)
    assert d.gather_rows(t, 5) is t
    model = build(ArchSpec.resnet((8,), 1, num_classes=3, image_size=8))
    assert d.wrap(model) is model


def test_state_digest_sees_weights_buffers_and_momentum():
    torch.manual_seed(0)
    model = build(ArchSpec.resnet((8,), 1, num_classes=3, image_size=8))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(4, 3, 8, 8)).sum().backward()
    opt.step()
    base = state_digest(model, opt)
    assert base == state_digest(model, opt)
    buf = opt.state[next(model.parameters())]["momentum_buffer"].view(-1)
    old = buf[0].clone()
    buf[0] = torch.nextafter(old, old + 1)  # one momentum entry, one ulp
    assert state_digest(model, opt) != base
    buf[0] = old
    assert state_digest(model, opt) == base
    next(b for b in model.buffers() if b.is_floating_point()).view(-1)[0] += 1.0
    assert state_digest(model, opt) != base


def _two_ranks(rank: int, store: str, q) -> None:
    """One rank of a 2-rank gloo group started through a file store: each agreement primitive on rank-dependent
    inputs, then a weight nudged on rank 1 only."""
    import torch.distributed as tdist

    from bonsai.errors import BonsaiError
    from bonsai.train import distributed

    tdist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        d = distributed.current()  # the group this process already started
        out = {"rank": d.rank, "world": d.world}
        out["max"] = d.max(float(rank), -float(rank))
        out["any"] = d.any(rank == 1)
        out["min_int"] = d.min_int(100 + rank)
        out["mean"] = d.mean(float(rank))
        out["json"] = d.broadcast_json({"rank": rank, "keep": [1, 2]})
        out["signal"] = d.signal("sigterm" if rank == 1 else None)
        out["both_signals"] = d.signal("sigterm" if rank == 1 else "sigint")
        out["no_signal"] = d.signal(None)
        start, end = shard_range(5, rank, 2)  # chunks of 3 and 2 rows
        out["gathered"] = d.gather_rows(torch.arange(start, end, dtype=torch.float32)[:, None].repeat(1, 2), 5).tolist()
        torch.manual_seed(0)
        model = build(ArchSpec.resnet((8,), 1, num_classes=3, image_size=8))
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        out["digest"] = d.check_same(model, opt, "a test")
        with torch.no_grad():
            if rank == 1:
                next(model.parameters()).view(-1)[0] += 1e-6
        try:
            d.check_same(model, opt, "a test")
            out["error"] = None
        except BonsaiError as e:
            out["error"] = str(e)
        q.put(out)
    finally:
        tdist.destroy_process_group()


def test_two_ranks_agree_on_every_decision_input_and_catch_diverged_weights(tmp_path: Path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_two_ranks, args=(r, str(tmp_path / "store"), q)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
    results = sorted((q.get(timeout=5) for _ in procs), key=lambda r: r["rank"])
    assert [r["world"] for r in results] == [2, 2]
    for r in results:
        assert r["max"] == [1.0, 0.0] and r["any"] is True and r["min_int"] == 100 and r["mean"] == 0.5
        assert r["json"] == {"rank": 0, "keep": [1, 2]}  # rank 0's
        assert r["signal"] == "sigterm" and r["no_signal"] is None  # rank 1's signal stops rank 0 too
        assert r["both_signals"] == "sigterm"  # one reason on every rank
        assert r["gathered"] == [[float(i)] * 2 for i in range(5)]
        assert len(r["digest"]) == 64 and r["digest"] == results[0]["digest"]  # agreed at first
        assert r["error"] and "ranks [1] hold different weights from rank 0 after a test" in r["error"]


# ---- real torchrun runs ----------------------------------------------------------------------------------------

FORCED = [  # prune every epoch at a high threshold; then the controller widens at the first plateau
    "--prune", "batch_size=16", "--quiet", "precision=fp32", "train.low_res=1.0", "prune.lpr=0.5", "prune.interval=1",
    "prune.threshold=0.25", "prune.min_width=2", "prune.round_to=1", "adapt.on=true", "adapt.plateau_epochs=1",
    "adapt.window=2", "adapt.min_delta=1.0", "adapt.min_left=0.0", "adapt.max_growths=1", "adapt.max_gap=1.0",
    "adapt.saturated=1.0",
]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "bonsai", "fit", *args]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A 2-process run (pruned and widened, then resumed for one more epoch), its 1-process twin, and a 2-process
    run under a time budget with the planned network grown into by --adapt (and the whitened stem, which rank 0
    computes and hands to rank 1)."""
    root = tmp_path_factory.mktemp("ddp")
    x, y = make_images(40)
    np.savez(root / "d.npz", x_train=x, y_train=y, x_test=x[:12], y_test=y[:12])
    ArchSpec.resnet((16, 32), 1, num_classes=3, image_size=16).to_json(root / "arch.json")
    common = [str(root / "d.npz"), "--arch", str(root / "arch.json"), "--epochs", "4", *FORCED]
    _torchrun(*common, "--out", "two", "train.rank_dir=ranks", cwd=root)
    first = {
        "metrics": (root / "two" / "metrics.jsonl").read_text(),
        "events": (root / "two" / "events.jsonl").read_text(),
        "rank1": _tensors(root / "ranks" / "rank1" / "checkpoint.safetensors"),
        "rank0": _tensors(root / "two" / "checkpoint.safetensors"),
    }
    _torchrun("--resume", "two", "epochs=5", "train.rank_dir=ranks", cwd=root)
    # the budget clock: every rank stops at the same step when the (synchronized) budget runs out; no --arch, so
    # the planner picks the network and --adapt (the default under --budget) grows into it from a narrower start
    # (train.plan_epochs=1: the pick is wide on any host, so a narrower start exists)
    _torchrun(str(root / "d.npz"), "--budget", "6s", "batch_size=16", "train.plan_epochs=1", "--quiet", "--out", "budget", "train.rank_dir=ranks_budget", "model.whiten_stem=true", cwd=root)
    subprocess.run([sys.executable, "-m", "bonsai", "fit", *common, "--out", "one"], cwd=root, check=True, capture_output=True, timeout=300)
    return {"root": root, "two": root / "two", "one": root / "one", "rank1": root / "ranks" / "rank1", "first": first, "budget": root / "budget", "budget1": root / "ranks_budget" / "rank1"}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_both_ranks_end_with_bit_identical_weights_and_momentum(runs):
    for rank0, rank1 in [(runs["first"]["rank0"], runs["first"]["rank1"]), (_tensors(runs["two"] / "checkpoint.safetensors"), _tensors(runs["rank1"] / "checkpoint.safetensors"))]:
        assert rank0.keys() == rank1.keys() and sum(k.endswith(".momentum_buffer") for k in rank0) > 10
        for k in rank0:
            assert torch.equal(rank0[k], rank1[k]), k
    best0, best1 = _tensors(runs["two"] / "model.safetensors"), _tensors(runs["rank1"] / "model.safetensors")
    assert all(torch.equal(best0[k], best1[k]) for k in best0)


def test_a_budget_run_stops_every_rank_at_the_same_step(runs):
    summary = json.loads((runs["budget"] / "summary.json").read_text())
    assert summary["stop_reason"] == "budget" and summary["world_size"] == 2 and summary["epochs"] >= 1
    m0, m1 = _lines(runs["budget"] / "metrics.jsonl"), _lines(runs["budget1"] / "metrics.jsonl")
    assert [m["epoch"] for m in m0] == [m["epoch"] for m in m1]
    assert [m["lr"] for m in m0] == [m["lr"] for m in m1]  # the LR of the budget schedule came from one clock
    c0, c1 = _tensors(runs["budget"] / "checkpoint.safetensors"), _tensors(runs["budget1"] / "checkpoint.safetensors")
    assert c0.keys() == c1.keys() and all(torch.equal(c0[k], c1[k]) for k in c0)
    whitened = [[e["filters"] for e in _lines(d / "events.jsonl") if e["event"] == "whiten_stem"] for d in (runs["budget"], runs["budget1"])]
    assert whitened[0] == whitened[1] and whitened[0][0] > 0


def test_the_planned_budget_run_grows_into_the_planners_pick_on_both_ranks(runs):
    """Rank 0 plans (the pick, the narrower start, the FLOP target) and rank 1 carries out the same plan: both
    start from the same multiplier and widen at the same epoch to the same widths, within 2% of the target."""
    events = [_lines(d / "events.jsonl") for d in (runs["budget"], runs["budget1"])]
    targets = [[e for e in ev if e["event"] == "adapt_target"] for ev in events]
    assert len(targets[0]) == 1 and targets[0] == targets[1] and targets[0][0]["source"] == "plan"
    t = targets[0][0]
    assert t["start_multiplier"] < t["plan_multiplier"] and t["start_flops"] < t["target_flops"]
    morphs = [[(e["epoch"], e["widths_after"], e["flops_after"]) for e in ev if e["event"] == "morph"] for ev in events]
    assert morphs[0] and morphs[0] == morphs[1] and morphs[0][0][0] == 1  # grown right after the first epoch
    assert t["start_flops"] < morphs[0][0][2] <= t["target_flops"] * 1.02


def test_the_two_process_run_prunes_and_grows_in_lockstep(runs):
    events = _lines(runs["two"] / "events.jsonl")
    prunes = [e for e in events if e["event"] == "prune"]
    assert prunes and sum(sum(e["removed"].values()) for e in prunes) > 0
    widen = [e for e in events if e["event"] == "adapt" and e["decision"] == "widen"]
    assert len(widen) == 1 and sum(widen[0]["widths_after"]) > sum(widen[0]["widths_before"])
    metrics = _lines(runs["two"] / "metrics.jsonl")
    assert [m["epoch"] for m in metrics] == [1, 2, 3, 4, 5]  # four, then one more after --resume
    assert all(m["world_size"] == 2 and m["batch_size"] == 16 for m in metrics)
    # DDP all-reduces every parameter's fp32 gradient once a step: the counted bytes follow the network's size
    assert all(m["comm_bytes_per_step"] == 4 * m["params"] for m in metrics)
    assert metrics[1]["comm_bytes_per_step"] < metrics[0]["comm_bytes_per_step"]  # after the first prune


def test_the_two_process_run_matches_one_process_with_the_same_global_batch(runs):
    """Same decisions and shapes; losses within 5%: the ranks' BatchNorm sees half batches and the augmentation
    draws differ, nothing else."""
    two = [e for e in _lines(runs["two"] / "events.jsonl") if e["epoch"] <= 4]
    one = _lines(runs["one"] / "events.jsonl")
    assert [(e["event"], e.get("decision"), e.get("widths_after")) for e in two] == [(e["event"], e.get("decision"), e.get("widths_after")) for e in one]
    m2, m1 = _lines(runs["two"] / "metrics.jsonl")[:4], _lines(runs["one"] / "metrics.jsonl")
    for a, b in zip(m2, m1):
        assert a["params"] == b["params"] and a["lr"] == pytest.approx(b["lr"], rel=1e-9)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=0.05)
        assert a["train_flops"] == pytest.approx(b["train_flops"], rel=1e-9)  # images counted globally


def test_only_rank_0_writes_the_run_directory(runs):
    two = runs["two"]
    assert {"arch.json", "model.safetensors", "checkpoint.safetensors", "predictions.csv", "summary.json", "report.html"} <= {p.name for p in two.iterdir()}
    assert not [p for run in (two, runs["budget"]) for p in run.rglob("*") if "rank" in p.name]
    assert not (runs["rank1"] / "summary.json").exists()  # rank 1 trains, rank 0 alone finishes
    # rank 1 wrote its own copy, and not into rank 0's files (whose metrics hold one line per epoch)
    assert len(_lines(runs["rank1"] / "metrics.jsonl")) == 1  # the resumed epoch (a resume starts its copy afresh)
    assert (runs["rank1"] / "checkpoint.safetensors").is_file() and (runs["rank1"] / "events.jsonl").is_file()
    summary = json.loads((two / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["epochs"] == 5
    assert len((two / "predictions.csv").read_text().splitlines()) == 1 + 12
