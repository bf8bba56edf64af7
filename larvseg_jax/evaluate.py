"""Slide / whole inference, class histograms, mIoU, hIoU, frequency buckets, the eval JSON (SPEC 7).

Metric values are percentages (0-100), as the paper reports them. IoU of a class absent from both
the ground truth and the predictions is NaN and written as JSON null.

One departure from mmseg's mIoU: a class absent from the whole evaluation ground truth (gt_area
0, e.g. some of A847's 847 classes in its 2,000 validation images) is left out of every mean
(all, base, novel, hIoU, frequency buckets) even when it is predicted; mmseg would count it with
IoU 0. Its per-class IoU is still reported (0 when predicted). The means are identical to mmseg's
whenever every class occurs, as in A150 validation; the JSON lists the absent classes.

Inference runs through `slide.SlideRunner`: windows of consecutive images batched per device,
images round-robin over the local devices and, in a multi-process run, over processes, whose
integer histograms are summed exactly before the report; the result is bit-identical to one
device's.
"""

import itertools
import os
from collections.abc import Iterable, Mapping, Sequence

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from larvseg_jax import interrupts, slide, slide_image, visualize
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress
from larvseg_jax.vocab import IGNORE

# Training-image counts that bin the classes: at most 10 images is rare, 11..100 common, more
# than 100 frequent (the LVIS convention).
BUCKET_THRESHOLDS = (10, 100)
BUCKETS = ("rare", "common", "frequent")


def class_histograms(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: int = IGNORE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image intersection / prediction / ground-truth histograms over valid pixels (SPEC 7.3).

    Args:
      pred: int [H, W] predicted ids in [0, N).
      gt: int [H, W] ground truth in [0, N) or `ignore`; ignored pixels are dropped first.
      num_classes: N.
      ignore: ground-truth id to drop.

    Returns:
      (intersect, pred_area, gt_area), each int64 [N]. Union = pred_area + gt_area - intersect.
    """
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    valid = gt != ignore
    pred, gt = pred[valid].astype(np.int64), gt[valid].astype(np.int64)
    for name, ids in (("gt", gt), ("pred", pred)):
        if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
            bad = ids[(ids < 0) | (ids >= num_classes)][0]
            raise ValueError(f"{name} id {bad} outside [0, {num_classes}) and not ignore={ignore}")
    intersect = np.bincount(gt[pred == gt], minlength=num_classes).astype(np.int64)
    pred_area = np.bincount(pred, minlength=num_classes).astype(np.int64)
    gt_area = np.bincount(gt, minlength=num_classes).astype(np.int64)
    return intersect, pred_area, gt_area


def _percent(x: float) -> float | None:
    return None if np.isnan(x) else float(100.0 * x)


def _nanmean(x: np.ndarray) -> float:
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else float("nan")


def harmonic_iou(base: float | None, novel: float | None) -> float | None:
    """hIoU, the harmonic mean 2bn / (b + n) of base and novel mIoU that open-vocabulary
    segmentation papers report: high only when both are. None if either is; 0 if both are 0."""
    if base is None or novel is None:
        return None
    if base + novel == 0:
        return 0.0
    return 2.0 * base * novel / (base + novel)


def _checked_thresholds(thresholds: Sequence[int]) -> tuple[int, int]:
    rare_max, common_max = (int(t) for t in thresholds)
    if not 0 <= rare_max < common_max:
        raise ValueError(f"bucket thresholds {tuple(thresholds)} must be 0 <= rare < common")
    return rare_max, common_max


def frequency_buckets(
    class_names: Sequence[str],
    class_counts: Mapping[str, int],
    thresholds: Sequence[int] = BUCKET_THRESHOLDS,
) -> dict[str, list[str]]:
    """Class names binned by how many training images carry them (a name missing from the
    counts has 0): rare <= thresholds[0] < common <= thresholds[1] < frequent.

    Returns:
      {"rare": [...], "common": [...], "frequent": [...]}, each in class-id order.
    """
    rare_max, common_max = _checked_thresholds(thresholds)
    out: dict[str, list[str]] = {b: [] for b in BUCKETS}
    for name in class_names:
        count = int(class_counts.get(name, 0))
        bucket = "rare" if count <= rare_max else "common" if count <= common_max else "frequent"
        out[bucket].append(name)
    return out


def miou_report(
    intersect: np.ndarray,
    union: np.ndarray,
    gt_area: np.ndarray | None = None,
    *,
    class_names: Sequence[str],
    base_names: Sequence[str] = (),
    novel_names: Sequence[str] = (),
    class_counts: Mapping[str, int] | None = None,
    bucket_thresholds: Sequence[int] = BUCKET_THRESHOLDS,
) -> dict:
    """Dataset-level IoU per class and its means over all / base / novel / frequency buckets.

    Classes absent from the ground truth are left out of every mean (see the module docstring).

    Args:
      intersect, union: int [N] summed over the dataset.
      gt_area: int [N] summed over the dataset; gives pixel_acc and tells the absent classes
        (without it only classes of union 0 count as absent, and pixel_acc is None).
      class_names: N unique names, in class-id order.
      base_names, novel_names: subsets of `class_names` (the rule-2 split of SPEC 5.3).
      class_counts: training images per class name (`frequency_buckets`); None = no buckets.
      bucket_thresholds: (rare_max, common_max) training images.

    Returns:
      {"miou", "miou_base", "miou_novel", "hiou", "pixel_acc": percent or None,
       "num_absent": int, "absent_classes": [names], "frequency": None or {"thresholds",
       "miou_rare", "miou_common", "miou_frequent", "num_rare", "num_common", "num_frequent",
       "classes": {bucket: [names]}}, "per_class_iou": {name: percent or None}, "num_classes",
       "num_base", "num_novel"}. None marks NaN: a class with union 0, or a mean over no class.
    """
    intersect, union = np.asarray(intersect, np.float64), np.asarray(union, np.float64)
    if len(class_names) != len(intersect) or len(union) != len(intersect):
        raise ValueError(
            f"{len(class_names)} names, {len(intersect)} intersect, {len(union)} union entries"
        )
    index = {name: i for i, name in enumerate(class_names)}
    if len(index) != len(class_names):
        raise ValueError("class_names has duplicates")
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(union > 0, intersect / union, np.nan)
    present = union > 0 if gt_area is None else np.asarray(gt_area) > 0
    scored = np.where(present, iou, np.nan)  # what every mean sees

    def subset_mean(names, what):
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"{what} names not in class_names: {missing[:5]}")
        return _percent(_nanmean(scored[[index[n] for n in names]]))

    pixel_acc = None
    if gt_area is not None:
        total = float(np.sum(gt_area))
        pixel_acc = _percent(float(intersect.sum()) / total if total else float("nan"))
    miou_base = subset_mean(base_names, "base")
    miou_novel = subset_mean(novel_names, "novel")
    frequency = None
    if class_counts is not None:
        buckets = frequency_buckets(class_names, class_counts, bucket_thresholds)
        frequency = {
            "thresholds": list(_checked_thresholds(bucket_thresholds)),
            **{f"miou_{b}": subset_mean(buckets[b], b) for b in BUCKETS},
            **{f"num_{b}": len(buckets[b]) for b in BUCKETS},
            "classes": buckets,
        }
    absent = [name for name, p in zip(class_names, present) if not p]
    return {
        "miou": _percent(_nanmean(scored)),
        "miou_base": miou_base,
        "miou_novel": miou_novel,
        "hiou": harmonic_iou(miou_base, miou_novel),
        "pixel_acc": pixel_acc,
        "num_absent": len(absent),
        "absent_classes": absent,
        "frequency": frequency,
        "per_class_iou": {name: _percent(v) for name, v in zip(class_names, iou)},
        "num_classes": len(class_names),
        "num_base": len(base_names),
        "num_novel": len(novel_names),
    }


def _process_share(dataset: Iterable[Mapping], index: int, count: int) -> Iterable[Mapping]:
    """Images index, index + count, ... of `dataset`: this process's share."""
    if count == 1:
        return dataset
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        return dataset[index::count]  # lists and grain MapDatasets: skipped images are not decoded
    return itertools.islice(dataset, index, None, count)


def _allgather_int64(x: np.ndarray) -> np.ndarray:
    """[P, ...] int64 values of every process, exactly: gathered as int32 halves, since JAX
    without x64 would truncate int64 (an A847 pixel count may pass 2**31)."""
    halves = np.ascontiguousarray(x, np.int64).view(np.int32)
    return np.ascontiguousarray(multihost_utils.process_allgather(halves)).view(np.int64)


def _sum_over_processes(x: np.ndarray) -> np.ndarray:
    if jax.process_count() == 1:
        return x
    return _allgather_int64(x).sum(0)


def run_evaluation(
    predict_fn: slide_image.PredictFn,
    dataset: Iterable[Mapping],
    *,
    class_names: Sequence[str],
    base_names: Sequence[str],
    novel_names: Sequence[str],
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    mode: str,
    step: int,
    out_dir: str | os.PathLike,
    num_panels: int = 0,
    palette: np.ndarray | None = None,
    progress: bool = True,
    devices: Sequence[jax.Device] | None = None,
    batch_windows: int = 8,
    class_chunk: int = 0,
    class_counts: Mapping[str, int] | None = None,
    frequency_source: str = "",
    frequency_note: str = "",
    bucket_thresholds: Sequence[int] = BUCKET_THRESHOLDS,
) -> dict:
    """Evaluates `predict_fn` over a dataset and writes `out_dir/step_<step>.json` (SPEC 7).

    Image i of this process goes to devices[i % n], whose windows are batched with those of the
    device's next images (`slide.SlideRunner`); the host reads a prediction back once later work
    is queued on its device. Process p of P takes images p, p + P, ...; the integer histograms
    are summed over processes, every process returns the report and process 0 writes it.

    Args:
      predict_fn: see `slide_image.PredictFn`.
      dataset: iterable of {"image": float32 [H, W, 3] resized and normalised, "label": int32
        [H0, W0] original-size GT (ignore -1), "raw": uint8 [H0, W0, 3], "id": str}.
      class_names, base_names, novel_names: see `miou_report`.
      crop, stride, mode: see `slide_image.slide_inference`.
      step: training step, names the JSON file.
      out_dir: directory for the JSON (created if missing).
      num_panels: how many input | GT | prediction panels to return (this process's first
        images).
      palette: uint8 [N, 3]; `visualize.palette(class_names)` when None.
      progress: report progress with rate and ETA (a bar on a terminal, else log lines).
      devices: where images go, round-robin; default all local devices.
      batch_windows: windows per model call and device.
      class_chunk: classes accumulated and resized at a time when there are more (see
        `slide.SlideRunner`); 0 = all at once.
      class_counts: training images per class name, for the frequency buckets; None = none.
      frequency_source: the training source the counts come from (written in the JSON).
      frequency_note: why there are no counts (written when class_counts is None).
      bucket_thresholds: see `miou_report`.

    Returns:
      The JSON payload ({"step", "num_images", "mode"}, `miou_report`'s keys with "source" in
      "frequency", and "frequency_note" when "frequency" is null) and "panels": a list of uint8
      [s * H0 + legend rows, 3 * s * W0, 3] (see `visualize.panel`).
    """
    num_classes = len(class_names)
    totals = np.zeros((3, num_classes), np.int64)
    colours = visualize.palette(class_names) if palette is None else palette
    panels = []
    share = _process_share(dataset, jax.process_index(), jax.process_count())
    size = len(share) if hasattr(share, "__len__") else None
    log = Progress(f"eval step {step}", size, enabled=progress)
    runner = slide.SlideRunner(
        predict_fn,
        num_classes=num_classes,
        crop=crop,
        stride=stride,
        mode=mode,
        batch=batch_windows,
        devices=devices,
        class_chunk=class_chunk,
    )

    def items():
        for i, example in enumerate(share):
            interrupts.test_point("eval")
            interrupts.check()
            gt = np.asarray(example["label"])
            raw = example["raw"] if i < num_panels else None
            yield (gt, raw), example["image"], gt.shape

    for (gt, raw), pred, _ in runner.run(items()):
        totals += np.stack(class_histograms(pred, gt, num_classes))
        if raw is not None:
            panels.append(visualize.panel(raw, gt, pred, colours, class_names))
        log.advance()
    log.close()
    payload = _report(
        totals,
        log.done,
        step=step,
        mode=mode,
        out_dir=out_dir,
        class_names=class_names,
        base_names=base_names,
        novel_names=novel_names,
        class_counts=class_counts,
        frequency_source=frequency_source,
        frequency_note=frequency_note,
        bucket_thresholds=bucket_thresholds,
    )
    return {**payload, "panels": panels}


def _report(totals, done, *, step, mode, out_dir, frequency_source, frequency_note, **metrics):
    """Sums this process's histograms [3, N] and image count over processes; the JSON payload
    (written by process 0 to out_dir/step_<step>.json and logged). `metrics`: `miou_report`'s
    keyword arguments."""
    summed = _sum_over_processes(np.append(totals.ravel(), done))
    (intersect, pred_area, gt_area), num_images = summed[:-1].reshape(3, -1), int(summed[-1])
    report = miou_report(intersect, pred_area + gt_area - intersect, gt_area, **metrics)
    payload = {"step": int(step), "num_images": num_images, "mode": mode, **report}
    if report["frequency"] is not None:
        payload["frequency"] = {"source": frequency_source, **report["frequency"]}
    else:
        payload["frequency_note"] = frequency_note or "no training-image counts were given"
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        write_json_atomic(os.path.join(out_dir, f"step_{int(step)}.json"), payload)
    _log_report(payload)
    return payload


def _log_report(payload: Mapping) -> None:
    """The means in the log: one line for all / base / novel / hIoU, one for the buckets."""

    def num(key, where=payload):
        return np.nan if where[key] is None else where[key]

    step = payload["step"]
    logging.info(
        "eval step %d: mIoU %.2f (base %.2f, novel %.2f, hIoU %.2f) over %d images",
        step,
        *(num(k) for k in ("miou", "miou_base", "miou_novel", "hiou")),
        payload["num_images"],
    )
    if payload["num_absent"]:
        logging.info(
            "eval step %d: %d of %d classes absent from the ground truth, left out of the means",
            step,
            payload["num_absent"],
            payload["num_classes"],
        )
    freq = payload["frequency"]
    if freq is None:
        logging.info("eval step %d: no frequency buckets: %s", step, payload["frequency_note"])
        return
    rare_max, common_max = freq["thresholds"]
    logging.info(
        "eval step %d: by %s training images, rare (<= %d) %.2f [%d classes], common (<= %d) "
        "%.2f [%d], frequent %.2f [%d]",
        step,
        freq["source"],
        rare_max,
        num("miou_rare", freq),
        freq["num_rare"],
        common_max,
        num("miou_common", freq),
        freq["num_common"],
        num("miou_frequent", freq),
        freq["num_frequent"],
    )
