"""Conversion speed and disk cost of a prepared dataset, on an ADE20K-like download.

Builds a download in ADEChallengeData2016's layout from the real photographs in
tests/fixtures/images (random crops and flips resized to 640x480, JPEG quality 90, like ADE's
~680x510 JPEGs; the two grayscale ones are kept grayscale, so the converter re-encodes them) with
uint8 PNG label maps of rectangular regions, converts it with data_prep (ADE20K-150 converter)
at each worker count, and prints one JSON line per worker count and one for disk use:
images/s, bytes of the download and of the records per 1k images.

    python benchmarks/prepare_cost.py --images 400 --workers 1,2
"""

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

from data_prep import ade20k, convert
from larvseg_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = (640, 480)  # W, H


def _label(rng: np.random.Generator) -> np.ndarray:
    label = np.zeros(SIZE[::-1], np.uint8)
    for _ in range(12):  # nested rectangles: a scene-like map of a dozen regions
        y, x = rng.integers(0, SIZE[1] - 40), rng.integers(0, SIZE[0] - 40)
        h, w = rng.integers(40, SIZE[1] - y + 1), rng.integers(40, SIZE[0] - x + 1)
        label[y : y + h, x : x + w] = rng.integers(0, 151)
    return label


def make_download(root: str, n: int, seed: int = 0) -> str:
    photos = [Image.open(p) for p in sorted(glob.glob(f"{REPO}/tests/fixtures/images/*"))]
    rng = np.random.default_rng(seed)
    ade = os.path.join(root, "ADEChallengeData2016")
    for subdir, count in (("training", n), ("validation", max(1, n // 10))):
        os.makedirs(os.path.join(ade, "images", subdir))
        os.makedirs(os.path.join(ade, "annotations", subdir))
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = photo.size
            s = rng.uniform(0.6, 1.0)
            cw, ch = int(w * s), int(h * s)
            x, y = rng.integers(0, w - cw + 1), rng.integers(0, h - ch + 1)
            image = photo.crop((x, y, x + cw, y + ch)).resize(SIZE, Image.BILINEAR)
            if rng.random() < 0.5:
                image = image.transpose(Image.FLIP_LEFT_RIGHT)
            stem = f"ADE_{subdir}_{i:08d}"
            image.save(os.path.join(ade, "images", subdir, stem + ".jpg"), quality=90)
            Image.fromarray(_label(rng)).save(
                os.path.join(ade, "annotations", subdir, stem + ".png")
            )
    return ade


def tree_bytes(path: str, include=lambda name: True) -> int:
    seen, total = set(), 0
    for folder, _, names in os.walk(path):
        for name in names:
            st = os.stat(os.path.join(folder, name))
            if include(name) and st.st_ino not in seen:  # hard-linked aliases count once
                seen.add(st.st_ino)
                total += st.st_size
    return total


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--images", type=int, default=400, help="training images to generate")
    p.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    p.add_argument("--out", default="", help="also write the JSON lines to this file")
    args = p.parse_args()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        ade = make_download(os.path.join(tmp, "src"), args.images)
        n = args.images + max(1, args.images // 10)
        for workers in (int(w) for w in args.workers.split(",")):
            out = os.path.join(tmp, f"out{workers}")
            start = time.perf_counter()
            convert.convert_all(ade20k.jobs(ade), out, workers=workers, shard_size=100)
            seconds = time.perf_counter() - start
            lines.append(
                {
                    "name": "convert_ade20k",
                    "workers": workers,
                    "images": n,
                    "seconds": seconds,
                    "images_per_sec": n / seconds,
                    "images_per_sec_per_worker": n / seconds / workers,
                    "load_avg_1min": os.getloadavg()[0],
                }
            )
            print(json.dumps(lines[-1]), flush=True)
        records = tree_bytes(os.path.join(out, sources.ROOT), lambda name: ".array_record-" in name)
        download = tree_bytes(ade)
        lines.append(
            {
                "name": "disk_ade20k",
                "image_size": list(SIZE),
                "download_mb_per_1k_images": download / n / 1e3,
                "records_mb_per_1k_images": records / n / 1e3,
                "records_over_download": records / download,
            }
        )
        print(json.dumps(lines[-1]))
        shutil.rmtree(os.path.join(tmp, "src"))
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)


if __name__ == "__main__":
    main()
