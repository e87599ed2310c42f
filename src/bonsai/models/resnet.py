"""A ResNet built from an ArchSpec, with its FLOP and parameter counts and safe (pickle-free) serialization."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn
from torch.nn import functional as F

from bonsai.errors import BonsaiError
from bonsai.models.arch import ArchSpec
from bonsai.utils import atomic_write_bytes

log = logging.getLogger("bonsai")


def _conv_bn(cin: int, cout: int, k: int, stride: int) -> tuple[nn.Conv2d, nn.BatchNorm2d]:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=False), nn.BatchNorm2d(cout)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual connection; a 1x1 projection shortcut where stride or width change (a transition
    block). With ``pool`` (stride 2 only) the block halves the resolution by a 2x2 max-pool (ceil mode: the same sizes
    as the strided conv) after its first conv, which runs at full resolution, and before the shortcut's projection;
    the pooling is functional, so the modules (and every surgery on them) are those of the strided block."""

    def __init__(self, cin: int, inner: int, cout: int, stride: int, pool: bool = False):
        super().__init__()
        self.pool = pool and stride == 2
        conv_stride = 1 if self.pool else stride
        self.conv1, self.bn1 = _conv_bn(cin, inner, 3, conv_stride)
        self.conv2, self.bn2 = _conv_bn(inner, cout, 3, 1)
        self.shortcut = None
        if stride != 1 or cin != cout:
            conv, bn = _conv_bn(cin, cout, 1, conv_stride)
            self.shortcut = nn.Sequential(conv, bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        if self.pool:
            out, x = F.max_pool2d(out, 2, ceil_mode=True), F.max_pool2d(x, 2, ceil_mode=True)
        out = self.bn2(self.conv2(F.relu(self.bn1(out))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class ResNet(nn.Module):
    """Stem conv, residual stages, global average pooling, linear head.

    The input is raw pixel values (0..255, uint8 or float, NCHW); per-channel normalization is part of the network
    (buffers ``mean``/``std``), so a saved model needs nothing else to predict.
    """

    def __init__(self, spec: ArchSpec, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None):
        super().__init__()
        spec.validate()
        self.spec = spec
        c = spec.in_channels
        self.register_buffer("mean", torch.tensor(mean or [127.5] * c, dtype=torch.float32).view(1, c, 1, 1))
        self.register_buffer("std", torch.tensor(std or [64.0] * c, dtype=torch.float32).view(1, c, 1, 1))
        conv, bn = _conv_bn(c, spec.stem, 3, 1)
        self.stem = nn.Sequential(conv, bn, nn.ReLU(inplace=True))
        stages, cin = [], spec.stem
        for s in spec.stages:
            blocks = []
            for i, inner in enumerate(s.inner):
                blocks.append(BasicBlock(cin, inner, s.width, s.stride if i == 0 else 1, s.pool and i == 0))
                cin = s.width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Linear(cin, spec.num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() - self.mean) / self.std
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def build(spec: ArchSpec, zero_init_residual: bool = True, **norm) -> ResNet:
    """A freshly initialised network for ``spec`` (He init; optionally each block's last BN scale zeroed, so every
    block starts as the identity and deep nets train from the first step).

    >>> model = build(ArchSpec.resnet((16, 32), 1, num_classes=3))
    >>> model(torch.zeros(2, 3, 16, 16)).shape
    torch.Size([2, 3])
    """
    model = ResNet(spec, **norm)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
    return model


def whiten_stem_(model: ResNet, images: torch.Tensor, max_images: int = 2000, seed: int = 0, chunk_values: int = 2_000_000) -> int:
    """Point the stem conv's filters along the principal axes of the data's k x k patches, in +/- pairs (a data-
    derived whitening first layer, as airbench initialises its first conv). Returns how many filters were set.

    The patches of up to ``max_images`` images (uint8 NCHW, a random sample drawn from ``seed``), normalized as the
    network normalizes its input (so close to zero mean), give the second-moment matrix E[p p^T]; its
    eigenvectors, largest eigenvalue first, become the filters ``v_1 .. v_n, -v_1 .. -v_n`` (``n`` = half the stem
    width, rounded down, at most C*k*k). The stem's BatchNorm then divides each projection by its standard
    deviation, so conv + BN compute the whitening transform ``v_i^T x / sqrt(lambda_i)``; the pairs keep both
    signs of every component through the ReLU. The filters get the mean length of the random init's, so the step
    sizes stay those of the usual init. Filters beyond ``2n`` (an odd width's last, or those beyond
    ``2 * C*k*k``) keep their random init. The patches are summed in chunks of about ``chunk_values`` values (at
    least one image), so memory stays flat whatever the image size.
    """
    conv = model.stem[0]
    c, k = conv.in_channels, conv.kernel_size[0]
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(images.shape[0], generator=gen)[:max_images].to(images.device)
    per_image = c * k * k * max(images.shape[-2] - k + 1, 1) * max(images.shape[-1] - k + 1, 1)
    chunk = max(1, chunk_values // per_image)
    moment, count = torch.zeros(c * k * k, c * k * k, dtype=torch.float64), 0
    for i in range(0, len(pick), chunk):
        x = (images[pick[i : i + chunk]].float().cpu() - model.mean.cpu()) / model.std.cpu()
        patches = F.unfold(x, k).transpose(1, 2).reshape(-1, c * k * k).double()  # (patches, C*k*k)
        moment += patches.T @ patches
        count += patches.shape[0]
    _, vecs = torch.linalg.eigh(moment / max(count, 1))  # ascending eigenvalues
    n = min(conv.out_channels // 2, c * k * k)
    dirs = vecs.flip(1)[:, :n].T.float()  # (n, C*k*k), unit length, largest variance first
    w = conv.weight.data
    length = w.flatten(1).norm(dim=1).mean().item()
    w[: 2 * n] = (torch.cat([dirs, -dirs]) * length).view(2 * n, c, k, k).to(w)
    return 2 * n


def count_flops(spec: ArchSpec, image_size: int | None = None) -> int:
    """FLOPs of one forward pass for one image, counted by ``torch.utils.flop_counter`` (a multiply-add is 2 FLOPs;
    convs and the linear head; BN, ReLU, pooling and additions are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    size = image_size or spec.image_size
    with torch.device("meta"):
        model = ResNet(spec).eval()  # eval: BN accepts a 1x1 map of one image (small inputs, deep nets)
        x = torch.zeros(1, spec.in_channels, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return int(counter.get_total_flops())


def activation_elements(spec: ArchSpec, image_size: int | None = None) -> int:
    """Elements of every module's output (convs, BNs, the stem's ReLU, the head) in one forward pass for one image,
    plus a pooled block's two max-pool outputs (its first conv's and its shortcut input's); the blocks' functional
    ReLUs and residual adds are not seen, and the bytes-per-element factor calibrated in ``bonsai.train.resources``
    absorbs them (calibrated on strided networks; the max-pools' indices are not counted). What autograd keeps for
    the backward pass scales with it. Counted on the meta device: nothing is allocated."""
    size = image_size or spec.image_size
    total = 0

    def hook(_m, _inp, out) -> None:
        nonlocal total
        total += out.numel()

    def pool_hook(m: BasicBlock, _inp, out) -> None:  # the pooled maps have the block's output resolution
        nonlocal total
        total += (m.conv1.out_channels + m.conv1.in_channels) * out.shape[0] * out.shape[-2] * out.shape[-1]

    with torch.device("meta"):
        model = ResNet(spec).eval()
        x = torch.zeros(1, spec.in_channels, size, size)
    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    handles += [m.register_forward_hook(pool_hook) for m in model.modules() if isinstance(m, BasicBlock) and m.pool]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def state_bytes(model: nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    return save(tensors, metadata=metadata)


def save_model(model: ResNet, directory: str | Path) -> None:
    """Write ``arch.json`` and ``model.safetensors`` atomically."""
    directory = Path(directory)
    try:
        # the weights carry their arch as metadata and go first: a kill between the two writes leaves an arch.json
        # that load_model recognises as stale
        atomic_write_bytes(directory / "model.safetensors", state_bytes(model, {"arch": json.dumps(model.spec.to_dict())}))
        model.spec.to_json(directory / "arch.json")
    except OSError as e:
        raise BonsaiError(f"{directory}: cannot write the model ({e.strerror or e})") from None


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``tensors`` into ``model``; a missing key or a shape that disagrees with the spec is a clear error."""
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    unexpected = sorted(set(tensors) - set(own))
    if missing or unexpected:
        raise BonsaiError(f"{source}: weights do not match arch.json (missing {missing[:3]}, unexpected {unexpected[:3]})")
    for k, v in own.items():
        if tensors[k].shape != v.shape:
            raise BonsaiError(f"{source}: {k} has shape {tuple(tensors[k].shape)}, arch.json implies {tuple(v.shape)}")
    model.load_state_dict(tensors)


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise BonsaiError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise BonsaiError(f"{path}: not a readable safetensors file ({e})") from None


def load_model(directory: str | Path) -> ResNet:
    """Rebuild the exact network saved by :func:`save_model` (no pickle involved)."""
    directory = Path(directory)
    spec = ArchSpec.from_json(directory / "arch.json")
    weights = directory / "model.safetensors"
    tensors = read_safetensors(weights)
    model = ResNet(spec)
    try:
        load_state(model, tensors, str(weights))
    except BonsaiError:
        # an arch.json written before the weights is a save cut short between the two files (see save_model); one
        # written after them was edited, and stays an error
        stored = _stored_arch(weights, spec)
        if stored is None or (directory / "arch.json").stat().st_mtime_ns > weights.stat().st_mtime_ns:
            raise
        log.warning("%s: arch.json is older than model.safetensors (a save was cut short); using the arch stored with the weights", directory)
        model = ResNet(stored)
        load_state(model, tensors, str(weights))
    return model.eval()


def _stored_arch(weights: Path, spec: ArchSpec) -> ArchSpec | None:
    """The arch saved inside ``weights``' metadata when it differs from ``spec`` (validated), else None."""
    try:
        with safe_open(str(weights), framework="pt") as f:
            meta = (f.metadata() or {}).get("arch")
        stored = ArchSpec.from_dict(json.loads(meta), str(weights)) if meta else None
    except (SafetensorError, OSError, ValueError, BonsaiError):
        return None
    return stored if stored is not None and stored != spec else None
