"""Miniatures of the real datasets' on-disk layouts, for converter and end-to-end tests.

Each writer makes a few images per split in the dataset's exact folder layout and encoding
(JPEG photos, uint8 PNG / uint16 TIFF label maps, ImageNet synset folders) with real class ids
and wnids from the shipped class lists, plus the messy files real downloads contain: a grayscale
JPEG, a CMYK JPEG, a corrupt file, a non-image file. Labels are regions of a few classes over a
smooth picture, so a tiny model can learn something from them.
"""

import os

import numpy as np
from PIL import Image

from larvseg_jax.data import catalog

SIZE = (48, 64)  # H, W of every miniature image


def _picture(rng: np.random.Generator, size=SIZE) -> np.ndarray:
    h, w = size
    base = rng.integers(40, 215, size=3)
    ramp = np.linspace(-30, 30, w)[None, :, None]
    noise = rng.normal(0, 8, size=(h, w, 3))
    return np.clip(base + ramp + noise, 0, 255).astype(np.uint8)


def _regions(rng: np.random.Generator, ids, size=SIZE) -> np.ndarray:
    """A label map of vertical bands, one per id."""
    w = size[1]
    cuts = np.linspace(0, w, len(ids) + 1).astype(int)
    label = np.zeros(size, np.int64)
    for k, i in enumerate(ids):
        label[:, cuts[k] : cuts[k + 1]] = i
    return label


def _save_jpeg(path: str, pixels: np.ndarray, mode: str = "RGB") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    image = Image.fromarray(pixels)
    if mode == "L":
        image = image.convert("L")
    elif mode == "CMYK":
        image = image.convert("CMYK")
    image.save(path, format="JPEG", quality=90)


def _save_label(path: str, label: np.ndarray, dtype) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(label.astype(dtype)).save(path)


def _corrupt(path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 this is not really a JPEG")


def _modes(n: int) -> list[str]:
    """RGB except a grayscale and a CMYK JPEG among the first images."""
    return ["L", "CMYK"][:n] + ["RGB"] * max(0, n - 2)


def write_pairs(
    image_dir: str,
    label_dir: str,
    label_suffix: str,
    ids_per_image: list[list[int]],
    *,
    dtype,
    seed: int,
    messy: bool,
    image_ext: str = ".jpg",
    stem=lambda i: f"img_{i:05d}",
) -> None:
    """Image/label pairs; with `messy`, also a corrupt image (with label) and a text file."""
    rng = np.random.default_rng(seed)
    for i, (ids, mode) in enumerate(zip(ids_per_image, _modes(len(ids_per_image)))):
        _save_jpeg(os.path.join(image_dir, stem(i) + image_ext), _picture(rng), mode)
        _save_label(os.path.join(label_dir, stem(i) + label_suffix), _regions(rng, ids), dtype)
    if messy:
        bad = stem(len(ids_per_image))
        _corrupt(os.path.join(image_dir, bad + image_ext))
        _save_label(os.path.join(label_dir, bad + label_suffix), _regions(rng, [0]), dtype)
        with open(os.path.join(image_dir, "README.txt"), "w") as f:
            f.write("not an image\n")


def _cycle(values, n_images: int, per_image: int, offset: int = 0) -> list[list[int]]:
    values = list(values)
    return [
        [values[(offset + i * per_image + k) % len(values)] for k in range(per_image)]
        for i in range(n_images)
    ]


def ade20k(root: str, n_train: int = 6, n_val: int = 4, classes=range(1, 151)) -> str:
    """ADEChallengeData2016: labels 0 (other) .. 150."""
    root = os.path.join(root, "ADEChallengeData2016")
    for subdir, n, seed in (("training", n_train, 0), ("validation", n_val, 1)):
        write_pairs(
            os.path.join(root, "images", subdir),
            os.path.join(root, "annotations", subdir),
            ".png",
            _cycle(classes, n, 3, offset=seed),
            dtype=np.uint8,
            seed=seed,
            messy=subdir == "training",
            stem=lambda i, s=subdir: f"ADE_{'train' if s == 'training' else 'val'}_{i + 1:08d}",
        )
    return root


def coco_stuff(root: str, n_train: int = 6, n_val: int = 4, train_ids: bool = False) -> str:
    """coco_stuff164k: stuffthingmaps (COCO id - 1, 255 unlabelled) or *_labelTrainIds.png."""
    root = os.path.join(root, "coco_stuff164k")
    coco_ids = [int(k) for k in catalog.read_keys("c171.txt")]
    values = list(range(171)) if train_ids else [k - 1 for k in coco_ids]
    suffix = "_labelTrainIds.png" if train_ids else ".png"
    for subdir, n, seed in (("train2017", n_train, 2), ("val2017", n_val, 3)):
        write_pairs(
            os.path.join(root, "images", subdir),
            os.path.join(root, "annotations", subdir),
            suffix,
            _cycle(values + [255], n, 3, offset=seed),
            dtype=np.uint8,
            seed=seed,
            messy=subdir == "train2017",
            stem=lambda i: f"{i + 1:012d}",
        )
    return root


def ade20k_full(root: str, n_train: int = 6, n_val: int = 4, classes=range(847)) -> str:
    """ade20k_full ({train,val}/image/*.jpg, {train,val}/label/*.tif): uint16 0..846, 65535."""
    root = os.path.join(root, "ade20k_full")
    for subdir, n, seed in (("train", n_train, 4), ("val", n_val, 5)):
        write_pairs(
            os.path.join(root, subdir, "image"),
            os.path.join(root, subdir, "label"),
            ".tif",
            _cycle(list(classes) + [65535], n, 3, offset=seed),
            dtype=np.uint16,
            seed=seed,
            messy=subdir == "train",
            stem=lambda i, s=subdir: f"ADE_{s}_{i + 1:08d}",
        )
    return root


def imagenet(root: str, wnids, per_synset: int = 2, seed: int = 6) -> str:
    """fall11_whole/<wnid>/<wnid>_<n>.JPEG, with a grayscale and a CMYK JPEG and a corrupt one."""
    root = os.path.join(root, "fall11_whole")
    rng = np.random.default_rng(seed)
    modes = iter(_modes(len(wnids) * per_synset))
    for wnid in wnids:
        for n in range(per_synset):
            path = os.path.join(root, wnid, f"{wnid}_{n + 1}.JPEG")
            _save_jpeg(path, _picture(rng), next(modes))
    _corrupt(os.path.join(root, wnids[0], f"{wnids[0]}_{per_synset + 1}.JPEG"))
    return root
