"""Weight sharing (Deep Compression's second stage): every conv/linear weight tensor is replaced by indices into
its own codebook of 2**bits values, found by k-means; the indices of all tensors are then Huffman-coded together.

k-means is one-dimensional (Lloyd's algorithm on the sorted values), initialised linearly between the tensor's
minimum and maximum, which Han et al. found best: it keeps centroids on the rare large weights that matter most.
The codebooks can then be fine-tuned (Deep Compression's trained quantization, :func:`share_` and
:func:`finetune_shared_`): each layer's weight becomes ``codebook[indices]`` with the indices fixed, and a shared
value moves with the mean gradient of the weights that use it. Before sharing, :func:`sparsify_` can zero the
smallest weights of each layer (Deep Compression's first stage): zeros keep an exact centroid of their own. Each
BatchNorm is stored as its eval-mode scale and shift, and those and the biases as float16 (a few thousand values);
the input normalization as float32. A file is::

    magic "BSW1" | header length (uint64) | header (zlib-compressed JSON) | codebooks (float32) | other tensors | indices

where the indices are one Huffman blob (:mod:`bonsai.compress.huffman`) over every shared tensor in header
order; at 4 bits or fewer two indices make one symbol, which brings the code closer to the indices' entropy (a
pair of zeros costs as little as one bit). Decoding gives a ResNet whose conv/linear weights take only codebook values.

>>> import numpy as np
>>> c, i = kmeans_1d(np.array([0.0, 0.1, 0.9, 1.0], dtype=np.float32), 2)
>>> [round(float(x), 2) for x in c], i.tolist()
([0.05, 0.95], [0, 0, 1, 1])
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bonsai.compress.container import frame, unframe
from bonsai.compress.huffman import bits_per_value, decode, encode
from bonsai.errors import BonsaiError
from bonsai.models.arch import ArchSpec
from bonsai.models.resnet import ResNet, load_state

_MAGIC = b"BSW1"


def kmeans_1d(values: np.ndarray, k: int, iters: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Centroids (float32, ascending, at most ``k``) and each value's centroid index (uint8).

    Lloyd's algorithm from a linear initialisation over [min, max]. A cluster left empty is dropped, and a new
    centroid is seeded at the value farthest from its own centroid, then Lloyd runs again, until there are ``k``
    centroids or as many as distinct values. Every step lowers the squared error, so it never exceeds that of
    rounding to the linear grid (at most half a grid step per value)."""
    v = np.asarray(values, dtype=np.float64).reshape(-1)
    if not 1 <= k <= 256:
        raise ValueError("k must be in [1, 256]")
    if v.size == 0:
        return np.zeros(0, dtype=np.float32), np.zeros(0, dtype=np.uint8)
    order = np.argsort(v, kind="stable")
    s = v[order]
    csum = np.concatenate([[0.0], np.cumsum(s)])
    distinct = int(np.count_nonzero(np.diff(s))) + 1

    def assign(c: np.ndarray) -> np.ndarray:  # cluster boundaries in s: values up to each midpoint go below it
        return np.concatenate([[0], np.searchsorted(s, (c[:-1] + c[1:]) / 2), [len(s)]])

    def lloyd(c: np.ndarray) -> np.ndarray:
        for _ in range(iters):
            bounds = assign(c)
            counts = np.diff(bounds)
            keep = counts > 0
            new = (csum[bounds[1:]] - csum[bounds[:-1]])[keep] / counts[keep]
            if len(new) == len(c) and np.allclose(new, c, rtol=0, atol=1e-12):
                break
            c = new
        bounds = assign(c)
        return c[np.diff(bounds) > 0]

    c = lloyd(np.linspace(s[0], s[-1], k))
    while len(c) < min(k, distinct):
        bounds = assign(c)
        err = np.abs(s - np.repeat(c, np.diff(bounds)))
        c = lloyd(np.sort(np.append(c, s[int(np.argmax(err))])))
    bounds = assign(c)
    idx = np.empty(len(s), dtype=np.uint8)
    idx[order] = np.repeat(np.arange(len(c), dtype=np.uint8), np.diff(bounds))
    return c.astype(np.float32), idx


class Codebook(torch.nn.Module):
    """A weight as ``centroids[indices]``: a parametrization whose only trainable part is the codebook.

    A shared value's gradient is the mean of the gradients of the weights that use it (Deep Compression's sum,
    divided by the cluster's size), so the LR that suits the weights suits the codebook: the sum over thousands of
    weights would take steps thousands of times too large. A centroid that is exactly zero (the pruned weights of
    :func:`sparsify_`) stays zero."""

    def __init__(self, centroids: np.ndarray, indices: np.ndarray, shape: tuple[int, ...]):
        super().__init__()
        c = torch.from_numpy(np.asarray(centroids, dtype=np.float32).copy())
        self.centroids = torch.nn.Parameter(c)
        self.register_buffer("free", (c != 0).float())
        idx = torch.from_numpy(indices.astype(np.int64))
        self.register_buffer("indices", idx.reshape(shape))
        self.register_buffer("counts", torch.bincount(idx, minlength=len(centroids)).clamp(min=1).float())

    def forward(self, original: torch.Tensor) -> torch.Tensor:  # the original weight is ignored, and gets no gradient
        c = self.centroids * self.free
        # the value is c[indices]; the gradient reaching c is the per-cluster mean
        return c.detach()[self.indices] + ((c - c.detach()) / self.counts)[self.indices]


def codebook(values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`kmeans_1d` of a weight tensor, except that exact zeros (weights :func:`sparsify_` removed) get a
    centroid of exactly zero, always index 0 (so the one Huffman code over all layers sees them as one symbol), and
    the other ``k - 1`` centroids cluster the remaining values.

    >>> c, i = codebook(np.array([0.0, 0.0, -1.0, 2.0], dtype=np.float32), 4)
    >>> c.tolist(), i.tolist()
    ([0.0, -1.0, 2.0], [0, 0, 1, 2])
    """
    v = np.asarray(values, dtype=np.float32).reshape(-1)
    zero = v == 0
    if k < 2 or not zero.any() or zero.all():
        return kmeans_1d(v, k)
    c, i = kmeans_1d(v[~zero], k - 1)
    idx = np.zeros(v.shape, dtype=np.uint8)
    idx[~zero] = i + 1
    return np.concatenate([np.zeros(1, dtype=np.float32), c]), idx


class Mask(torch.nn.Module):
    """A weight with a fixed set of entries held at zero: ``original * mask``."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original * self.mask


def _prunable(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The conv and linear layers weight sharing stores, the first conv (the stem, on the image) excepted."""
    layers = [m for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    return layers[1:]


def sparsify_(model: torch.nn.Module, sparsity: float) -> torch.nn.Module:
    """Deep Compression's first stage, in place: in every conv/linear weight but the stem conv's, the ``sparsity``
    share of entries with the smallest magnitude become exactly zero, and stay zero while the model trains (a
    parametrization multiplying by the fixed mask; :func:`unshare_` makes the weights plain again). The same share
    in every layer: BatchNorm after each conv makes weight scales incomparable across layers, so one global
    magnitude threshold would mean nothing."""
    from torch.nn.utils import parametrize

    if not 0 <= sparsity < 1:
        raise BonsaiError(f"sparsity must be in [0, 1), got {sparsity}")
    for module in _prunable(model):
        w = module.weight.detach()
        if int(sparsity * w.numel()) == 0:
            continue
        parametrize.register_parametrization(module, "weight", Mask(_keep(w, sparsity)), unsafe=True)
    return model


def _keep(w: torch.Tensor, sparsity: float) -> torch.Tensor:
    """1 for the entries of ``w`` a ``sparsity`` share of zeros keeps (the largest magnitudes), 0 elsewhere."""
    keep = torch.ones(w.numel(), dtype=w.dtype, device=w.device)
    keep[w.abs().reshape(-1).argsort(stable=True)[: int(sparsity * w.numel())]] = 0
    return keep.reshape(w.shape)


def sparsity_levels(sparsity: float, updates: int) -> list[float]:
    """Zhu & Gupta's gradual pruning schedule: ``updates`` sparsity levels rising on a cubic from a third of the
    way (at ``updates`` = 8) to ``sparsity``, steep first, while the network has the most redundancy."""
    return [sparsity * (1 - (1 - k / updates) ** 3) for k in range(1, updates + 1)]


def sparsify_gradually_(
    model: torch.nn.Module, sparsity: float, x: torch.Tensor, y: torch.Tensor, epochs: float, ramp: float = 0.5, updates: int = 8, **kw
) -> torch.nn.Module:
    """Deep Compression's pruning done gradually while fine-tuning, in place: the masks of :func:`sparsify_` are
    recomputed ``updates`` times within the first ``ramp`` share of ``epochs`` of fine-tuning
    (:func:`bonsai.compress.lowrank.finetune_`, ``kw`` goes to it), to the levels of :func:`sparsity_levels`; the
    rest of the fine-tune trains at the final sparsity. Zeros are the smallest magnitudes, so each mask holds the
    last one's zeros. One cut to a high sparsity removes weights the network still uses all at once; here the
    remaining weights take over step by step. Undo the masks with :func:`unshare_`."""
    from bonsai.compress.lowrank import finetune_

    if not 0 <= sparsity < 1:
        raise BonsaiError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0 < ramp <= 1 or updates < 1:
        raise BonsaiError(f"gradual pruning: ramp must be in (0, 1] and updates >= 1, got {ramp} and {updates}")
    levels = sparsity_levels(sparsity, updates)
    sparsify_(model, levels[0])
    masked = [m for m in _prunable(model) if _mask(m) is not None]

    def hook(step: int, steps: int) -> None:
        for k in range(1, updates):  # update k at its share of the ramp; on a short fine-tune several share a step
            if step == math.ceil(k * ramp * steps / updates):
                with torch.no_grad():
                    for module in masked:
                        _mask(module).copy_(_keep(module.weight, levels[k]))

    finetune_(model, x, y, epochs, hook=hook, **kw)
    return model


def _mask(module: torch.nn.Module) -> torch.Tensor | None:
    """The mask buffer :func:`sparsify_` put on ``module``'s weight, if any."""
    for p in getattr(getattr(module, "parametrizations", None), "weight", []):
        if isinstance(p, Mask):
            return p.mask
    return None


def share_(model: torch.nn.Module, bits: int) -> torch.nn.Module:
    """In place: every conv/linear weight becomes ``codebook[indices]`` with a 2**bits-value k-means codebook of its
    own (:func:`kmeans_1d`); training then moves the shared values only. Undo with :func:`unshare_`."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        w = getattr(module, "weight", None)
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)) and not parametrize.is_parametrized(module, "weight"):
            c, idx = codebook(w.detach().float().cpu().numpy(), 2**bits)
            parametrize.register_parametrization(module, "weight", Codebook(c, idx, tuple(w.shape)), unsafe=True)
    return model


def unshare_(model: torch.nn.Module) -> torch.nn.Module:
    """In place: the weights :func:`share_` or :func:`sparsify_` parametrized become plain tensors again, holding
    their codebook values (or their zeros)."""
    from torch.nn.utils import parametrize

    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    return model


def finetune_shared_(
    model: ResNet, bits: int, x: torch.Tensor, y: torch.Tensor, epochs: float = 1.0, lr: float = 0.005, batch: int = 256, seed: int = 0, **kw
) -> ResNet:
    """Deep Compression's trained quantization, in place: k-means codebooks of 2**bits values per layer
    (:func:`share_`), then ``epochs`` of fine-tuning on ``x``/``y`` (uint8 NCHW training images) that moves the
    shared values, BN and biases, the indices fixed (:func:`bonsai.compress.lowrank.finetune_`'s loop, at a lower
    LR; ``kw`` goes to it too: the augmentation's shift, a distillation teacher). Afterwards every conv/linear
    weight holds at most 2**bits distinct values (a zero among them where :func:`sparsify_` ran first), so
    :func:`pack_shared` at the same ``bits`` stores it exactly."""
    from bonsai.compress.lowrank import finetune_

    share_(model, bits)
    finetune_(model, x, y, epochs, lr=lr, batch=batch, seed=seed, **kw)
    return unshare_(model).eval()


def _shared(name: str, t: torch.Tensor) -> bool:
    """Conv and linear weights are shared; everything else (BN, biases, normalization buffers) is kept."""
    return name.endswith("weight") and t.ndim >= 2


def _pair(idx: np.ndarray) -> np.ndarray:
    """Indices below 16, two to a byte (the first in the high half); an odd count is padded with a 0."""
    if len(idx) % 2:
        idx = np.append(idx, np.uint8(0))
    return (idx[0::2] << 4) | idx[1::2]


def _unpair(sym: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` indices :func:`_pair` packed."""
    if count > 2 * len(sym) or count < 2 * len(sym) - 1:
        raise BonsaiError(f"{count} indices cannot come from {len(sym)} pairs")
    idx = np.empty(2 * len(sym), dtype=np.uint8)
    idx[0::2], idx[1::2] = sym >> 4, sym & 15
    return idx[:count]


def _folded_bn(model: torch.nn.Module, state: dict) -> dict:
    """``state`` (the model's state dict) with each BatchNorm's four vectors as two: eval-mode BN is ``x * a + b``
    with ``a = weight / sqrt(running_var + eps)`` and ``b = bias - running_mean * a``, so the weight becomes ``a``,
    the bias ``b``, the running mean 0 and the running variance ``1 - eps`` (given as floats: stored as a constant)."""
    state = dict(state)
    for prefix, m in model.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats and m.affine:
            p = f"{prefix}." if prefix else ""
            a = m.weight.detach() / torch.sqrt(m.running_var + m.eps)
            state[p + "weight"], state[p + "bias"] = a, m.bias.detach() - m.running_mean * a
            state[p + "running_mean"], state[p + "running_var"] = 0.0, 1.0 - m.eps
    return state


def pack_shared(model: ResNet, bits: int = 4) -> tuple[bytes, dict]:
    """The model as a weight-shared, Huffman-coded file; returns (bytes, statistics)."""
    if not 1 <= bits <= 8:
        raise BonsaiError(f"weight sharing: bits must be in [1, 8], got {bits}")
    entries, codebooks, raws, indices = [], [], [], []
    n_shared = 0
    plain = model.state_dict()
    for name, t in _folded_bn(model, plain).items():
        if isinstance(t, float):
            entries.append({"name": name, "shape": list(plain[name].shape), "kind": "fill", "value": t})
            continue
        a = t.detach().cpu()
        if _shared(name, a):
            c, idx = codebook(a.float().numpy(), 2**bits)
            entries.append({"name": name, "shape": list(a.shape), "kind": "shared", "centroids": len(c)})
            codebooks.append(c)
            indices.append(idx)
            n_shared += idx.size
        elif a.is_floating_point():
            kind = "float32" if name in ("mean", "std") else "float16"  # the input normalization stays exact
            entries.append({"name": name, "shape": list(a.shape), "kind": kind})
            raws.append(a.to(getattr(torch, kind)).numpy().astype("<" + ("f4" if kind == "float32" else "f2")).tobytes())
        else:  # BN's num_batches_tracked: not needed to predict
            entries.append({"name": name, "shape": list(a.shape), "kind": "zero", "dtype": str(a.dtype).replace("torch.", "")})
    flat = np.concatenate(indices) if indices else np.zeros(0, dtype=np.uint8)
    pairs = bits <= 4  # two indices per Huffman symbol: codes closer to the entropy, under 1 bit for a common pair
    blob = encode(_pair(flat) if pairs else flat)
    books = np.concatenate(codebooks).astype("<f4").tobytes() if codebooks else b""
    raw = b"".join(raws)
    header = {
        "arch": model.spec.to_dict(), "bits": bits, "tensors": entries, "codebook_bytes": len(books), "raw_bytes": len(raw),
        "pairs": pairs, "indices": len(flat),
    }
    packed = frame(_MAGIC, header, books, raw, blob)
    stats = {
        "bits": bits,
        "shared_weights": n_shared,
        "index_bits_per_weight": bits_per_value(blob) / (2 if pairs else 1),
        "codebook_bytes": len(books),
        "other_bytes": len(raw),
        "header_bytes": len(packed) - len(books) - len(raw) - len(blob),
        "total_bytes": len(packed),
    }
    return packed, stats


def unpack_shared(packed: bytes, source: str = "weight-shared model") -> ResNet:
    """The network :func:`pack_shared` stored (conv/linear weights as codebook values, the rest from float16)."""
    header, pos = unframe(packed, _MAGIC, "weight-shared bonsai model", source)
    try:
        books = np.frombuffer(packed, dtype="<f4", count=header["codebook_bytes"] // 4, offset=pos)
        pos += header["codebook_bytes"]
        raw = packed[pos : pos + header["raw_bytes"]]
        pos += header["raw_bytes"]
        idx = decode(packed[pos:])
        if header.get("pairs"):
            idx = _unpair(idx, int(header["indices"]))
        spec = ArchSpec.from_dict(header["arch"], source)
        tensors, b, r, i = {}, 0, 0, 0
        for e in header["tensors"]:
            shape, count = tuple(e["shape"]), int(np.prod(e["shape"], dtype=np.int64))
            if e["kind"] == "shared":
                k = int(e["centroids"])
                part = idx[i : i + count]
                if len(part) != count or (count and int(part.max()) >= k):
                    raise BonsaiError(f"indices of {e['name']} do not match its codebook")
                tensors[e["name"]] = torch.from_numpy(books[b : b + k][part].reshape(shape).copy())
                b, i = b + k, i + count
            elif e["kind"] == "fill":
                tensors[e["name"]] = torch.full(shape, float(e["value"]))
            elif e["kind"] in ("float16", "float32"):
                dt = np.dtype("<f2" if e["kind"] == "float16" else "<f4")
                data = np.frombuffer(raw, dtype=dt, count=count, offset=r)
                tensors[e["name"]] = torch.from_numpy(data.astype(np.float32).reshape(shape))
                r += dt.itemsize * count
            else:
                tensors[e["name"]] = torch.zeros(shape, dtype=getattr(torch, e["dtype"]))
    except BonsaiError as e:
        raise BonsaiError(f"{source}: damaged ({e})") from None
    except Exception as e:  # noqa: BLE001 - a missing key, numpy, a bad dtype name: any means a damaged file
        raise BonsaiError(f"{source}: damaged ({type(e).__name__}: {e})") from None
    model = ResNet(spec)
    load_state(model, tensors, source)
    return model.eval()
