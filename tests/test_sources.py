"""Reading datasets: every layout, the conversion rules, and every bad-input case."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bonsai.data.sources import load_dataset, read_image, split_validation
from bonsai.errors import DatasetError
from conftest import CLASSES, make_images, write_folder


def test_image_folder_with_unlabeled_test(folder_data: Path):
    ds = load_dataset(folder_data)
    assert ds.kind == "folder"
    assert ds.classes == CLASSES
    assert len(ds.train) == 24 and ds.class_counts() == [8, 8, 8]
    assert ds.channels == 3 and ds.image_size == 16
    assert ds.train.x.shape == (24, 3, 16, 16) and ds.train.x.dtype == torch.uint8
    assert ds.test is not None and ds.test.y is None and len(ds.test) == 9
    assert ds.test.names == sorted(ds.test.names)  # stable documented order
    assert ds.test.names[0] == "cat_008.png"


def test_image_folder_labeled_test_and_pixels_exact(tmp_path: Path):
    root = write_folder(tmp_path / "d", labeled_test=True)
    ds = load_dataset(root)
    assert ds.test.y is not None and ds.test.y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    # PNG is lossless and the size is unchanged, so the tensor holds the file's exact pixels
    first = np.asarray(Image.open(root / "train" / "cat" / "000.png")).transpose(2, 0, 1).copy()
    assert torch.equal(ds.train.x[0], torch.from_numpy(first))


def test_mean_std_match_numpy(folder_data: Path):
    ds = load_dataset(folder_data)
    x = ds.train.x.numpy().astype(np.float64)
    np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(ds.std, x.std(axis=(0, 2, 3)), rtol=1e-5)


def test_csv_layout(tmp_path: Path):
    x, y = make_images(6)
    img = tmp_path / "d" / "images"
    img.mkdir(parents=True)
    with open(tmp_path / "d" / "train.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filename", "label"])
        for i, (a, lab) in enumerate(zip(x, y)):
            Image.fromarray(a).save(img / f"{i}.png")
            w.writerow([f"images/{i}.png", CLASSES[lab]])
    ds = load_dataset(tmp_path / "d")
    assert ds.kind == "csv" and ds.classes == CLASSES and len(ds.train) == 18
    # also when the CSV itself is given
    assert len(load_dataset(tmp_path / "d" / "train.csv").train) == 18


def test_csv_missing_files_is_an_error(tmp_path: Path):
    (tmp_path / "train.csv").write_text("filename,label\na.png,x\nb.png,y\n")
    with pytest.raises(DatasetError, match=r"train.csv: names 2 missing file\(s\): a.png, b.png"):
        load_dataset(tmp_path)


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd"])
def test_csv_path_outside_dataset_refused(tmp_path: Path, name: str):
    d = tmp_path / "d"
    d.mkdir()
    Image.fromarray(make_images(1)[0][0]).save(tmp_path / "outside.png")
    (d / "labels.csv").write_text(f"filename,label\n{name},x\n")
    with pytest.raises(DatasetError, match="outside the dataset folder"):
        load_dataset(d)


def test_csv_without_header_columns(tmp_path: Path):
    (tmp_path / "train.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(DatasetError, match="header must name a file column"):
        load_dataset(tmp_path)


def test_npz_with_test_and_classes(npz_data: Path):
    ds = load_dataset(npz_data)
    assert ds.kind == "npz" and ds.classes == CLASSES
    assert len(ds.train) == 60 and len(ds.test) == 15 and ds.test.y is not None
    assert ds.test.names[:3] == ["0", "1", "2"]


def test_npz_grey_nhw_and_sparse_labels(tmp_path: Path):
    x, y = make_images(5, channels=1)
    path = tmp_path / "g.npz"
    np.savez(path, x_train=x[..., 0], y_train=y * 3 + 1)  # labels 1, 4, 7
    ds = load_dataset(path)
    assert ds.channels == 1 and ds.classes == ["1", "4", "7"]
    assert ds.train.y.tolist() == [0] * 5 + [1] * 5 + [2] * 5
    assert ds.test is None


def test_npz_parts_concatenate_in_name_order(tmp_path: Path):
    x, y = make_images(10)
    d = tmp_path / "parts"
    d.mkdir()
    empty = np.zeros((0, 16, 16, 3), np.uint8)
    np.savez(d / "set_part1of2.npz", x_train=x[:20], y_train=y[:20], x_test=empty, y_test=np.zeros(0, np.int64))
    np.savez(d / "set_part2of2.npz", x_train=x[20:], y_train=y[20:], x_test=x[:4], y_test=y[:4])
    ds = load_dataset(d)
    assert len(ds.train) == 30 and len(ds.test) == 4
    assert torch.equal(ds.train.x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))
    (d / "set_part2of2.npz").unlink()
    with pytest.raises(DatasetError, match="incomplete"):
        load_dataset(d)


def test_npz_object_array_refused_without_pickle(tmp_path: Path):
    path = tmp_path / "obj.npz"
    np.savez(path, x_train=np.array([object()] * 3, dtype=object), y_train=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match="object arrays"):
        load_dataset(path)


def test_npz_wrong_dtype_refused(tmp_path: Path):
    path = tmp_path / "f.npz"
    np.savez(path, x_train=np.zeros((4, 8, 8, 3), np.float32), y_train=np.array([0, 1, 0, 1]))
    with pytest.raises(DatasetError, match="must be uint8"):
        load_dataset(path)


def test_resize_rule_median_shorter_side_and_cap(tmp_path: Path):
    root = tmp_path / "d"
    for c, sizes in (("a", [(20, 30), (24, 24), (40, 24)]), ("b", [(24, 50), (30, 30), (24, 24)])):
        (root / "train" / c).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            Image.new("RGB", (w, h), (i * 40, 10, 200)).save(root / "train" / c / f"{i}.png")
    ds = load_dataset(root)
    assert ds.image_size == 24  # median of shorter sides [20, 24, 24, 24, 30, 24]
    assert ds.train.x.shape == (6, 3, 24, 24)
    assert load_dataset(root, max_image_size=16).image_size == 16
    assert load_dataset(root, image_size=12).train.x.shape[-1] == 12


def test_mode_conversions(tmp_path: Path):
    rgba = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # fully transparent: composited onto white
    rgba.save(tmp_path / "rgba.png")
    assert read_image(tmp_path / "rgba.png", 8, 3)[0, 0].tolist() == [255, 255, 255]
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg")
    r, g, b = read_image(tmp_path / "cmyk.jpg", 8, 3)[4, 4].tolist()
    assert r > 200 and g < 60 and b < 60  # cyan=0, magenta/yellow full: red
    grey16 = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    grey16.save(tmp_path / "g16.png")
    assert read_image(tmp_path / "g16.png", 8, 1).max() == 255
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    pal.save(tmp_path / "p.gif")
    assert read_image(tmp_path / "p.gif", 8, 3)[0, 0].tolist() == [0, 255, 0]
    assert read_image(tmp_path / "p.gif", 8, 1).shape == (8, 8, 1)


def test_all_grey_images_give_one_channel(tmp_path: Path):
    x, y = make_images(4, channels=1)
    for i, (a, lab) in enumerate(zip(x, y)):
        (tmp_path / "train" / CLASSES[lab]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(a[..., 0], "L").save(tmp_path / "train" / CLASSES[lab] / f"{i}.png")
    ds = load_dataset(tmp_path)
    assert ds.channels == 1 and ds.train.x.shape[1] == 1


def test_broken_images_skipped_with_counted_warning(folder_data: Path, caplog):
    (folder_data / "train" / "cat" / "zero.png").write_bytes(b"")
    data = (folder_data / "train" / "dog" / "000.png").read_bytes()
    (folder_data / "train" / "dog" / "trunc.png").write_bytes(data[: len(data) // 2])
    ds = load_dataset(folder_data, max_bad_fraction=0.2)
    assert len(ds.train) == 24 and len(ds.skipped) == 2
    assert "skipped 2 unreadable image file(s)" in caplog.text and "zero.png" in caplog.text


def test_too_many_broken_images_is_an_error(folder_data: Path):
    for i in range(4):
        (folder_data / "train" / "cat" / f"bad{i}.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"4 of 28 training image files are unreadable"):
        load_dataset(folder_data)


def test_empty_dataset(tmp_path: Path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no training images"):
        load_dataset(tmp_path)


def test_single_class(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    for c in CLASSES[1:]:
        for f in (root / "train" / c).iterdir():
            f.unlink()
    with pytest.raises(DatasetError, match="only one class"):
        load_dataset(root)


def test_missing_path_and_unknown_layout(tmp_path: Path):
    with pytest.raises(DatasetError, match="no such file or folder"):
        load_dataset(tmp_path / "nope")
    (tmp_path / "x").mkdir()
    with pytest.raises(DatasetError, match="no dataset found"):
        load_dataset(tmp_path / "x")


def test_streaming_path_reads_the_same_pixels(folder_data: Path, monkeypatch):
    import bonsai.data.sources as sources

    mem = load_dataset(folder_data, in_memory="yes")
    calls = []
    real = sources.read_image
    monkeypatch.setattr(sources, "read_image", lambda *a: calls.append(a[0]) or real(*a))
    stream = load_dataset(folder_data, in_memory="no")
    assert len(calls) == len(set(calls)), "a file was decoded twice while loading"
    assert stream.train.x is None and len(stream.train.files) == 24
    assert mem.mean == pytest.approx(stream.mean) and mem.std == pytest.approx(stream.std)
    assert "streaming" in stream.describe()


@pytest.mark.parametrize("workers", [0, 1])
def test_a_streamed_file_that_breaks_after_loading_is_one_error_naming_it(folder_data: Path, workers: int):
    from bonsai.data.loader import Loader

    stream = load_dataset(folder_data, in_memory="no")
    broken = stream.train.files[5]
    broken.write_bytes(b"not an image any more")
    loader = Loader(stream.train, 8, torch.device("cpu"), size=16, channels=3, workers=workers)
    with pytest.raises(DatasetError, match="unreadable now") as e:
        for _ in loader.batches():
            pass
    assert str(broken) in str(e.value) and "--resume" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_test_images_count_against_the_test_split_alone(folder_data: Path):
    # 1 bad file of 10 test files is 10% > 5%, though only 1 of 34 files (3%) in all
    (folder_data / "test" / "bad.png").write_text("not an image")
    with pytest.raises(DatasetError, match=r"1 of 10 test image files are unreadable"):
        load_dataset(folder_data)
    assert len(load_dataset(folder_data, max_bad_fraction=0.1).test) == 9


def test_a_folder_that_cannot_be_listed_is_an_error_not_a_silent_gap(folder_data: Path, monkeypatch):
    import os

    real = os.scandir
    dog = folder_data / "train" / "dog"

    def scandir(path=".", *a):
        if Path(path) == dog:
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, *a)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DatasetError, match="cannot list this folder") as e:
        load_dataset(folder_data)
    assert str(dog) in str(e.value)


def test_float_images_with_non_finite_pixels_are_skipped(tmp_path: Path):
    root = write_folder(tmp_path / "d")
    Image.fromarray(np.full((16, 16), 100.0, np.float32), "F").save(root / "train" / "cat" / "float.tif")
    Image.fromarray(np.full((16, 16), np.nan, np.float32), "F").save(root / "train" / "cat" / "nan.tif")
    assert read_image(root / "train" / "cat" / "float.tif", 16, 1).max() == 100  # a finite float image reads as is
    ds = load_dataset(root, max_bad_fraction=0.1)
    assert [(Path(f).name, "non-finite" in why) for f, why in ds.skipped] == [("nan.tif", True)]


def test_stratified_split_is_seeded_and_keeps_every_class():
    y = torch.tensor([0] * 50 + [1] * 30 + [2] * 1)
    tr, va = split_validation(y, 0.1, seed=3)
    assert sorted(np.bincount(y[va].numpy(), minlength=3).tolist()) == [0, 3, 5]
    assert 80 in tr  # the one-image class stays in training
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 81
    tr2, va2 = split_validation(y, 0.1, seed=3)
    assert np.array_equal(va, va2)
    assert not np.array_equal(va, split_validation(y, 0.1, seed=4)[1])


def test_a_capped_holdout_keeps_its_strata_and_trains_the_rest():
    y = torch.tensor([0] * 600 + [1] * 300 + [2] * 100)
    tr, va = split_validation(y, 0.1, seed=3, max_images=50)
    assert np.bincount(y[va].numpy(), minlength=3).tolist() == [30, 15, 5]  # 5% of each class instead of 10%
    assert set(tr).isdisjoint(va) and len(tr) + len(va) == 1000
    assert np.array_equal(va, split_validation(y, 0.05, seed=3)[1])  # the same as asking for 5%
    # a cap above the fraction's holdout changes nothing
    assert np.array_equal(split_validation(y, 0.1, seed=3)[1], split_validation(y, 0.1, seed=3, max_images=500)[1])


def test_npz_parts_sorted_by_part_number_not_text(tmp_path: Path):
    x, y = make_images(4)  # 12 images
    d = tmp_path / "p"
    d.mkdir()
    for k in range(1, 11):  # part10of10 sorts before part2of10 as text
        sl = slice(k - 1, k) if k < 10 else slice(9, 12)
        np.savez(d / f"s_part{k}of10.npz", x_train=x[sl], y_train=y[sl])
    ds = load_dataset(d)
    assert torch.equal(ds.train.x, torch.from_numpy(x.transpose(0, 3, 1, 2).copy()))


def test_npz_test_labels_outside_classes_refused(tmp_path: Path):
    x, y = make_images(3)
    np.savez(tmp_path / "t.npz", x_train=x, y_train=y, x_test=x[:2], y_test=np.array([5, -1]), classes=np.array(CLASSES))
    with pytest.raises(DatasetError, match="y_test holds labels outside 0..2"):
        load_dataset(tmp_path / "t.npz")


def test_npy_renamed_to_npz_refused(tmp_path: Path):
    np.save(tmp_path / "a.npy", np.zeros(3))
    (tmp_path / "a.npy").rename(tmp_path / "a.npz")
    with pytest.raises(DatasetError, match="not an .npz archive"):
        load_dataset(tmp_path / "a.npz")


def test_numeric_class_names_sort_numerically_and_deterministically(tmp_path: Path):
    x, _ = make_images(1, n_classes=3)
    for name, a in zip(["10", "2", "02"], x):
        (tmp_path / "train" / name).mkdir(parents=True)
        Image.fromarray(a).save(tmp_path / "train" / name / "a.png")
    assert load_dataset(tmp_path).classes == ["02", "2", "10"]
