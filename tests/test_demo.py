"""The packaged demo data: present, complete, balanced, and read as an ordinary image folder."""

from pathlib import Path

from bonsai.data.demo import extract_demo
from bonsai.data.sources import load_dataset


def test_demo_archive_extracts_to_a_balanced_cifar10_subset(tmp_path: Path):
    root = extract_demo(tmp_path / "demo")
    ds = load_dataset(root)
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.class_counts() == [500] * 10
    assert len(ds.test) == 1000 and ds.test.y is not None and ds.class_counts(ds.test) == [100] * 10
    assert ds.image_size == 32 and ds.channels == 3 and not ds.skipped
    assert extract_demo(tmp_path / "demo") == root  # a second call reuses the extracted copy
