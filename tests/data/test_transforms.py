"""Each training/test transform on small hand-made examples (SPEC 4, 5.4, 7.1)."""

import numpy as np
import pytest

from larvseg_jax.data import transforms
from larvseg_jax.vocab import IGNORE


def _example(h=20, w=30, label=None):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    label = np.zeros((h, w), np.int32) if label is None else label
    return {"image": image, "label": label, "class_id": np.int32(-1), "id": "x"}


def test_rescale_size_matches_mmcv_keep_ratio():
    assert transforms.rescale_size(512, 683, (2048, 512)) == (512, 683)
    assert transforms.rescale_size(100, 1000, (2048, 512)) == (205, 2048)  # long side caps
    assert transforms.rescale_size(3, 5, (10, 4)) == (4, 7)  # 6.67 -> 7 (half up)
    assert transforms.rescale_size(2, 3, (100, 5)) == (5, 8)  # 7.5 -> 8


@pytest.mark.parametrize("seed", range(5))
def test_random_rescale_keeps_ratio_within_range(seed):
    ex = _example(32, 48, np.arange(32 * 48, dtype=np.int32).reshape(32, 48) % 5)
    out = transforms.RandomRescale((4 * 64, 64), (0.5, 2.0)).random_map(
        ex, np.random.default_rng(seed)
    )
    h, w = out["image"].shape[:2]
    assert out["label"].shape == (h, w) and out["label"].dtype == np.int32
    assert 32 <= h <= 128 and abs(w / h - 1.5) < 0.05
    assert set(np.unique(out["label"])) <= set(range(5))  # nearest: no new ids


def bilinear_loop(image, new_h, new_w):
    """cv2.INTER_LINEAR by explicit loops: half-pixel centres, source clamped to the image."""
    h, w = image.shape[:2]

    def taps(i, n_in, n_out):
        src = min(max((i + 0.5) * n_in / n_out - 0.5, 0.0), n_in - 1)
        i0 = int(np.floor(src))
        return i0, min(i0 + 1, n_in - 1), src - i0

    out = np.zeros((new_h, new_w, image.shape[2]))
    img = image.astype(np.float64)
    for i in range(new_h):
        y0, y1, fy = taps(i, h, new_h)
        for j in range(new_w):
            x0, x1, fx = taps(j, w, new_w)
            top = (1 - fx) * img[y0, x0] + fx * img[y0, x1]
            out[i, j] = (1 - fy) * top + fy * ((1 - fx) * img[y1, x0] + fx * img[y1, x1])
    return out


@pytest.mark.parametrize("new_hw", [(13, 4), (23, 31), (7, 9)])
def test_resize_bilinear_matches_loop_reference(new_hw):
    image = np.random.default_rng(1).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    out = transforms.resize_bilinear(image, *new_hw)
    assert out.shape == (*new_hw, 3) and out.dtype == np.uint8
    want = bilinear_loop(image, *new_hw)
    np.testing.assert_allclose(out, want, atol=0.5 + 1e-3)  # rounded to uint8
    flat = np.full((7, 9, 3), 77, np.uint8)
    assert (transforms.resize_bilinear(flat, *new_hw) == 77).all()


def test_resize_nearest_picks_floor_source_index():
    label = np.array([[0, 1], [2, 3]], np.int32)
    up = transforms.resize_nearest(label, 4, 4)
    assert np.array_equal(up, np.kron(label, np.ones((2, 2), np.int32)))
    label = np.arange(5 * 7, dtype=np.int32).reshape(5, 7)
    down = transforms.resize_nearest(label, 3, 4)  # rows floor(i * 5 / 3), cols floor(j * 7 / 4)
    assert np.array_equal(down, label[[0, 1, 3]][:, [0, 1, 3, 5]])


def _crop_ok(crop, ratio=0.75):
    _, cnt = np.unique(crop[crop != IGNORE], return_counts=True)
    return len(cnt) > 1 and cnt.max() / cnt.sum() < ratio


def test_random_crop_redraws_dominated_crops():
    label = np.zeros((32, 128), np.int32)
    label[:, 100:] = 1  # only crops near the right edge mix two classes
    ex = _example(32, 128, label)
    with_rule = transforms.RandomCrop(32, 0.75)
    without = transforms.RandomCrop(32, 1.0)
    good = sum(
        _crop_ok(with_rule.random_map(ex, np.random.default_rng(s))["label"]) for s in range(40)
    )
    plain = sum(
        _crop_ok(without.random_map(ex, np.random.default_rng(s))["label"]) for s in range(40)
    )
    assert good >= 30 and plain <= 15
    out = with_rule.random_map(ex, np.random.default_rng(0))
    assert out["image"].shape == (32, 32, 3) and out["label"].shape == (32, 32)


def test_random_crop_of_a_small_image_keeps_it_whole():
    ex = _example(10, 20)
    out = transforms.RandomCrop(32, 0.75).random_map(ex, np.random.default_rng(0))
    assert np.array_equal(out["image"], ex["image"]) and out["label"].shape == (10, 20)


def test_flip_moves_image_and_label_together():
    ex = _example(4, 6, np.tile(np.arange(6, dtype=np.int32), (4, 1)))
    ex["image"][..., 0] = ex["label"]
    out = transforms.RandomFlip(p=1.0).random_map(ex, np.random.default_rng(0))
    assert np.array_equal(out["label"], ex["label"][:, ::-1])
    assert np.array_equal(out["image"][..., 0], out["label"])
    same = transforms.RandomFlip(p=0.0).random_map(ex, np.random.default_rng(0))
    assert same is ex


def test_normalize_and_pad_values():
    ex = _example(5, 7)
    out = transforms.Pad(8).map(transforms.Normalize().map(ex))
    assert out["image"].shape == (8, 8, 3) and out["image"].dtype == np.float32
    want = (ex["image"].astype(np.float64) - transforms.MEAN) / transforms.STD  # RGB order
    np.testing.assert_allclose(out["image"][:5, :7], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(transforms.MEAN, [123.675, 116.28, 103.53])
    np.testing.assert_allclose(transforms.STD, [58.395, 57.12, 57.375])
    assert (out["image"][5:] == 0).all() and (out["image"][:, 7:] == 0).all()
    assert (out["label"][5:] == IGNORE).all() and (out["label"][:5, :7] == 0).all()


def test_single_label_fills_every_pixel_including_padding():
    ex = _example(5, 7, np.full((5, 7), IGNORE, np.int32))
    ex["class_id"] = np.int32(3)
    out = transforms.FillSingleLabel().map(transforms.Pad(8).map(ex))
    assert (out["label"] == 3).all() and out["label"].shape == (8, 8)
    seg = transforms.FillSingleLabel().map(_example())
    assert (seg["label"] == 0).all()


def test_hsv_round_trip_and_photometric_shapes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    back = transforms.hsv_to_rgb(transforms.rgb_to_hsv(image))
    assert np.abs(back.astype(int) - image).max() <= 1
    red = transforms.rgb_to_hsv(np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]]], np.uint8))
    np.testing.assert_allclose(red[0, :, 0], [0, 60, 120])  # OpenCV 8-bit hue scale
    ex = _example(16, 16)
    ex["image"] = image
    outs = [
        transforms.PhotoMetricDistortion().random_map(ex, np.random.default_rng(s))["image"]
        for s in range(8)
    ]
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 6  # 5 ops, each with p = 0.5
    # Grey stays grey (saturation 0: the saturation and hue steps cannot tint it) and every step
    # is a monotone map of the intensity, so a grey ramp stays sorted.
    ex["image"] = np.repeat(np.arange(256, dtype=np.uint8).reshape(16, 16, 1), 3, axis=2)
    changed = 0
    for s in range(8):
        grey = transforms.PhotoMetricDistortion().random_map(ex, np.random.default_rng(s))["image"]
        assert (grey == grey[..., :1]).all()
        assert (np.diff(grey[..., 0].astype(int).ravel()) >= 0).all()
        changed += not np.array_equal(grey, ex["image"])
    assert changed >= 4  # brightness and contrast reach grey pixels too
    off = transforms.PhotoMetricDistortion(False).random_map(ex, np.random.default_rng(0))
    assert off is ex


def test_eval_resize_keeps_original_label():
    ex = _example(20, 30, np.ones((20, 30), np.int32))
    out = transforms.EvalResize(40).map(ex)
    assert out["image"].shape == (40, 60, 3) and out["label"].shape == (20, 30)
    assert out["raw"].shape == (20, 30, 3) and out["raw"].dtype == np.uint8
    wide = transforms.EvalResize(10).map(_example(10, 100))
    assert wide["image"].shape == (4, 40, 3)  # long side capped at 4 x short_side
