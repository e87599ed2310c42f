"""Read and validate an image-classification dataset: an image folder, a labels CSV, or ``.npz`` arrays.

Layouts (``DATA`` is the path given to ``bonsai fit``/``bonsai info``):

* **ImageFolder**: ``DATA/train/<class>/**/*.{png,jpg,jpeg,bmp,gif,webp,tif,tiff}``; optional ``DATA/test/``
  holding either images directly (unlabeled) or ``<class>/`` folders (labeled: test accuracy is reported).
* **CSV**: ``DATA/train.csv`` or ``DATA/labels.csv`` (or ``DATA`` is the CSV itself) with a header naming a file
  column (filename/file/image/path) and a label column (label/class); paths are relative to the CSV's folder and
  must stay inside it. Test images: ``DATA/test.csv`` (filename[,label]) or a ``DATA/test/`` folder as above.
* **npz**: ``DATA`` is a ``.npz`` file or a folder of them, holding uint8 ``x_train`` (N,H,W,C or N,H,W),
  integer ``y_train``, and optionally ``x_test``, ``y_test``, ``classes``. A folder of ``*_partKofN.npz`` files is
  the concatenation of every key over the parts in file-name order. Loaded without pickle.

Working image size: if ``data.image_size`` is set, that; otherwise the median shorter side of the training
images, capped at ``data.max_image_size`` (64 by default: training cost grows with its square on a CPU). Every
image is resized so its shorter side is the working size (bilinear, antialiased) and centre-cropped to a square.
Channels: 1 if every training image is greyscale, else 3 (RGB). Alpha is composited onto white; palette, CMYK and
other modes are converted to RGB; 16-bit images are scaled to 8 bits; animated images use their first frame;
EXIF orientation is applied. Unreadable or truncated files are skipped with a warning that counts and names them;
more than ``data.max_bad_fraction`` (5%) bad files among the training images, or among the test images, is an
error (each split on its own, so a test set cannot be emptied unnoticed). Images with NaN or infinite pixel
values are unreadable files.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import re
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps
from torch.nn import functional as F

from bonsai.errors import DatasetError

log = logging.getLogger("bonsai")

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
_MAX_PIXELS = 64_000_000  # a declared size above this is treated as a decompression bomb and skipped
ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a silently grey image


@dataclass
class Split:
    """One part of a dataset: images held in memory (``x``) or as files (``files``), with optional labels."""

    names: list[str]  # stable identifiers: path relative to the split's folder, or the row index for arrays
    y: torch.Tensor | None  # int64 class indices, or None when unlabeled
    x: torch.Tensor | None = None  # uint8 (N, C, H, W) when in memory
    files: list[Path] | None = None  # when streaming
    # streaming only: per-channel (sum, sum of squares, pixel count) gathered while the files were first decoded
    pixel_sums: tuple[np.ndarray, np.ndarray, int] | None = None

    def __len__(self) -> int:
        return len(self.names)

    def subset(self, idx: np.ndarray) -> "Split":
        idx_t = torch.as_tensor(idx, dtype=torch.long)
        return Split(
            names=[self.names[i] for i in idx],
            y=None if self.y is None else self.y[idx_t],
            x=None if self.x is None else self.x[idx_t],
            files=None if self.files is None else [self.files[i] for i in idx],
        )


@dataclass
class Dataset:
    """A validated dataset with its derived properties."""

    source: Path
    kind: str  # folder | csv | npz
    classes: list[str]
    channels: int
    image_size: int
    train: Split
    test: Split | None
    mean: list[float]
    std: list[float]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)
    original_sizes: str = ""

    @property
    def in_memory(self) -> bool:
        return self.train.x is not None

    def class_counts(self, split: Split | None = None) -> list[int]:
        split = split or self.train
        if split.y is None:
            return []
        return torch.bincount(split.y, minlength=len(self.classes)).tolist()

    def fingerprint(self) -> str:
        """A hash of the training images' names and labels: a resumed run must see the same data."""
        h = hashlib.sha1()
        for name in self.train.names:
            h.update(name.encode("utf-8", "surrogateescape") + b"\0")
        h.update(self.train.y.numpy().tobytes())
        return h.hexdigest()

    def meta(self) -> dict:
        """What a saved model needs to read new images the same way (``dataset.json``)."""
        return {
            "fingerprint": self.fingerprint(),
            "source": str(self.source),
            "kind": self.kind,
            "classes": self.classes,
            "channels": self.channels,
            "image_size": self.image_size,
            "mean": self.mean,
            "std": self.std,
            "train_images": len(self.train),
            "test_images": 0 if self.test is None else len(self.test),
            "test_labeled": self.test is not None and self.test.y is not None,
            "skipped_files": len(self.skipped),
            "class_counts": self.class_counts(),
        }

    def describe(self) -> str:
        counts = self.class_counts()
        lines = [
            f"source        {self.source} ({self.kind})",
            f"classes       {len(self.classes)}: " + ", ".join(f"{c} ({n})" for c, n in zip(self.classes, counts)),
            f"train images  {len(self.train)}",
        ]
        if self.test is None:
            lines.append("test images   none")
        else:
            lines.append(f"test images   {len(self.test)} ({'labeled' if self.test.y is not None else 'unlabeled'})")
        lines += [
            f"channels      {self.channels} ({'grey' if self.channels == 1 else 'RGB'})",
            f"image sizes   {self.original_sizes}",
            f"working size  {self.image_size}x{self.image_size}",
            "mean          " + ", ".join(f"{m:.2f}" for m in self.mean),
            "std           " + ", ".join(f"{s:.2f}" for s in self.std),
            f"loading       {'in memory (uint8 tensor)' if self.in_memory else 'streaming from files'}",
            f"skipped files {len(self.skipped)}" + "".join(f"\n  {f}: {r}" for f, r in self.skipped[:10]),
        ]
        return "\n".join(lines)


# ---- images ----------------------------------------------------------------------------------------------


def _to_mode(im: Image.Image, channels: int) -> Image.Image:
    """Convert any PIL mode to L (channels=1) or RGB (channels=3)."""
    if im.mode.startswith("I") or im.mode == "F":
        a = np.asarray(im, dtype=np.float32)
        if not np.isfinite(a).all():
            raise ValueError("non-finite pixel values (NaN or infinity)")
        if im.mode.startswith("I;16") or (im.mode == "I" and a.max(initial=0) > 255):
            a = a / 257.0  # 16-bit range 0..65535 onto 0..255 (the same scale for every image of that mode)
        im = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info or im.mode in ("PA", "LA", "RGBa", "La"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("L" if channels == 1 else "RGB")


@contextmanager
def _open_checked(path: str | Path) -> Iterator[Image.Image]:
    """Open an image, refusing declared sizes that would be decompression bombs before any pixel is decoded."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a corrupt file's decoder chatter; failures still raise
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            opened = Image.open(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ValueError("declared size is too large (decompression bomb?)") from None
        with opened as im:
            w, h = im.size
            if w * h > _MAX_PIXELS:
                raise ValueError(f"declared size {w}x{h} is too large (decompression bomb?)")
            if w < 1 or h < 1:
                raise ValueError("empty image")
            yield im


def read_image(path: str | Path, size: int, channels: int) -> np.ndarray:
    """Decode one image file to a ``(size, size, channels)`` uint8 array, or raise OSError/ValueError."""
    with _open_checked(path) as im:
        if im.format == "JPEG":
            im.draft("L" if channels == 1 else "RGB", (size, size))  # decode at reduced scale: much faster
        im.seek(0)
        im.load()
        im = ImageOps.exif_transpose(im)
        im = _to_mode(im, channels)
        if im.size != (size, size):
            im = ImageOps.fit(im, (size, size), Image.Resampling.BILINEAR)
        a = np.asarray(im, dtype=np.uint8)
    return a[:, :, None] if a.ndim == 2 else a


def _probe(path: Path) -> tuple[int, int, bool]:
    """(width, height, is_grey) from the header only."""
    with _open_checked(path) as im:
        return im.size[0], im.size[1], im.mode in _GREY_MODES


def list_images(folder: Path) -> list[Path]:
    """Image files below ``folder`` in a stable order; hidden files skipped, symlinked folders not followed."""
    def unreadable(e: OSError) -> None:  # a folder that cannot be listed would drop its images without a word
        raise DatasetError(f"{e.filename or folder}: cannot list this folder ({e.strerror or e})")

    out = []
    for root, dirs, files in os.walk(folder, onerror=unreadable, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_EXTS]
    return out


def _rel(p: Path, root: Path) -> str:
    return p.relative_to(root).as_posix()


# ---- discovering files -------------------------------------------------------------------------------------


@dataclass
class _FileList:
    files: list[Path]
    labels: list[str] | None
    root: Path | None  # names are relative to this; None: names are the paths as given


def _natural_sorted(labels: set[str]) -> list[str]:
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=lambda s: (int(s), s))
    return sorted(labels)


def _folder_split(folder: Path, labeled: bool | None) -> _FileList:
    """Class folders (labeled) or loose images (unlabeled) in ``folder``; ``labeled=None`` decides by content."""
    subdirs = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    loose = [p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith(".")]
    if labeled is None:
        labeled = bool(subdirs) and not loose
        if subdirs and loose:
            raise DatasetError(f"{folder}: holds both images and sub-folders; use only class folders or only images")
    if not labeled:
        return _FileList(list_images(folder), None, folder)
    if loose:
        log.warning("%s: %d images lie outside any class folder and are ignored", folder, len(loose))
    files, labels = [], []
    for d in subdirs:
        imgs = list_images(d)
        if not imgs:
            log.warning("%s: class folder has no images and is ignored", d)
        files += imgs
        labels += [d.name] * len(imgs)
    return _FileList(files, labels, folder)


_FILE_COLS = ("filename", "file", "image", "path", "img", "name", "file_name", "image_path")
_LABEL_COLS = ("label", "class", "category", "target", "y", "class_name")


def _read_csv(path: Path, root: Path, need_label: bool) -> _FileList:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if any(c.strip() for c in r)]
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a UTF-8 text file") from None
    except csv.Error as e:  # e.g. a field past the csv module's size limit, or a NUL byte
        raise DatasetError(f"{path}: not a readable CSV ({e})") from None
    if not rows:
        raise DatasetError(f"{path}: the CSV is empty")
    header = [c.strip().lower() for c in rows[0]]
    fcol = next((header.index(c) for c in _FILE_COLS if c in header), None)
    lcol = next((header.index(c) for c in _LABEL_COLS if c in header), None)
    if fcol is None:
        raise DatasetError(f"{path}: header must name a file column ({'/'.join(_FILE_COLS[:4])}), got {rows[0]}")
    if need_label and lcol is None:
        raise DatasetError(f"{path}: header must name a label column ({'/'.join(_LABEL_COLS[:2])}), got {rows[0]}")
    root_r = root.resolve()
    files, labels, missing = [], [], []
    for line, r in enumerate(rows[1:], start=2):
        if len(r) <= max(fcol, lcol or 0):
            raise DatasetError(f"{path}: line {line} has {len(r)} columns, expected {len(header)}")
        name = r[fcol].strip()
        p = Path(name)
        target = (path.parent / p).resolve()
        if p.is_absolute() or not target.is_relative_to(root_r):
            raise DatasetError(f"{path}: line {line} names {name!r}, outside the dataset folder {root}; refused")
        if not target.is_file():
            missing.append(name)
            continue
        files.append(path.parent / p)
        if lcol is not None:
            labels.append(r[lcol].strip())
    if missing:
        raise DatasetError(
            f"{path}: names {len(missing)} missing file(s): {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}"
        )
    if lcol is not None and any(not lab for lab in labels):
        raise DatasetError(f"{path}: some rows have an empty label")
    return _FileList(files, labels if lcol is not None else None, path.parent)


def _discover(path: Path) -> tuple[str, _FileList, _FileList | None]:
    if path.is_file() and path.suffix.lower() == ".csv":
        root = path.parent
        test_csv = root / "test.csv"
        test = _read_csv(test_csv, root, False) if test_csv.is_file() and test_csv != path else None
        if test is None and (root / "test").is_dir():
            test = _folder_split(root / "test", None)
        return "csv", _read_csv(path, root, True), test
    if (path / "train").is_dir():
        train = _folder_split(path / "train", True)
        test = _folder_split(path / "test", None) if (path / "test").is_dir() else None
        return "folder", train, test
    csvs = [path / n for n in ("train.csv", "labels.csv") if (path / n).is_file()]
    if len(csvs) == 1:
        return _discover(csvs[0])
    if len(csvs) > 1:
        raise DatasetError(f"{path}: holds both train.csv and labels.csv; keep one")
    raise DatasetError(
        f"{path}: no dataset found: expected train/<class>/ image folders, a train.csv or labels.csv, or .npz files"
    )


# ---- npz ----------------------------------------------------------------------------------------------------

_PART = re.compile(r"_part(\d+)of(\d+)\.npz$")


def _npz_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.npz"))
    parts = [f for f in files if _PART.search(f.name)]
    if parts:
        nums = [tuple(map(int, _PART.search(f.name).groups())) for f in parts]
        total = {n for _, n in nums}
        if len(total) != 1 or sorted(k for k, _ in nums) != list(range(1, total.pop() + 1)):
            raise DatasetError(f"{path}: the *_partKofN.npz files are incomplete: found {[f.name for f in parts]}")
        return sorted(parts, key=lambda f: int(_PART.search(f.name).group(1)))
    if len(files) != 1:
        raise DatasetError(f"{path}: expected one .npz file or a set of *_partKofN.npz parts, found {len(files)}")
    return files


_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip's first entry, or an empty zip


def read_npz(f: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays ``keys`` (every one when None; those missing are left out) of the .npz file ``f``, read without
    pickle. Whatever makes the file unreadable (not a zip, object arrays, a damaged member, a header declaring an
    array too large to hold) is one DatasetError naming it."""
    try:
        with open(f, "rb") as fh:
            head = fh.read(4)
    except OSError as e:
        raise DatasetError(f"{f}: cannot read ({e.strerror or e})") from None
    if head not in _ZIP_MAGIC:
        what = "a single .npy array?" if head == b"\x93NUM" else "not a zip file"
        raise DatasetError(f"{f}: not an .npz archive ({what})")
    try:
        with np.load(f, allow_pickle=False) as z:
            return {k: z[k] for k in (z.files if keys is None else keys) if k in z.files}
    except ValueError as e:
        if "pickle" in str(e).lower():
            raise DatasetError(f"{f}: holds object arrays, which need pickle; refused (store uint8/int arrays)") from None
        raise DatasetError(f"{f}: not a readable .npz ({e})") from None
    except (OSError, zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise DatasetError(f"{f}: not a readable .npz ({e})") from None
    except MemoryError:
        raise DatasetError(f"{f}: not a readable .npz (an array too large to hold in memory: a damaged header?)") from None


def _load_npz(files: list[Path]) -> dict[str, np.ndarray]:
    keys = ("x_train", "y_train", "x_test", "y_test", "classes")
    chunks: dict[str, list[np.ndarray]] = {}
    for f in files:
        z = read_npz(f, keys)
        if "x_train" not in z or "y_train" not in z:
            with zipfile.ZipFile(f) as zf:  # name every array the file holds: the hint to what they are called
                held = [n.removesuffix(".npy") for n in zf.namelist()]
            raise DatasetError(f"{f}: must contain x_train and y_train (has {', '.join(held) or 'nothing'})")
        for k, a in z.items():
            chunks.setdefault(k, []).append(a)
    if "classes" in chunks:  # the parts that name classes name the same ones, in the same order
        names = [[str(c) for c in a.reshape(-1).tolist()] for a in chunks["classes"]]
        if any(n != names[0] for n in names):
            raise DatasetError(f"{files[0].parent}: the parts' classes arrays differ; give every part the same classes, in the same order")
    out = {}
    for k, parts in chunks.items():
        if k == "classes":
            out[k] = parts[0]
            continue
        nonempty = [p for p in parts if p.size] or parts[:1]
        try:
            out[k] = np.concatenate(nonempty)
        except ValueError as e:
            raise DatasetError(f"{files[0].parent}: key {k} has different shapes across parts ({e})") from None
    return out


def _npz_images(a: np.ndarray, key: str, src: Path) -> torch.Tensor:
    if a.dtype != np.uint8:
        raise DatasetError(f"{src}: {key} must be uint8 pixels, got dtype {a.dtype}")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DatasetError(f"{src}: {key} must have shape (N,H,W) or (N,H,W,C) with C 1 or 3, got {a.shape}")
    if a.shape[1] == 0 or a.shape[2] == 0:
        raise DatasetError(f"{src}: {key} holds images without pixels (shape {a.shape})")
    return torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))


def _npz_labels(a: np.ndarray, n: int, key: str, src: Path) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer) or a.ndim != 1 or len(a) != n:
        raise DatasetError(f"{src}: {key} must be {n} integer labels, got dtype {a.dtype} shape {a.shape}")
    return a.astype(np.int64)


def resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """Resize a uint8 (N,C,H,W) tensor: shorter side to ``size`` (antialiased bilinear), centre crop."""
    if x.shape[-2:] == (size, size) or len(x) == 0:
        return x
    h, w = x.shape[-2:]
    if min(h, w) == 0:
        raise DatasetError(f"images without pixels (shape {tuple(x.shape)})")
    s = size / min(h, w)
    nh, nw = max(size, round(h * s)), max(size, round(w * s))
    out = []
    for chunk in x.split(1024):
        r = F.interpolate(chunk.float(), size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out.append(r[..., top : top + size, left : left + size].round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _from_npz(path: Path, image_size: int | None, max_size: int) -> Dataset:
    files = _npz_files(path)
    return from_arrays(_load_npz(files), image_size, max_size, source=files[0] if len(files) == 1 else path, kind="npz")


def from_arrays(
    z: dict[str, np.ndarray], image_size: int | None = None, max_size: int = 64, source: str | Path = "<arrays>", kind: str = "arrays"
) -> Dataset:
    """A Dataset from in-memory arrays with the npz keys (x_train, y_train[, x_test, y_test, classes])."""
    src = source
    if "x_train" not in z or "y_train" not in z:
        raise DatasetError(f"{src}: needs x_train and y_train")
    x = _npz_images(z["x_train"], "x_train", src)
    y = _npz_labels(z["y_train"], len(x), "y_train", src)
    if "classes" in z:
        classes = [str(c) for c in z["classes"].reshape(-1).tolist()]
        if len(set(classes)) != len(classes):
            twice = sorted({c for c in classes if classes.count(c) > 1})
            raise DatasetError(f"{src}: the classes array names {', '.join(map(repr, twice[:5]))} more than once; class names must be unique")
        if y.size and (y.min() < 0 or y.max() >= len(classes)):
            raise DatasetError(f"{src}: y_train holds labels outside 0..{len(classes) - 1} (classes has {len(classes)})")
    else:
        values = np.unique(y)
        classes = [str(v) for v in values.tolist()]
        y = np.searchsorted(values, y)  # sparse label values onto 0..K-1
    test = None
    if "x_test" in z and z["x_test"].size:
        xt = _npz_images(z["x_test"], "x_test", src)
        yt = None
        if "y_test" in z and z["y_test"].size:
            yt_np = _npz_labels(z["y_test"], len(xt), "y_test", src)
            if "classes" in z and (yt_np.min() < 0 or yt_np.max() >= len(classes)):
                raise DatasetError(f"{src}: y_test holds labels outside 0..{len(classes) - 1} (classes has {len(classes)})")
            if "classes" not in z:
                lookup = {int(v): i for i, v in enumerate(classes)}
                if any(int(v) not in lookup for v in np.unique(yt_np)):
                    raise DatasetError(f"{src}: y_test holds labels that never occur in y_train")
                yt_np = np.array([lookup[int(v)] for v in yt_np], dtype=np.int64)
            yt = torch.from_numpy(yt_np)
        if xt.shape[1] != x.shape[1]:
            raise DatasetError(f"{src}: x_test has {xt.shape[1]} channels, x_train {x.shape[1]}")
        test = Split(names=[str(i) for i in range(len(xt))], y=yt, x=xt)
    h, w = x.shape[-2:]
    size = max(4, image_size or min(min(h, w), max_size))
    train = Split(names=[str(i) for i in range(len(x))], y=torch.from_numpy(np.asarray(y, dtype=np.int64)), x=x)
    train.x = resize_tensor(train.x, size)
    if test is not None:
        test.x = resize_tensor(test.x, size)
    return _finish(Path(source), kind, classes, int(x.shape[1]), size, train, test, [], f"{h}x{w} (all)")


# ---- the entry point ----------------------------------------------------------------------------------------


def _memory_limit(gb: float) -> int:
    if gb > 0:
        return int(gb * 2**30)
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    return total // 4


def load_dataset(
    path: str | Path,
    image_size: int | None = None,
    max_image_size: int = 64,
    in_memory: str = "auto",
    memory_budget_gb: float = 0.0,
    max_bad_fraction: float = 0.05,
    progress: bool = False,
) -> Dataset:
    """Read and validate the dataset at ``path`` (see the module docstring for layouts and rules).

    >>> ds = load_dataset("path/to/data")  # doctest: +SKIP
    >>> ds.classes, ds.image_size, len(ds.train)  # doctest: +SKIP
    """
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file or folder")
    if path.suffix.lower() == ".npz" or (path.is_dir() and any(path.glob("*.npz")) and not (path / "train").is_dir()):
        return _from_npz(path, image_size, max_image_size)
    if path.is_file() and path.suffix.lower() != ".csv":
        raise DatasetError(f"{path}: not a dataset: give a folder, a labels .csv or a .npz file")

    kind, train_list, test_list = _discover(path)
    if not train_list.files:
        raise DatasetError(f"{path}: no training images found")

    # Pass 1: headers only (fast): sizes, colour, and files that cannot even be opened.
    skipped: list[tuple[str, str]] = []
    sizes, greys, good = [], [], []
    for i, f in enumerate(train_list.files):
        try:
            w, h, grey = _probe(f)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            skipped.append((str(f), error_reason(e)))
            continue
        sizes.append(min(w, h))
        greys.append(grey)
        good.append(i)
    channels = 1 if greys and all(greys) else 3
    size = image_size or (min(int(np.median(sizes)), max_image_size) if sizes else max_image_size)
    size = max(size, 4)
    wh = sorted(sizes)
    original = f"shorter side {wh[0]}..{wh[-1]} px, median {int(np.median(wh))}" if wh else "none readable"

    n_total = len(train_list.files) + (len(test_list.files) if test_list else 0)
    est = n_total * channels * size * size
    if in_memory == "auto":
        keep = est <= _memory_limit(memory_budget_gb)
    else:
        keep = in_memory == "yes"

    # Pass 2: decode everything once (kept when in memory; validated only when streaming).
    train_split = _decode(train_list, good, size, channels, keep, skipped, progress, "train")
    n_train_bad = len(skipped)
    test_split = None
    if test_list is not None and test_list.files:
        test_split = _decode(test_list, range(len(test_list.files)), size, channels, keep, skipped, progress, "test")
    if skipped:
        names = ", ".join(Path(f).name for f, _ in skipped[:5])
        log.warning("skipped %d unreadable image file(s) of %d: %s%s", len(skipped), n_total, names, " ..." if len(skipped) > 5 else "")
    # each split on its own: a few bad test files among many training ones must not empty the test set unnoticed
    for what, bad_files, n in (
        ("training", skipped[:n_train_bad], len(train_list.files)),
        ("test", skipped[n_train_bad:], len(test_list.files) if test_list else 0),
    ):
        bad = len(bad_files) / max(n, 1)
        if bad > max_bad_fraction:
            raise DatasetError(
                f"{path}: {len(bad_files)} of {n} {what} image files are unreadable ({bad:.0%} > data.max_bad_fraction "
                f"{max_bad_fraction:.0%}); first: {bad_files[0][0]} ({bad_files[0][1]})"
            )

    if train_split.y is None or not len(train_split):
        raise DatasetError(f"{path}: no readable training images")
    classes = _natural_sorted(set(train_split.y))  # labels of the images that decoded
    index = {c: i for i, c in enumerate(classes)}
    train_split.y = torch.tensor([index[c] for c in train_split.y], dtype=torch.long)  # type: ignore[union-attr]
    if test_split is not None and test_split.y is not None:
        unknown = sorted({c for c in test_split.y if c not in index})  # type: ignore[union-attr]
        if unknown:
            raise DatasetError(f"{path}: test classes {unknown[:5]} do not occur in the training data")
        test_split.y = torch.tensor([index[c] for c in test_split.y], dtype=torch.long)  # type: ignore[union-attr]
    return _finish(path, kind, classes, channels, size, train_split, test_split, skipped, original)


def error_reason(e: Exception) -> str:
    """The first line of an exception's message (its type when empty), at most 160 characters."""
    msg = str(e).split("\n")[0] or type(e).__name__
    return msg[:160]


def _decode(fl: _FileList, indices, size, channels, keep, skipped, progress, what) -> Split:
    """Decode the files at ``indices``; bad ones are appended to ``skipped``. Labels stay strings here."""
    from tqdm import tqdm

    arrays, names, labels, files = [], [], [], []
    s1, s2, n = np.zeros(channels), np.zeros(channels), 0
    seen: dict[bytes, tuple[str, str]] = {}  # pixel hash -> (label, name): the same image under two classes
    clashes: list[str] = []
    it = tqdm(list(indices), desc=f"reading {what} images", unit="img", disable=None if progress else True, leave=False)
    for i in it:
        f = fl.files[i]
        try:
            a = read_image(f, size, channels)
        except Exception as e:  # noqa: BLE001 - any decoder failure means "skip this file"
            skipped.append((str(f), error_reason(e)))
            continue
        if keep:
            arrays.append(a)
        else:  # the pixel statistics, so the files need not be decoded a second time
            a64 = a.reshape(-1, channels).astype(np.float64)
            s1 += a64.sum(axis=0)
            s2 += (a64 * a64).sum(axis=0)
            n += a64.shape[0]
        files.append(f)
        names.append(_rel(f, fl.root) if fl.root is not None else str(f))
        if fl.labels is not None:
            labels.append(fl.labels[i])
            key = hashlib.blake2b(a.tobytes(), digest_size=16).digest()
            first = seen.setdefault(key, (fl.labels[i], names[-1]))
            if first[0] != fl.labels[i]:
                clashes.append(f"{first[1]} ({first[0]}) = {names[-1]} ({fl.labels[i]})")
    if clashes:
        log.warning(
            "%s: %d image(s) appear under more than one class, e.g. %s", fl.root, len(clashes), "; ".join(clashes[:3])
        )
    x = None
    if keep:
        x = torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy()) if arrays else torch.zeros(0, channels, size, size, dtype=torch.uint8)
    sums = None if keep else (s1, s2, n)
    return Split(names=names, y=labels if fl.labels is not None else None, x=x, files=None if keep else files, pixel_sums=sums)  # type: ignore[arg-type]


def read_files(files: list[Path], root: Path | None, size: int, channels: int, progress: bool = False) -> tuple[Split, list[tuple[str, str]]]:
    """Decode unlabeled image files into memory (names relative to ``root``, or the paths as given), and the
    (file, reason) pairs of those that could not be read."""
    skipped: list[tuple[str, str]] = []
    split = _decode(_FileList(files, None, root), range(len(files)), size, channels, True, skipped, progress, "input")
    return split, skipped


def sample_images(split: Split, n: int, size: int, channels: int, seed: int = 0) -> torch.Tensor:
    """``split``'s images as one uint8 (N, C, H, W) tensor: all of them when they are in memory, else ``n`` files
    drawn at random (from ``seed``) and decoded."""
    if split.x is not None:
        return split.x
    idx = np.random.default_rng(seed).permutation(len(split.files))[:n]
    return torch.from_numpy(np.stack([read_image(split.files[i], size, channels) for i in idx]).transpose(0, 3, 1, 2).copy())


def _channel_stats(split: Split, channels: int, size: int) -> tuple[list[float], list[float]]:
    """Per-channel mean/std of pixel values (0..255) over the training images (when streaming, from the sums
    gathered while decoding, else from a sample of 2,000 files)."""
    if split.x is None and split.pixel_sums is not None:
        x = None
        s, s2, n = (torch.from_numpy(split.pixel_sums[0]), torch.from_numpy(split.pixel_sums[1]), split.pixel_sums[2])
    else:
        x = sample_images(split, 2000, size, channels)
    if x is not None:
        s = torch.zeros(channels, dtype=torch.float64)
        s2 = torch.zeros(channels, dtype=torch.float64)
        for chunk in x.split(4096):
            c = chunk.to(torch.float64)
            s += c.sum(dim=(0, 2, 3))
            s2 += (c * c).sum(dim=(0, 2, 3))
        n = x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / n
    std = (s2 / n - mean**2).clamp_min(1e-6).sqrt().clamp_min(1.0)  # a constant channel must not divide by ~0
    return mean.tolist(), std.tolist()


def _finish(path, kind, classes, channels, size, train, test, skipped, original) -> Dataset:
    if len(train) == 0:
        raise DatasetError(f"{path}: the dataset is empty (no training images)")
    if len(classes) < 2:
        raise DatasetError(f"{path}: only one class ({classes[0] if classes else 'none'}) found; need at least 2")
    mean, std = _channel_stats(train, channels, size)
    return Dataset(Path(path), kind, classes, channels, size, train, test, mean, std, skipped, original)


def split_hash(val_idx: np.ndarray) -> str:
    """A short hash of a validation split's indices (``dataset.json``'s ``val_split``): a resumed run must validate
    on the same images.

    >>> split_hash(np.array([3, 1])) == split_hash(np.array([3, 1])), split_hash(np.array([3, 1])) == split_hash(np.array([3, 2]))
    (True, False)
    """
    return hashlib.sha1(np.asarray(val_idx, dtype=np.int64).tobytes()).hexdigest()[:16]


def split_validation(y: torch.Tensor, fraction: float, seed: int, max_images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, val) indices: ``fraction`` of every class (at least one image of each class that has two
    or more; one-image classes stay in training), drawn with ``seed``. With ``max_images``, the fraction is lowered
    to hold out about that many images in all (a large dataset's 10% is more than model selection needs; the rest
    trains).

    >>> tr, va = split_validation(torch.tensor([0] * 10 + [1] * 10), 0.1, 0)
    >>> len(tr), len(va)
    (18, 2)
    >>> tr, va = split_validation(torch.tensor([0] * 500 + [1] * 500), 0.1, 0, max_images=40)
    >>> len(tr), len(va)
    (960, 40)
    """
    if max_images is not None:
        fraction = min(fraction, max_images / max(len(y), 1))
    rng = np.random.default_rng(seed)
    y_np = y.numpy()
    train_idx, val_idx = [], []
    for c in np.unique(y_np):
        idx = rng.permutation(np.flatnonzero(y_np == c))
        k = min(max(1, round(len(idx) * fraction)), len(idx) - 1) if len(idx) >= 2 else 0
        val_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
