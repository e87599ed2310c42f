"""A corpus of malformed and hostile inputs, built on the fly, each with the outcome bonsai promises.

Image cases drop one file into a valid image-folder dataset and say whether it is read (``"read"``, with an
optional check of the decoded pixels) or skipped with a counted reason (``"skip"``). Dataset-level cases build a
whole dataset and expect either a clear :class:`DatasetError` (message fragment given) or a successful load.
Nothing is pickled, nothing large is written, nothing is downloaded.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from conftest import make_images, write_folder
from PIL import Image

from bonsai.data.sources import load_dataset, read_image
from bonsai.errors import DatasetError

# ---- single files dropped into train/cat/ ------------------------------------------------------------------


def _png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "PNG")  # the mode follows dtype and channels: I;16, LA, RGBA, RGB
    return buf.getvalue()


def _jpeg_bytes(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "JPEG", **kw)
    return buf.getvalue()


def _bomb_png(w: int, h: int) -> bytes:
    """A valid PNG header declaring w x h pixels, with a tiny (wrong) body: PIL learns the size before decoding."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def _exif_rotated_jpeg() -> bytes:
    """A 32x16 image, left half black, right half white, tagged 'rotate 90 CW to display' (orientation 6)."""
    a = np.zeros((16, 32, 3), np.uint8)
    a[:, 16:] = 255
    im = Image.fromarray(a)
    exif = im.getexif()
    exif[0x0112] = 6
    return _jpeg_bytes(im, exif=exif.tobytes(), quality=95)


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buf.getvalue()


def _palette_with_transparency() -> bytes:
    im = Image.new("P", (16, 16), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (0, 0, 8, 16))
    buf = io.BytesIO()
    im.save(buf, "PNG", transparency=0)  # index 0 (the right half) is transparent
    return buf.getvalue()


def _tiff_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_images(1)[0][0]).save(buf, "TIFF")
    return buf.getvalue()


def _webp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_images(1)[0][0]).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _bmp_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(make_images(1)[0][0]).save(buf, "BMP")
    return buf.getvalue()


GOOD_PNG = _png_bytes(make_images(1)[0][0])
GOOD_JPEG = _jpeg_bytes(Image.fromarray(make_images(1)[0][0]))


def _white(a: np.ndarray) -> bool:
    return bool((a > 240).all())


# name, file name, bytes, expected ("read" | "skip"), optional check of the (16, 16, 3) decoded pixels
FILE_CASES: list[tuple[str, str, bytes, str, Callable[[np.ndarray], bool] | None]] = [
    ("zero-byte file", "empty.png", b"", "skip", None),
    ("truncated PNG", "trunc.png", GOOD_PNG[: len(GOOD_PNG) // 2], "skip", None),
    ("truncated JPEG", "trunc.jpg", GOOD_JPEG[: len(GOOD_JPEG) // 2], "skip", None),
    ("PNG signature only", "sig.png", GOOD_PNG[:8], "skip", None),
    ("text file named .png", "notes.png", b"this is not an image\n" * 10, "skip", None),
    ("HTML page named .jpg", "page.jpg", b"<!doctype html><html><body>404</body></html>", "skip", None),
    ("random bytes named .webp", "noise.webp", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "skip", None),
    ("decompression bomb (100k x 100k declared)", "bomb.png", _bomb_png(100_000, 100_000), "skip", None),
    ("decompression bomb (9k x 9k declared)", "bomb9k.png", _bomb_png(9_000, 9_000), "skip", None),
    ("PNG with a corrupt body", "badbody.png", _bomb_png(16, 16), "skip", None),
    ("1x1 image", "one.png", _png_bytes(np.full((1, 1, 3), 200, np.uint8)), "read", lambda a: bool((a == 200).all())),
    ("1000x1 sliver", "sliver.png", _png_bytes(np.full((1, 1000, 3), 90, np.uint8)), "read", lambda a: bool((a == 90).all())),
    ("16-bit greyscale PNG", "deep.png", _png_bytes(np.full((16, 16), 65535, np.uint16)), "read", _white),
    ("CMYK JPEG", "cmyk.jpg", _jpeg_bytes(Image.new("CMYK", (16, 16), (0, 0, 0, 0))), "read", _white),
    ("palette PNG with transparency", "pal.png", _palette_with_transparency(), "read",
     lambda a: bool((a[:, :6, 0] > 200).all() and (a[:, :6, 1] < 50).all() and _white(a[:, 10:]))),
    ("grey + alpha PNG", "la.png", _png_bytes(np.zeros((16, 16, 2), np.uint8)), "read", _white),
    ("RGBA PNG, fully transparent", "rgba.png", _png_bytes(np.zeros((16, 16, 4), np.uint8)), "read", _white),
    ("EXIF-rotated JPEG", "exif.jpg", _exif_rotated_jpeg(), "read",
     lambda a: bool(a[:4].mean() < 60 and a[-4:].mean() > 200)),  # after rotation, black on top, white below
    ("animated GIF (first frame used)", "anim.gif", _animated_gif(), "read", lambda a: bool(a[..., 0].mean() > 200 and a[..., 2].mean() < 60)),
    ("PNG named .jpg", "really_png.jpg", GOOD_PNG, "read", None),
    ("upper-case extension", "LOUD.PNG", GOOD_PNG, "read", None),
    ("TIFF", "t.tiff", _tiff_bytes(), "read", None),
    ("lossless WebP", "w.webp", _webp_bytes(), "read", None),
    ("BMP", "b.bmp", _bmp_bytes(), "read", None),
    ("unicode file name", "katze_ü_猫 🐱.png", GOOD_PNG, "read", None),
]


@pytest.mark.parametrize("case", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_one_hostile_file_in_a_dataset(tmp_path: Path, case, caplog):
    _, name, data, expected, check = case
    root = write_folder(tmp_path / "d")
    target = root / "train" / "cat" / name
    target.write_bytes(data)
    ds = load_dataset(root, max_bad_fraction=0.5)
    skipped = [f for f, _ in ds.skipped]
    if expected == "skip":
        assert skipped == [str(target)], ds.skipped
        assert len(ds.train) == 24 and "skipped 1 unreadable image file(s)" in caplog.text
    else:
        assert ds.skipped == [] and len(ds.train) == 25
        i = ds.train.names.index(f"cat/{name}")
        a = ds.train.x[i].permute(1, 2, 0).numpy()
        assert a.shape == (16, 16, 3)
        if check is not None:
            assert check(a), a[..., 0]


@pytest.mark.parametrize("side", [9_000, 10_000, 100_000])  # bonsai's own limit, PIL's warning, PIL's error
def test_bomb_is_refused_before_decoding(tmp_path: Path, side: int):
    p = tmp_path / "bomb.png"
    p.write_bytes(_bomb_png(side, side))
    with pytest.raises(ValueError, match="decompression bomb"):
        read_image(p, 16, 3)


# ---- file system oddities ------------------------------------------------------------------------------------


def test_non_utf8_file_name_is_read(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    name = b"caf\xe9_latin1.png"  # Latin-1 bytes: not valid UTF-8
    try:
        with open(os.path.join(os.fsencode(root / "train" / "cat"), name), "wb") as f:
            f.write(GOOD_PNG)
    except OSError:
        pytest.skip("the file system refuses non-UTF-8 names")
    ds = load_dataset(root)
    assert len(ds.train) == 25 and ds.skipped == []
    # and predictions for it name the file by its original bytes
    import bonsai

    run = bonsai.fit(root, epochs=1, out=str(tmp_path / "r"), arch="resnet8", batch_size=16, quiet=True, precision="fp32")
    preds = run.predict(root / "train" / "cat")
    preds.to_csv(tmp_path / "p.csv")
    assert name in (tmp_path / "p.csv").read_bytes()


def test_symlink_loop_is_not_followed(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    (root / "train" / "cat" / "loop").symlink_to(root / "train", target_is_directory=True)
    ds = load_dataset(root)
    assert len(ds.train) == 24


def test_dangling_symlink_is_skipped(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    (root / "train" / "cat" / "gone.png").symlink_to(tmp_path / "does-not-exist.png")
    ds = load_dataset(root, max_bad_fraction=0.5)
    assert [Path(f).name for f, _ in ds.skipped] == ["gone.png"]


def test_hidden_files_and_other_extensions_are_ignored(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    (root / "train" / "cat" / ".hidden.png").write_bytes(b"junk")
    (root / "train" / "cat" / "README.txt").write_text("notes")
    (root / "train" / "cat" / "Thumbs.db").write_bytes(b"\x00" * 100)
    ds = load_dataset(root)
    assert len(ds.train) == 24 and ds.skipped == []


def test_class_folder_with_a_single_image_loads(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    (root / "train" / "owl").mkdir()
    (root / "train" / "owl" / "only.png").write_bytes(GOOD_PNG)
    ds = load_dataset(root)
    assert "owl" in ds.classes and len(ds.train) == 25


def test_duplicate_images_across_classes_are_warned(tmp_path: Path, caplog):
    root = write_folder(tmp_path / "d")
    (root / "train" / "dog" / "copy.png").write_bytes((root / "train" / "cat" / "000.png").read_bytes())
    ds = load_dataset(root)
    assert len(ds.train) == 25
    assert "1 image(s) appear under more than one class" in caplog.text and "cat/000.png" in caplog.text


def test_same_image_twice_in_one_class_is_not_warned(tmp_path: Path, caplog):
    root = write_folder(tmp_path / "d")
    (root / "train" / "cat" / "copy.png").write_bytes((root / "train" / "cat" / "000.png").read_bytes())
    load_dataset(root)
    assert "more than one class" not in caplog.text


# ---- whole datasets that must be refused with a clear message ----------------------------------------------


def _csv_dataset(tmp_path: Path, rows: str) -> Path:
    root = write_folder(tmp_path / "d")
    (root / "labels.csv").write_text("file,label\n" + rows)
    return root / "labels.csv"


def _npz(tmp_path: Path, **arrays) -> Path:
    p = tmp_path / "bad.npz"
    np.savez(p, **arrays)
    return p


X, Y = make_images(4)

DATASET_CASES: list[tuple[str, Callable[[Path], Path], str]] = [
    ("CSV with ../ path traversal", lambda t: _csv_dataset(t, "../../etc/passwd,cat\n"), "outside the dataset folder"),
    ("CSV with an absolute path", lambda t: _csv_dataset(t, "/etc/passwd,cat\n"), "outside the dataset folder"),
    ("CSV naming a missing file", lambda t: _csv_dataset(t, "train/cat/nope.png,cat\n"), "nope.png"),
    ("CSV with a short row", lambda t: _csv_dataset(t, "train/cat/000.png\n"), "line 2 has 1 columns"),
    ("CSV that is not UTF-8", lambda t: _write(t / "l.csv", b"file,label\n\xff\xfe\xfa,cat\n"), "not a UTF-8 text file"),
    ("npz with object arrays", lambda t: _npz(t, x_train=np.array([X[0], "x"], dtype=object), y_train=Y[:2]), "pickle"),
    ("npz with float pixels", lambda t: _npz(t, x_train=X.astype(np.float64), y_train=Y), "must be uint8"),
    ("npz with 1-D pixels", lambda t: _npz(t, x_train=X.reshape(-1), y_train=Y), "must have shape"),
    ("npz with 5 channels", lambda t: _npz(t, x_train=np.zeros((12, 8, 8, 5), np.uint8), y_train=Y), "must have shape"),
    ("npz with images of no pixels", lambda t: _npz(t, x_train=np.zeros((12, 0, 0), np.uint8), y_train=Y), "without pixels"),
    ("npz with fewer labels than images", lambda t: _npz(t, x_train=X, y_train=Y[:-1]), "integer labels"),
    ("npz with float labels", lambda t: _npz(t, x_train=X, y_train=Y.astype(np.float32)), "integer labels"),
    ("npz without y_train", lambda t: _npz(t, x_train=X), "must contain x_train and y_train"),
    ("npz with other array names", lambda t: _npz(t, images=X, labels=Y), "must contain x_train and y_train (has images, labels)"),
    ("npz that is random bytes", lambda t: _write(t / "r.npz", b"PK\x03\x04" + b"\x00" * 200), "not a readable .npz"),
    ("a single .npy renamed .npz", lambda t: _npy_as_npz(t), "not an .npz archive"),
    ("an HTML page saved as .npz", lambda t: _write(t / "h.npz", b"<!DOCTYPE html><html>404</html>"), "not a zip file"),
    ("npz with a damaged compressed member", lambda t: _damaged_npz(t), "not a readable .npz"),
    ("npz naming a class twice", lambda t: _npz(t, x_train=X, y_train=Y, classes=np.array(["cat", "dog", "cat"])), "'cat' more than once"),
    ("npz parts naming different classes", lambda t: _parts_with_classes(t, ["a", "b", "c"], ["a", "c", "b"]), "classes arrays differ"),
    ("CSV with a field past the csv size limit", lambda t: _csv_dataset(t, "train/cat/000.png," + "x" * 200_000 + "\n"), "not a readable CSV"),
]


def _damaged_npz(t: Path) -> Path:
    """A compressed .npz whose deflate stream is overwritten midway (the zip directory stays intact). The pixels
    are a repeating ramp, so they are deflate-coded (random bytes would be stored, and damage would show as a
    bad CRC rather than as zlib's error)."""
    p = t / "z.npz"
    ramp = np.resize(np.arange(256, dtype=np.uint8), (256, 32, 32, 3))
    np.savez_compressed(p, x_train=ramp, y_train=np.zeros(256, np.int64))
    b = bytearray(p.read_bytes())
    b[120:160] = bytes(range(40))
    p.write_bytes(bytes(b))
    return p


def _parts_with_classes(t: Path, first: list[str], second: list[str]) -> Path:
    d = t / "parts"
    d.mkdir()
    np.savez(d / "s_part1of2.npz", x_train=X[:6], y_train=Y[:6] % 3, classes=np.array(first))
    np.savez(d / "s_part2of2.npz", x_train=X[6:], y_train=Y[6:] % 3, classes=np.array(second))
    return d


def _write(p: Path, data: bytes) -> Path:
    p.write_bytes(data)
    return p


def _npy_as_npz(t: Path) -> Path:
    p = t / "x.npz"
    with open(p, "wb") as f:
        np.save(f, X)
    return p


@pytest.mark.parametrize("case", DATASET_CASES, ids=[c[0] for c in DATASET_CASES])
def test_hostile_dataset_is_refused_with_a_clear_message(tmp_path: Path, case):
    _, build, fragment = case
    path = build(tmp_path)
    with pytest.raises(DatasetError) as e:
        load_dataset(path)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg
    assert str(path) in msg or str(path.parent) in msg or path.name in msg  # the message names the file



# ---- property-based fuzzing of the two readers -------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _check_read(p: Path) -> None:
    """The reader's contract: a (16, 16, 3) uint8 array, or OSError/ValueError; nothing else escapes."""
    try:
        a = read_image(p, 16, 3)
    except (OSError, ValueError):
        return
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8


@_FUZZ
@given(data=st.binary(max_size=2048), ext=st.sampled_from([".png", ".jpg", ".gif", ".bmp", ".webp", ".tif"]))
def test_fuzz_image_reader_on_arbitrary_bytes(tmp_path: Path, data: bytes, ext: str):
    p = tmp_path / f"f{ext}"
    p.write_bytes(data)
    _check_read(p)


@_FUZZ
@given(
    base=st.sampled_from([GOOD_PNG, GOOD_JPEG, _animated_gif(), _bmp_bytes(), _webp_bytes(), _tiff_bytes()]),
    edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    cut=st.integers(8, 10_000),
)
def test_fuzz_image_reader_on_mutated_images(tmp_path: Path, base: bytes, edits, cut: int):
    b = bytearray(base[:cut])
    for pos, val in edits:
        if b:
            b[pos % len(b)] = val
    p = tmp_path / "m.img"
    p.write_bytes(bytes(b))
    _check_read(p)


_DTYPES = [np.uint8, np.int8, np.int64, np.float32, np.bool_, np.uint16]


@_FUZZ
@given(
    xshape=st.lists(st.integers(0, 5), min_size=0, max_size=5),
    xdtype=st.sampled_from(_DTYPES),
    yshape=st.lists(st.integers(0, 5), min_size=0, max_size=2),
    ydtype=st.sampled_from(_DTYPES),
    extra=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_fuzz_npz_reader(tmp_path: Path, xshape, xdtype, yshape, ydtype, extra: bool, seed: int):
    rng = np.random.default_rng(seed)
    arrays = {
        "x_train": (rng.integers(0, 256, size=xshape) if xshape else np.array(rng.integers(0, 256))).astype(xdtype),
        "y_train": (rng.integers(-1, 4, size=yshape) if yshape else np.array(1)).astype(ydtype),
    }
    if extra:
        arrays["classes"] = np.array(["a", "b", "c"])
    p = tmp_path / "fuzz.npz"
    np.savez(p, **arrays)
    try:
        ds = load_dataset(p)
    except DatasetError as e:
        assert "\n" not in str(e)
        return
    assert len(ds.train) == len(ds.train.y) and ds.train.x.dtype.is_floating_point is False
