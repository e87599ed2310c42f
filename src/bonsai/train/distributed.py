"""Data-parallel training under ``torchrun`` with PyTorch's DistributedDataParallel, surgery in lockstep.

How a distributed fit works (``torchrun --nproc-per-node N -m bonsai fit DATA ...``):

* **Every rank runs the same engine** on the same network, and every decision the engine takes (the LR and image
  size of a step, stopping on the budget or a signal, which channels to prune, what the controller does) is
  taken from values that are the same on every rank: the budget clock is the ranks' maximum, the validation
  accuracy comes from predictions gathered from all ranks, a stop signal on any rank stops all of them at the same
  step, and the pruning plan and the controller's decision are rank 0's, broadcast to the others. So every rank
  carries out the same surgery on the same weights and momentum; after each surgery (and each epoch) a SHA-256 of
  every rank's parameters, buffers and momentum is compared, and a difference stops the run with an error.
* **Gradients** are averaged by DDP (gloo on the CPU, NCCL on CUDA, one device per rank). After a surgery the
  network has new parameters, so the DDP wrapper is built again; the optimizer's state was remapped by the surgery
  itself, as in a single process.
* **Data**: ``train.batch_size`` is the global batch. Every rank draws the same shuffled order and takes every
  N-th image of each global batch (DistributedSampler's semantics, on the in-memory and the streaming path alike:
  while training, a streaming rank decodes only its own images); its augmentation draws from its own generator.
  Each rank's loss is weighted by its share of the batch, so that DDP's average over ranks is the batch mean even
  when the batch does not divide evenly; the LR follows the global batch, so N processes train like one process
  with the same batch. Validation and test images are split into N contiguous chunks and the class
  probabilities gathered. Rank 0's dataset (its fingerprint and sizes) and resolved precision hold for all; a
  rank that reads a different dataset stops the run.
* **BatchNorm** normalizes with each rank's own share of the batch (as DDP does); the running statistics are
  averaged over the ranks at the end of every epoch, before validation.
* **Only rank 0 writes the run directory.** The other ranks write their copy (checkpoints, events) to a private
  folder, a temporary one unless ``train.rank_dir`` names one, so that a rollback restores the same state on every
  rank; ``--resume`` reads rank 0's run directory on every rank.
* An error on one rank (an out-of-memory error included: it cannot be recovered in lockstep) ends that process;
  torchrun then stops the others. The checkpoint of the last epoch stays for ``--resume`` (with a smaller
  ``batch_size``, which a resume then takes over the one the run had reached). In a process group started by other
  means, the other ranks wait for the group's timeout instead.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import warnings
from collections.abc import Iterable

import torch
import torch.distributed as tdist
from torch import nn

from bonsai.errors import BonsaiError

_SIGNALS = (None, "sigint", "sigterm")


def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of rank's contiguous chunk of n items; chunks differ in length by at most one."""
    per, extra = divmod(n, world)
    start = rank * per + min(rank, extra)
    return start, start + per + (1 if rank < extra else 0)


class Dist:
    """The process group as the engine uses it. With one process every method is the identity (no communication),
    so single-process training is unchanged."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0, backend: str = "gloo"):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        # NCCL moves only GPU tensors: the small agreement messages travel on this rank's GPU then
        self._dev = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
        self.comm_bytes = 0  # gradient bytes this rank handed to all-reduce (counted by the DDP communication hook)

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def on(self) -> bool:
        return self.world > 1

    def __repr__(self) -> str:
        return f"Dist(rank={self.rank}, world={self.world})"

    # -- the device and the model

    def device(self, device: torch.device) -> torch.device:
        """One GPU per rank (by local rank); the CPU is shared."""
        if self.on and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` in DistributedDataParallel (``model`` itself with one process). Called again after every
        surgery: DDP fixes its parameter list and gradient buckets when it is built, copying rank 0's weights and
        buffers. Buffers are not synchronized at each step; :meth:`average_buffers` averages them once an epoch."""
        if not self.on:
            return model
        from torch.nn.parallel import DistributedDataParallel as DDP

        # 1x1 kernels in channels_last differ from their bucket only in the strides of size-1 dimensions: same
        # memory order, nothing to fix, but the reducer warns about it once per wrapper
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
        p = next(model.parameters())
        ids = [p.device.index] if p.device.type == "cuda" else None
        # gradients as views into the all-reduce buckets (DDP's memory saving); building the wrapper copies rank 0's
        # weights and buffers to the others, so agreement is checked before it (Engine._after_surgery)
        ddp = DDP(model, device_ids=ids, forward_sync_buffers=False, gradient_as_bucket_view=True)
        ddp.register_comm_hook(self, _counting_allreduce)
        return ddp

    # -- agreement

    def _reduce(self, values: list[float], op) -> list[float]:
        if not self.on:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=self._dev)
        tdist.all_reduce(t, op=op)
        return t.tolist()

    def max(self, *values: float) -> list[float]:
        return self._reduce(list(values), tdist.ReduceOp.MAX)

    def sum(self, *values: float) -> list[float]:
        return self._reduce(list(values), tdist.ReduceOp.SUM)

    def any(self, flag: bool) -> bool:
        return bool(self.max(float(flag))[0]) if self.on else flag

    def mean(self, value: float) -> float:
        return self.sum(value)[0] / self.world if self.on else value

    def min_int(self, value: int) -> int:
        return int(-self.max(-float(value))[0]) if self.on else value

    def signal(self, mine: str | None) -> str | None:
        """The stop signal that any rank received ("sigterm" over "sigint"), or None: the same on every rank."""
        if not self.on:
            return mine
        return _SIGNALS[int(self.max(float(_SIGNALS.index(mine)))[0])]

    def broadcast_json(self, obj):
        """Rank 0's ``obj`` (anything JSON can carry) on every rank; plain JSON, no pickle."""
        if not self.on:
            return obj
        data = json.dumps(obj).encode() if self.main else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self._dev)
        tdist.broadcast(n, 0)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self._dev) if self.main else torch.empty(int(n), dtype=torch.uint8, device=self._dev)
        tdist.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().tolist()).decode())

    def gather_rows(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """The full (n, ...) tensor from each rank's contiguous chunk (see :func:`shard_range`), on every rank."""
        if not self.on:
            return t
        size = -(-n // self.world)
        pad = torch.zeros((size, *t.shape[1:]), dtype=t.dtype, device=self._dev)
        pad[: len(t)] = t
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        tdist.all_gather(parts, pad)
        return torch.cat([p[: e - s].to(t.device) for p, (s, e) in zip(parts, (shard_range(n, r, self.world) for r in range(self.world)))])

    @torch.no_grad()
    def average_buffers(self, model: nn.Module) -> None:
        """BatchNorm running statistics averaged over the ranks (each saw its own images this epoch)."""
        if not self.on:
            return
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for b in (m.running_mean, m.running_var):
                    tdist.all_reduce(b, op=tdist.ReduceOp.SUM)
                    b.div_(self.world)

    def check_same(self, model: nn.Module, opt: torch.optim.Optimizer, what: str) -> str:
        """SHA-256 of the parameters, buffers and optimizer state; raises BonsaiError on every rank when the ranks
        disagree. Returns the digest (empty with one process: nothing to compare)."""
        if not self.on:
            return ""
        digest = state_digest(model, opt)
        mine = torch.tensor(list(bytes.fromhex(digest)), dtype=torch.uint8, device=self._dev)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        tdist.all_gather(parts, mine)
        differ = [r for r, p in enumerate(parts) if not torch.equal(p, parts[0])]
        if differ:
            raise BonsaiError(f"ranks {differ} hold different weights from rank 0 after {what}: the ranks diverged; the run stops")
        return digest

    def barrier(self) -> None:
        if self.on:
            tdist.barrier()


def state_digest(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> str:
    """SHA-256 over every parameter, buffer and optimizer-state tensor, in a fixed order, bit for bit."""
    h = hashlib.sha256()

    def add(tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        for name, t in tensors:
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())

    add(model.state_dict().items())
    if opt is not None:
        for name, p in model.named_parameters():  # by name: the optimizer's own order depends on its history
            state = opt.state.get(p, {})
            add((f"{name}.{k}", v) for k, v in sorted(state.items()) if torch.is_tensor(v))
    return h.hexdigest()


def _counting_allreduce(state, bucket):  # no annotations: DDP checks them against live types
    """DDP's own all-reduce (average), counting the bytes of each gradient bucket."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buf = bucket.buffer()
    state.comm_bytes += buf.numel() * buf.element_size()
    return allreduce_hook(None, bucket)


_CURRENT: Dist | None = None


def current(device: str = "auto", timeout_s: float = 1800.0) -> Dist:
    """This process's place in the job: from the process group when one is up, else from torchrun's variables
    (WORLD_SIZE, RANK, LOCAL_RANK), starting the group the first time (NCCL when ``device`` resolves to CUDA,
    else gloo); a plain process is rank 0 of 1."""
    global _CURRENT
    if tdist.is_available() and tdist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", tdist.get_rank()))
        if _CURRENT is None or (_CURRENT.rank, _CURRENT.world) != (tdist.get_rank(), tdist.get_world_size()):
            _CURRENT = Dist(tdist.get_rank(), tdist.get_world_size(), local, str(tdist.get_backend()))
        return _CURRENT
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist()
    if not tdist.is_available():
        raise BonsaiError("WORLD_SIZE is set but this PyTorch build has no torch.distributed")
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    from bonsai.train.engine import resolve_device

    backend = "nccl" if resolve_device(device).type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local)
    try:
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, ValueError) as e:
        raise BonsaiError(f"cannot join the torchrun job as rank {rank} of {world}: {e}") from None
    _CURRENT = Dist(rank, world, local, backend)
    return _CURRENT
