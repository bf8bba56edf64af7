"""Tests for slide inference, mIoU and the eval JSON (SPEC 7) against plain-numpy references."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import evaluate, slide_image, tiles, visualize
from tests import reference

N = 5
RATE = 4  # fake model: logits at 1/4 of the window, like a coarse feature grid
# The vocabulary, split and slide windows of the run_evaluation tests.
EVAL_ARGS = {
    "class_names": [f"c{k}" for k in range(N)],
    "base_names": ["c0", "c2"],
    "novel_names": ["c1", "c3", "c4"],
    "crop": 24,
    "stride": 16,
    "mode": "slide",
}
PROJ = np.random.default_rng(0).normal(size=(3, N)).astype(np.float32)


@jax.jit
def fake_predict(images):
    """[1, h, w, 3] -> [1, h/4, w/4, N]: average-pooled pixels times a fixed projection."""
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // RATE, RATE, w // RATE, RATE, c).mean((2, 4))
    return pooled @ PROJ


def fake_predict_np(images):
    b, h, w, c = images.shape
    pooled = images.reshape(b, h // RATE, RATE, w // RATE, RATE, c).mean((2, 4))
    return pooled.astype(np.float64) @ PROJ


def slide_reference(image, crop, stride):
    """Plain-numpy accumulate / divide over the SPEC 7.2 windows, written with loops."""
    height, width = image.shape[:2]
    acc = np.zeros((height, width, N))
    count = np.zeros((height, width, 1))
    for y1, y2, x1, x2 in slide_image.slide_windows(height, width, crop, stride):
        logits = fake_predict_np(image[None, y1:y2, x1:x2])
        acc[y1:y2, x1:x2] += reference.upsample(logits, (y2 - y1, x2 - x1))[0]
        count[y1:y2, x1:x2] += 1
    return acc / count


@pytest.mark.parametrize(
    "hw, crop, stride, expected",
    [
        ((512, 683), 512, 512, [(0, 512, 0, 512), (0, 512, 171, 683)]),
        ((300, 400), 512, 512, [(0, 300, 0, 400)]),
        ((1100, 512), 512, 512, [(0, 512, 0, 512), (512, 1024, 0, 512), (588, 1100, 0, 512)]),
        ((512, 1024), 512, 341, [(0, 512, 0, 512), (0, 512, 341, 853), (0, 512, 512, 1024)]),
        ((512, 512), (512, 512), (512, 512), [(0, 512, 0, 512)]),
    ],
)
def test_slide_windows_matches_hand_computed_grid(hw, crop, stride, expected):
    assert slide_image.slide_windows(*hw, crop, stride) == expected


@pytest.mark.parametrize("hw", [(40, 52), (20, 30)])
def test_slide_inference_matches_numpy_accumulate_divide(hw):
    image = np.random.default_rng(1).normal(size=(*hw, 3)).astype(np.float32)
    # Stride < crop so interior pixels are covered twice; (20, 30) has windows shorter than crop.
    with jax.transfer_guard_device_to_host("disallow"):
        out = slide_image.slide_inference(fake_predict, image, num_classes=N, crop=24, stride=16)
    assert isinstance(out, jax.Array) and out.shape == (*hw, N)
    np.testing.assert_allclose(
        np.asarray(out), slide_reference(image, 24, 16), rtol=1e-5, atol=1e-5
    )


def test_whole_inference_is_one_resized_forward():
    image = np.random.default_rng(2).normal(size=(32, 48, 3)).astype(np.float32)
    out = slide_image.slide_inference(
        fake_predict, image, num_classes=N, crop=24, stride=16, mode="whole"
    )
    want = reference.upsample(fake_predict_np(image[None]), (32, 48))[0]
    np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


def test_slide_inference_rejects_wrong_class_count():
    with pytest.raises(ValueError, match="predict_fn must return"):
        slide_image.slide_inference(
            fake_predict, np.zeros((24, 24, 3)), num_classes=7, crop=24, stride=24
        )


def test_resize_to_labels_is_argmax_of_resized_logits():
    logits = np.random.default_rng(3).normal(size=(10, 12, 7)).astype(np.float32)
    for out_hw in ((23, 17), (4, 5), (10, 12)):  # up, down, same size
        want = reference.upsample(logits[None].astype(np.float64), out_hw)[0]
        got, conf = tiles.resize_to_labels(jnp.asarray(logits), out_hw, confidence=True)
        assert got.dtype == jnp.int32 and got.shape == out_hw
        np.testing.assert_array_equal(np.asarray(got), want.argmax(-1))
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        top = (probs / probs.sum(-1, keepdims=True)).max(-1)
        want_conf = reference.upsample(top[None, ..., None].astype(np.float64), out_hw)[0, ..., 0]
        np.testing.assert_allclose(np.asarray(conf), want_conf, rtol=1e-5, atol=1e-6)


def miou_reference(preds, gts, num_classes):
    """Per-class IoU (fraction, NaN when union is 0) and pixel accuracy, by explicit loops."""
    inter, union, gt_total, correct = np.zeros(num_classes), np.zeros(num_classes), 0, 0
    for pred, gt in zip(preds, gts):
        valid = gt != -1
        gt_total += valid.sum()
        correct += (valid & (pred == gt)).sum()
        for c in range(num_classes):
            p, g = valid & (pred == c), valid & (gt == c)
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    with np.errstate(invalid="ignore"):
        return inter / union, correct / gt_total


def random_pairs(rng, num, num_classes=6):
    """Class 4 never occurs (NaN); class 5 is predicted but never in the GT (IoU 0)."""
    preds, gts = [], []
    for _ in range(num):
        gt = rng.choice([-1, 0, 1, 2, 3], size=(9, 11), p=[0.2, 0.3, 0.2, 0.2, 0.1])
        pred = np.where(
            rng.random(gt.shape) < 0.6,
            np.maximum(gt, 0),
            rng.choice([0, 1, 2, 3, 5], size=gt.shape),
        )
        preds.append(pred.astype(np.int32))
        gts.append(gt.astype(np.int32))
    return preds, gts


def test_miou_matches_numpy_reference_with_absent_and_false_positive_classes():
    """Class e never occurs (null); class f is predicted but absent from the GT: IoU 0 in the
    table, left out of every mean (mmseg would average its 0 in)."""
    names = ["a", "b", "c", "d", "e", "f"]
    preds, gts = random_pairs(np.random.default_rng(4), 4)
    totals = sum(np.stack(evaluate.class_histograms(p, g, 6)) for p, g in zip(preds, gts))
    assert totals.dtype == np.int64
    inter, pred_area, gt_area = totals
    report = evaluate.miou_report(
        inter,
        pred_area + gt_area - inter,
        gt_area,
        class_names=names,
        base_names=["a", "c", "e"],
        novel_names=["b", "d", "f"],
    )
    iou, acc = miou_reference(preds, gts, 6)
    assert np.isnan(iou[4]) and iou[5] == 0
    assert report["per_class_iou"]["e"] is None and report["per_class_iou"]["f"] == 0.0
    assert report["num_absent"] == 2 and report["absent_classes"] == ["e", "f"]
    np.testing.assert_allclose(report["miou"], 100 * np.mean(iou[:4]), rtol=1e-12)
    np.testing.assert_allclose(report["miou_base"], 100 * np.mean(iou[[0, 2]]), rtol=1e-12)
    novel = 100 * np.mean(iou[[1, 3]])
    np.testing.assert_allclose(report["miou_novel"], novel, rtol=1e-12)
    base = report["miou_base"]
    np.testing.assert_allclose(report["hiou"], 2 * base * novel / (base + novel), rtol=1e-12)
    assert report["frequency"] is None
    np.testing.assert_allclose(report["pixel_acc"], 100 * acc, rtol=1e-12)
    got = [report["per_class_iou"][n] for n in names]
    np.testing.assert_allclose(np.array(got, float), 100 * iou, rtol=1e-12)
    assert (report["num_classes"], report["num_base"], report["num_novel"]) == (6, 3, 3)


def test_predicted_but_absent_class_is_left_out_of_every_mean():
    """Hand-computed: a IoU 5/10, b 2/8, c predicted on 4 pixels but absent from the GT (IoU 0),
    d neither. mmseg's mIoU would be (50 + 25 + 0) / 3 = 25; here it is (50 + 25) / 2."""
    report = evaluate.miou_report(
        [5, 2, 0, 0],
        [10, 8, 4, 0],
        [8, 4, 0, 0],
        class_names=["a", "b", "c", "d"],
        base_names=["a", "c"],
        novel_names=["b", "d"],
        class_counts={"a": 500, "b": 50, "c": 3},  # d missing: 0 training images
    )
    assert report["per_class_iou"] == {"a": 50.0, "b": 25.0, "c": 0.0, "d": None}
    assert report["miou"] == 37.5
    assert (report["miou_base"], report["miou_novel"]) == (50.0, 25.0)  # c and d left out
    assert report["hiou"] == pytest.approx(2 * 50 * 25 / 75)  # 33.33
    assert report["pixel_acc"] == pytest.approx(100 * 7 / 12)
    assert (report["num_absent"], report["absent_classes"]) == (2, ["c", "d"])
    assert report["frequency"] == {
        "thresholds": [10, 100],
        "miou_rare": None,  # c and d, both absent from the GT
        "miou_common": 25.0,
        "miou_frequent": 50.0,
        "num_rare": 2,
        "num_common": 1,
        "num_frequent": 1,
        "classes": {"rare": ["c", "d"], "common": ["b"], "frequent": ["a"]},
    }


def test_frequency_bucket_means_by_hand():
    """Six present classes; IoU 10, 20, 30, 40, 50, 60 %; counts at the bucket edges."""
    names = ["r0", "r10", "c11", "c100", "f101", "f5000"]
    counts = {"r0": 0, "r10": 10, "c11": 11, "c100": 100, "f101": 101, "f5000": 5000}
    report = evaluate.miou_report(
        [1, 2, 3, 4, 5, 6],
        [10, 10, 10, 10, 10, 10],
        [5, 5, 5, 5, 5, 5],
        class_names=names,
        class_counts=counts,
    )
    freq = report["frequency"]
    assert freq["classes"] == {
        "rare": ["r0", "r10"],
        "common": ["c11", "c100"],
        "frequent": ["f101", "f5000"],
    }
    assert freq["miou_rare"] == pytest.approx(15.0)
    assert freq["miou_common"] == pytest.approx(35.0)
    assert freq["miou_frequent"] == pytest.approx(55.0)
    assert report["miou"] == pytest.approx(35.0) and report["hiou"] is None  # no base/novel
    # Other thresholds: rare <= 0 < common <= 11 < frequent.
    freq = evaluate.miou_report(
        [1, 2, 3, 4, 5, 6],
        [10] * 6,
        [5] * 6,
        class_names=names,
        class_counts=counts,
        bucket_thresholds=(0, 11),
    )["frequency"]
    assert (freq["num_rare"], freq["num_common"], freq["num_frequent"]) == (1, 2, 3)
    assert freq["miou_rare"] == pytest.approx(10.0) and freq["thresholds"] == [0, 11]
    assert freq["miou_frequent"] == pytest.approx(50.0)
    with pytest.raises(ValueError, match="must be 0 <= rare < common"):
        evaluate.frequency_buckets(names, counts, (100, 10))


@pytest.mark.parametrize(
    "base, novel, want",
    [(50.0, 25.0, 100 / 3), (40.0, 40.0, 40.0), (0.0, 0.0, 0.0), (60.0, 0.0, 0.0)]
    + [(None, 5.0, None), (5.0, None, None)],
)
def test_harmonic_iou(base, novel, want):
    got = evaluate.harmonic_iou(base, novel)
    assert got == (None if want is None else pytest.approx(want))


def test_class_histograms_drop_ignore_and_reject_bad_ids():
    gt = np.array([[0, -1], [1, 1]])
    pred = np.array([[0, 2], [1, 0]])
    inter, pred_area, gt_area = evaluate.class_histograms(pred, gt, 3)
    np.testing.assert_array_equal(inter, [1, 1, 0])
    np.testing.assert_array_equal(pred_area, [2, 1, 0])  # the pred 2 under ignore is dropped
    np.testing.assert_array_equal(gt_area, [1, 2, 0])
    with pytest.raises(ValueError, match="gt id 3"):
        evaluate.class_histograms(pred, np.array([[0, 3], [1, 1]]), 3)
    with pytest.raises(ValueError, match="pred id 7"):
        evaluate.class_histograms(np.array([[7, 0], [1, 1]]), gt, 3)


def test_miou_report_rejects_unknown_split_names():
    with pytest.raises(ValueError, match="novel names not in class_names"):
        evaluate.miou_report([1, 1], [2, 2], class_names=["a", "b"], novel_names=["z"])


def constant_predict(images):
    """Class 2 wins everywhere, whatever the input."""
    b, h, w = images.shape[0], images.shape[1] // RATE, images.shape[2] // RATE
    return jnp.broadcast_to(-jnp.abs(jnp.arange(N) - 2.0), (b, h, w, N))


def test_run_evaluation_writes_json_atomically_and_returns_panels(tmp_path):
    rng = np.random.default_rng(5)
    dataset = []
    for i, (hw, hw0) in enumerate(
        [((24, 32), (30, 40)), ((28, 24), (28, 24)), ((24, 24), (12, 12))]
    ):
        label = rng.integers(-1, 4, size=hw0).astype(np.int32)
        raw = rng.integers(0, 256, size=(*hw0, 3), dtype=np.uint8)
        image = rng.normal(size=(*hw, 3)).astype(np.float32)
        dataset.append({"image": image, "label": label, "raw": raw, "id": f"im{i}"})
    colours = visualize.palette(EVAL_ARGS["class_names"])
    (tmp_path / "step_7.json").write_text("old")
    result = evaluate.run_evaluation(
        constant_predict,
        dataset,
        **EVAL_ARGS,
        step=7,
        out_dir=tmp_path,
        num_panels=2,
        palette=colours,
    )
    assert sorted(os.listdir(tmp_path)) == ["step_7.json"]  # replaced, no temp file left behind
    saved = json.loads((tmp_path / "step_7.json").read_text())
    panels = result.pop("panels")
    assert saved == result
    expected_keys = {"step", "miou", "miou_base", "miou_novel", "pixel_acc", "per_class_iou"}
    assert expected_keys | {"num_images", "num_classes", "num_base", "num_novel"} <= set(saved)
    assert saved["step"] == 7 and saved["num_images"] == 3

    gts = np.concatenate([d["label"].ravel() for d in dataset])
    valid = gts != -1
    iou2 = (gts == 2).sum() / valid.sum()  # everything predicted as class 2
    assert saved["per_class_iou"] == {
        "c0": 0.0,
        "c1": 0.0,
        "c2": pytest.approx(100 * iou2),
        "c3": 0.0,
        "c4": None,
    }
    assert saved["miou"] == pytest.approx(100 * iou2 / 4)
    assert saved["miou_base"] == pytest.approx(100 * iou2 / 2)
    assert saved["miou_novel"] == 0.0
    assert saved["hiou"] == 0.0
    assert saved["pixel_acc"] == pytest.approx(100 * iou2)
    assert (saved["num_absent"], saved["absent_classes"]) == (1, ["c4"])
    assert saved["frequency"] is None and saved["frequency_note"]

    assert len(panels) == 2
    for panel, d in zip(panels, dataset):  # enlarged by an integer s, legend strip below
        h, w = d["label"].shape
        s = panel.shape[1] // (3 * w)
        assert panel.dtype == np.uint8 and panel.shape[1] == 3 * s * w
        assert panel.shape[0] > s * h >= visualize.MIN_HEIGHT
    s = panels[0].shape[1] // 120
    p, d = panels[0][: 30 * s : s, ::s], dataset[0]
    np.testing.assert_array_equal(p[:, :40], d["raw"])
    np.testing.assert_array_equal(p[:, 40:80][d["label"] == -1], 0)
    np.testing.assert_array_equal(
        p[:, 40:80][d["label"] >= 0], colours[d["label"][d["label"] >= 0]]
    )
    np.testing.assert_array_equal(p[:, 80:], np.broadcast_to(colours[2], (30, 40, 3)))


def test_run_evaluation_metrics_follow_the_slide_predictions(tmp_path):
    """Predictions that vary over the image: run_evaluation's per-class IoU is the numpy
    slide inference -> bilinear resize to the GT size -> argmax -> IoU, over all images."""
    rng = np.random.default_rng(6)
    dataset, preds = [], []
    for hw, hw0 in [((24, 40), (30, 50)), ((32, 24), (32, 24)), ((24, 24), (18, 18))]:
        image = rng.normal(size=(*hw, 3)).astype(np.float32)
        logits = reference.upsample(slide_reference(image, 24, 16)[None], hw0)[0]
        top2 = np.sort(logits, axis=-1)[..., -2:]
        assert np.min(top2[..., 1] - top2[..., 0]) > 1e-4  # no near-tie can flip the argmax
        preds.append(logits.argmax(-1))
        label = rng.integers(-1, 4, size=hw0).astype(np.int32)
        label[preds[-1] == 2] = np.where(rng.random(np.sum(preds[-1] == 2)) < 0.7, 2, 0)
        raw = np.zeros((*hw0, 3), np.uint8)
        dataset.append({"image": image, "label": label, "raw": raw, "id": str(hw)})
    iou, acc = miou_reference(preds, [d["label"] for d in dataset], N)
    assert len(set(np.concatenate([p.ravel() for p in preds]).tolist())) >= 3
    assert np.nanmax(iou) > 0.2  # correlated with the GT, not a trivially zero score
    result = evaluate.run_evaluation(
        fake_predict,
        dataset,
        **EVAL_ARGS,
        step=3,
        out_dir=tmp_path,
        progress=False,
    )
    got = np.array([np.nan if v is None else v for v in result["per_class_iou"].values()])
    np.testing.assert_allclose(got, 100 * iou, rtol=1e-12)
    np.testing.assert_allclose(result["pixel_acc"], 100 * acc, rtol=1e-12)
    present = np.isin(np.arange(N), np.concatenate([d["label"].ravel() for d in dataset]))
    np.testing.assert_allclose(result["miou"], 100 * np.mean(iou[present]), rtol=1e-12)
    assert result["num_images"] == 3


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "step_1.json"
    evaluate.write_json_atomic(path, {"miou": 1.0})
    with pytest.raises(ValueError):
        evaluate.write_json_atomic(path, {"miou": float("nan")})  # strict JSON: no NaN
    assert json.loads(path.read_text()) == {"miou": 1.0}
    assert os.listdir(tmp_path) == ["step_1.json"]
