"""Grain transforms of the training and test pipelines (SPEC 4, 5.4, 7.1), numpy/PIL only.

Order per training example: Decode -> RandomRescale -> RandomCrop -> RandomFlip ->
PhotoMetricDistortion -> Normalize -> Pad -> FillSingleLabel -> (image, label). Images stay uint8
RGB until Normalize (mmseg works on uint8 BGR; every op here is channel-order free except HSV,
which is written for RGB). Labels are int32 local class ids with IGNORE = -1 throughout.
All classes are module-level and picklable (grain workers are spawned processes).
"""

from collections.abc import Sequence

import grain
import numpy as np

from larvseg_jax.errors import DataError
from larvseg_jax.vocab import IGNORE

MEAN = np.array([123.675, 116.28, 103.53], np.float32)  # ImageNet RGB (SPEC 4 step 6)
STD = np.array([58.395, 57.12, 57.375], np.float32)


def rescale_size(h: int, w: int, scale: tuple[float, float]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio size: the largest (h', w') within scale=(long, short) edges.

    Returns (new_h, new_w), rounded half up like mmcv (int(x + 0.5)).
    """
    long_edge, short_edge = max(scale), min(scale)
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def bilinear_taps(n_out: int, n_in: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower source index, upper source index, float32 weight of the upper) per output pixel
    of a half-pixel-centred linear resize of one axis (cv2.INTER_LINEAR without antialiasing)."""
    src = (np.arange(n_out, dtype=np.float32) + 0.5) * (n_in / n_out) - 0.5
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def resize_bilinear(image: np.ndarray, new_h: int, new_w: int, xp=np) -> np.ndarray:
    """cv2.INTER_LINEAR-style resize (half-pixel centres, no antialiasing) of [H, W, C] uint8.

    `xp=jax.numpy` traces the same arithmetic into a jax program (the export), returning the
    uint8 values as float32.
    """
    h, w = image.shape[:2]
    if (h, w) == (new_h, new_w):
        return image if xp is np else image.astype(xp.float32)
    y0, y1, wy = bilinear_taps(new_h, h)
    x0, x1, wx = bilinear_taps(new_w, w)
    img = image.astype(xp.float32)
    top = img[y0] * (1 - wy)[:, None, None] + img[y1] * wy[:, None, None]
    out = top[:, x0] * (1 - wx)[None, :, None] + top[:, x1] * wx[None, :, None]
    out = xp.clip(xp.rint(out), 0, 255)
    return out.astype(np.uint8) if xp is np else out


def resize_nearest(label: np.ndarray, new_h: int, new_w: int) -> np.ndarray:
    """cv2.INTER_NEAREST resize of a [H, W] label map (source index floor(i * H / H'))."""
    h, w = label.shape[:2]
    ys = np.minimum((np.arange(new_h) * (h / new_h)).astype(np.int64), h - 1)
    xs = np.minimum((np.arange(new_w) * (w / new_w)).astype(np.int64), w - 1)
    return label[ys][:, xs]


class Decode(grain.transforms.Map):
    """Record -> {"image": uint8 [H, W, 3], "label": int32 [H, W], "class_id": int32, "id": str}.

    Every ignore code of the source becomes IGNORE; an id >= num_classes that is not an ignore
    code raises a DataError naming the record. For kind "single" the label map is all IGNORE
    (FillSingleLabel writes the class after the geometric transforms) and class_id holds the
    class; otherwise class_id is -1.
    """

    def __init__(self, name: str, num_classes: int, ignore_codes: Sequence[int] = (255,)):
        self.name = name
        self.num_classes = num_classes
        self.ignore_codes = tuple(int(c) for c in ignore_codes)

    def map(self, record: dict) -> dict:
        image = np.asarray(record["image"])
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
        image_id = record.get("image_id", b"")
        image_id = image_id.decode() if isinstance(image_id, bytes) else str(image_id)
        h, w = image.shape[:2]
        if "class_id" in record:
            class_id = int(record["class_id"])
            if not 0 <= class_id < self.num_classes:
                raise DataError(
                    f"{self.name} record {image_id!r}: class id {class_id} is outside "
                    f"0..{self.num_classes - 1}"
                )
            label = np.full((h, w), IGNORE, np.int32)
        else:
            class_id = -1
            raw = np.asarray(record["label"])
            if raw.shape[:2] != (h, w) or raw.size != h * w:
                raise DataError(
                    f"{self.name} record {image_id!r}: its label map is "
                    f"{'x'.join(map(str, raw.shape[:2]))} but its image is {h}x{w}; re-run the "
                    "converter (it rejects such pairs) or fix the record's label"
                )
            raw = raw.reshape(h, w).astype(np.int64)
            ignore = np.isin(raw, self.ignore_codes) | (raw < 0)
            bad = (raw >= self.num_classes) & ~ignore
            if bad.any():
                raise DataError(
                    f"{self.name} record {image_id!r}: label id {int(raw[bad].max())} is out of "
                    f"range for {self.num_classes} classes (ignore codes {self.ignore_codes})"
                )
            label = np.where(ignore, IGNORE, raw).astype(np.int32)
        return {"image": image, "label": label, "class_id": np.int32(class_id), "id": image_id}


class RandomRescale(grain.transforms.RandomMap):
    """mmseg Resize with ratio_range and keep_ratio (SPEC 4 step 2); label nearest.

    r ~ U[lo, hi); target = (int(long * r), int(short * r)); then `rescale_size`.
    """

    def __init__(self, img_scale: tuple[int, int], ratio_range: tuple[float, float]):
        self.img_scale = tuple(img_scale)
        self.ratio_range = tuple(ratio_range)

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        lo, hi = self.ratio_range
        r = rng.random() * (hi - lo) + lo
        target = (int(self.img_scale[0] * r), int(self.img_scale[1] * r))
        h, w = ex["image"].shape[:2]
        new_h, new_w = rescale_size(h, w, target)
        return ex | {
            "image": resize_bilinear(ex["image"], new_h, new_w),
            "label": resize_nearest(ex["label"], new_h, new_w),
        }


class RandomCrop(grain.transforms.RandomMap):
    """mmseg RandomCrop with cat_max_ratio (SPEC 4 step 3).

    Up to 10 re-draws while the crop has fewer than two non-ignored classes or its largest class
    covers >= cat_max_ratio of the non-ignored pixels; the last draw is kept. Offsets are 0 along
    a side shorter than the crop (Pad fills it later).
    """

    def __init__(self, crop: int, cat_max_ratio: float = 0.75):
        self.crop = int(crop)
        self.cat_max_ratio = float(cat_max_ratio)

    def _box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int]:
        return int(rng.integers(0, max(h - self.crop, 0) + 1)), int(
            rng.integers(0, max(w - self.crop, 0) + 1)
        )

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        h, w = ex["image"].shape[:2]
        c = self.crop
        y, x = self._box(h, w, rng)
        label = ex["label"]
        if self.cat_max_ratio < 1.0 and (label != IGNORE).any():
            for _ in range(10):
                crop = label[y : y + c, x : x + c]
                _, cnt = np.unique(crop[crop != IGNORE], return_counts=True)
                if len(cnt) > 1 and cnt.max() / cnt.sum() < self.cat_max_ratio:
                    break
                y, x = self._box(h, w, rng)
        return ex | {
            "image": ex["image"][y : y + c, x : x + c],
            "label": label[y : y + c, x : x + c],
        }


class RandomFlip(grain.transforms.RandomMap):
    """Horizontal flip of image and label together with probability p (SPEC 4 step 4)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        if rng.random() >= self.p:
            return ex
        return ex | {"image": ex["image"][:, ::-1], "label": ex["label"][:, ::-1]}


def rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float HSV like OpenCV's 8-bit: H in [0, 180), S and V in [0, 255]."""
    rgb = image.astype(np.float32)
    v = rgb.max(-1)
    delta = v - rgb.min(-1)
    s = np.where(v > 0, delta / np.maximum(v, 1e-6) * 255.0, 0.0)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    d = np.maximum(delta, 1e-6)
    h = np.where(v == r, (g - b) / d, np.where(v == g, 2.0 + (b - r) / d, 4.0 + (r - g) / d))
    h = np.where(delta > 0, (h * 60.0) % 360.0, 0.0) / 2.0
    return np.stack([h, s, v], -1)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """Inverse of rgb_to_hsv; returns uint8 RGB."""
    h = (hsv[..., 0] * 2.0 % 360.0) / 60.0
    s = hsv[..., 1] / 255.0
    v = hsv[..., 2]
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    m = v - c
    z = np.zeros_like(c)
    sector = np.floor(h).astype(np.int64) % 6
    choices = [(c, x, z), (x, c, z), (z, c, x), (z, x, c), (x, z, c), (c, z, x)]
    rgb = np.zeros(hsv.shape, np.float32)
    for k, (r, g, b) in enumerate(choices):
        sel = sector == k
        rgb[sel] = np.stack([r[sel], g[sel], b[sel]], -1)
    return np.clip(np.rint(rgb + m[..., None]), 0, 255).astype(np.uint8)


def _convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


class PhotoMetricDistortion(grain.transforms.RandomMap):
    """mmseg PhotoMetricDistortion with its defaults (SPEC 4 step 5), on uint8 RGB.

    brightness +-32, contrast x[0.5, 1.5] (first or last, random), saturation x[0.5, 1.5],
    hue +-18 (of 180); each applied with p = 0.5; clipped to [0, 255] after each.
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def random_map(self, ex: dict, rng: np.random.Generator) -> dict:
        if not self.enabled:
            return ex
        img = ex["image"]
        if rng.integers(2):
            img = _convert(img, beta=rng.uniform(-32, 32))
        contrast_first = rng.integers(2) == 1
        if contrast_first and rng.integers(2):
            img = _convert(img, alpha=rng.uniform(0.5, 1.5))
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 1] = _convert(np.rint(hsv[..., 1]), alpha=rng.uniform(0.5, 1.5))
            img = hsv_to_rgb(hsv)
        if rng.integers(2):
            hsv = rgb_to_hsv(img)
            hsv[..., 0] = (np.rint(hsv[..., 0]).astype(np.int64) + rng.integers(-18, 18)) % 180
            img = hsv_to_rgb(hsv)
        if not contrast_first and rng.integers(2):
            img = _convert(img, alpha=rng.uniform(0.5, 1.5))
        return ex | {"image": img}


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [..., 3] -> float32 (x - MEAN) / STD."""
    return (image.astype(np.float32) - MEAN) / STD


class Normalize(grain.transforms.Map):
    def map(self, ex: dict) -> dict:
        return ex | {"image": normalize(ex["image"])}


class Pad(grain.transforms.Map):
    """Pads bottom/right to crop x crop: image 0 (the mean colour after Normalize), label IGNORE."""

    def __init__(self, crop: int):
        self.crop = int(crop)

    def map(self, ex: dict) -> dict:
        h, w = ex["label"].shape
        ph, pw = self.crop - h, self.crop - w
        if ph < 0 or pw < 0:
            raise ValueError(f"Pad: example {h}x{w} is larger than the crop {self.crop}")
        image = np.pad(ex["image"], ((0, ph), (0, pw), (0, 0)))
        label = np.pad(ex["label"], ((0, ph), (0, pw)), constant_values=IGNORE)
        return ex | {"image": image, "label": label}


class FillSingleLabel(grain.transforms.Map):
    """Single-label sources: label = the image's class everywhere, padding included (SPEC 5.4)."""

    def map(self, ex: dict) -> dict:
        if int(ex["class_id"]) < 0:
            return ex
        return ex | {"label": np.full(ex["label"].shape, int(ex["class_id"]), np.int32)}


class TrainOutput(grain.transforms.Map):
    """Keeps what the trainer reads: {"image": float32 [c, c, 3], "label": int32 [c, c]}."""

    def map(self, ex: dict) -> dict:
        return {
            "image": np.ascontiguousarray(ex["image"], np.float32),
            "label": np.ascontiguousarray(ex["label"], np.int32),
        }


class EvalResize(grain.transforms.Map):
    """Test pipeline (SPEC 7.1): image resized (keep ratio) so its short side is short_side with
    the long side capped at 4 * short_side, then normalised; the label keeps the original size.

    Returns {"image": float32 [H, W, 3], "label": int32 [H0, W0], "raw": uint8 [H0, W0, 3],
    "id": str}.
    """

    def __init__(self, short_side: int):
        self.short_side = int(short_side)

    def map(self, ex: dict) -> dict:
        h, w = ex["image"].shape[:2]
        new_h, new_w = rescale_size(h, w, (4 * self.short_side, self.short_side))
        image = resize_bilinear(ex["image"], new_h, new_w)
        label = ex["label"]
        if int(ex["class_id"]) >= 0:
            label = np.full(label.shape, int(ex["class_id"]), np.int32)
        return {"image": normalize(image), "label": label, "raw": ex["image"], "id": ex["id"]}
