"""Build the packaged demo dataset: a stratified CIFAR-10 subset as lossless WebP images in one tar.

    python tools/make_demo.py [--data ../shared/data/cifar10] [--train 500] [--test 100]

Writes src/bonsai/data/demo/cifar10_demo.tar.gz with train/<class>/NNNNN.webp and test/<class>/NNNNN.webp
(per-class counts as given, drawn with seed 0). Lossless WebP keeps the pixels exact at about 1.6 kB per image.
"""

from __future__ import annotations

import argparse
import glob
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/cifar10")
    ap.add_argument("--train", type=int, default=500, help="training images per class")
    ap.add_argument("--test", type=int, default=100, help="test images per class")
    ap.add_argument("--out", default="src/bonsai/data/demo/cifar10_demo.tar.gz")
    args = ap.parse_args()
    files = sorted(glob.glob(f"{args.data}/*.npz"))
    if not files:
        raise SystemExit(f"{args.data}: no .npz files (see ../shared/data/README.md)")
    parts = [np.load(f) for f in files]
    cat = lambda k: np.concatenate([p[k] for p in parts if p[k].size])  # noqa: E731
    classes = [str(c) for c in parts[0]["classes"]]
    rng = np.random.default_rng(0)
    with tarfile.open(args.out, "w:gz", compresslevel=9) as tar:
        for split, per_class in (("train", args.train), ("test", args.test)):
            x, y = cat(f"x_{split}"), cat(f"y_{split}")
            for c, name in enumerate(classes):
                for i in np.sort(rng.permutation(np.flatnonzero(y == c))[:per_class]):
                    buf = io.BytesIO()
                    Image.fromarray(x[i]).save(buf, "WEBP", lossless=True, quality=100, method=6)
                    info = tarfile.TarInfo(f"{split}/{name}/{i:05d}.webp")
                    info.size = buf.tell()
                    info.mtime = 0
                    buf.seek(0)
                    tar.addfile(info, buf)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
