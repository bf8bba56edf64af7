"""Slide / whole inference, class histograms, mIoU all/base/novel and the eval JSON (SPEC 7).

Metric values are percentages (0-100), as the paper reports them. IoU of a class absent from both
the ground truth and the predictions is NaN, excluded from every mean and written as JSON null.
"""

import functools
import json
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax import lax

from larvseg_jax import visualize
from larvseg_jax.interp import resize_bilinear
from larvseg_jax.vocab import IGNORE

PredictFn = Callable[[jax.Array], jax.Array]  # [1, h, w, 3] -> mask-normed logits [1, h', w', N]


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (int(v), int(v)) if np.isscalar(v) else (int(v[0]), int(v[1]))


def slide_windows(
    height: int, width: int, crop: int | Sequence[int], stride: int | Sequence[int]
) -> list[tuple[int, int, int, int]]:
    """Sliding-window grid of mmseg's `slide_inference` (SPEC 7.2).

    The last window of each axis is shifted back to end at the border, so windows overlap only
    there; a side shorter than the crop gives one window of that side's length.

    Args:
      height, width: image size H, W.
      crop: window size, int or (h, w).
      stride: window step, int or (h, w).

    Returns:
      [(y1, y2, x1, x2)] in row-major order.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop), _pair(stride)
    n_h = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    n_w = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    windows = []
    for i in range(n_h):
        for j in range(n_w):
            y2 = min(i * stride_h + crop_h, height)
            x2 = min(j * stride_w + crop_w, width)
            windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
    return windows


@functools.partial(jax.jit, static_argnames=("hw",))
def _crop(image: jax.Array, y1: jax.Array, x1: jax.Array, *, hw: tuple[int, int]) -> jax.Array:
    # Dynamic offsets: one compilation per window size, not per window position.
    return lax.dynamic_slice(image, (y1, x1, 0), (*hw, image.shape[-1]))[None]


@functools.partial(jax.jit, static_argnames=("hw",), donate_argnums=(0, 1))
def _accumulate(acc, count, logits, y1, x1, *, hw):
    up = resize_bilinear(logits[0], hw)  # [h, w, N]
    start = (y1, x1, 0)
    acc = lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, start, up.shape) + up, start)
    cnt = lax.dynamic_slice(count, (y1, x1), hw) + 1.0
    return acc, lax.dynamic_update_slice(count, cnt, (y1, x1))


@jax.jit
def _divide(acc, count):
    return acc / count[..., None]


@functools.partial(jax.jit, static_argnames=("hw",))
def _resize_one(logits, *, hw):
    return resize_bilinear(logits[0], hw)


def _checked(logits: jax.Array, num_classes: int) -> jax.Array:
    if logits.ndim != 4 or logits.shape[0] != 1 or logits.shape[-1] != num_classes:
        raise ValueError(f"predict_fn must return [1, h, w, {num_classes}], got {logits.shape}")
    return logits


def slide_inference(
    predict_fn: PredictFn,
    image: np.ndarray | jax.Array,
    *,
    num_classes: int,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    mode: str = "slide",
) -> jax.Array:
    """Logits for one image at its (resized) input size, by sliding windows or one whole pass.

    Each window's logits are bilinearly resized to the window size, summed into an on-device
    accumulator and divided by the per-pixel window count (SPEC 7.2). Windows smaller than the crop
    (image side < crop) go to `predict_fn` as they are.

    Args:
      predict_fn: jitted model call, images [1, h, w, 3] -> mask-normed logits [1, h', w', N]
        at the feature resolution.
      image: float32 [H, W, 3], already resized and normalised.
      num_classes: N.
      crop, stride: window size and step, int or (h, w); unused in whole mode.
      mode: "slide" or "whole" (one forward over the full image).

    Returns:
      float32 [H, W, N] logits, on device.
    """
    image = jnp.asarray(image, jnp.float32)
    height, width = image.shape[:2]
    if mode == "whole":
        return _resize_one(_checked(predict_fn(image[None]), num_classes), hw=(height, width))
    if mode != "slide":
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    acc = jnp.zeros((height, width, num_classes), jnp.float32)
    count = jnp.zeros((height, width), jnp.float32)
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        hw = (y2 - y1, x2 - x1)
        logits = _checked(predict_fn(_crop(image, y1, x1, hw=hw)), num_classes)
        acc, count = _accumulate(acc, count, logits.astype(jnp.float32), y1, x1, hw=hw)
    return _divide(acc, count)


@functools.partial(jax.jit, static_argnames=("out_hw", "chunk"))
def _resize_argmax(logits, *, out_hw, chunk):
    n = logits.shape[-1]
    if chunk >= n:
        return jnp.argmax(resize_bilinear(logits, out_hw), axis=-1).astype(jnp.int32)

    # Class chunks bound the [H0, W0, N] resize buffer (A847 at full size). Bilinear acts per
    # channel, so a running max over chunks equals the argmax of the full resize; the last chunk
    # is clamped to end at N, and the strict ">" keeps the first maximal index as jnp.argmax does.
    def body(i, carry):
        best, idx = carry
        start = jnp.minimum(i * chunk, n - chunk)
        up = resize_bilinear(lax.dynamic_slice_in_dim(logits, start, chunk, axis=-1), out_hw)
        better = up.max(-1) > best
        arg = up.argmax(-1).astype(jnp.int32) + start
        return jnp.where(better, up.max(-1), best), jnp.where(better, arg, idx)

    init = (jnp.full(out_hw, -jnp.inf, logits.dtype), jnp.zeros(out_hw, jnp.int32))
    return lax.fori_loop(0, -(-n // chunk), body, init)[1]


def predict_labels(
    logits: jax.Array, out_hw: Sequence[int], *, max_elements: int = 2**28
) -> jax.Array:
    """Resizes logits to the original image size, then takes the argmax (SPEC 7.2).

    The official code applies a softmax first; it does not change the argmax, so it is skipped.

    Args:
      logits: [H, W, N] from `slide_inference`.
      out_hw: original (H0, W0).
      max_elements: above H0 * W0 * N elements the resize runs over class chunks so the full
        resized tensor is never held at once (the official code moves it to the CPU instead).

    Returns:
      int32 [H0, W0] on device.
    """
    out_hw = (int(out_hw[0]), int(out_hw[1]))
    n = logits.shape[-1]
    chunk = max(1, min(n, max_elements // max(out_hw[0] * out_hw[1], 1)))
    return _resize_argmax(logits, out_hw=out_hw, chunk=chunk)


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


def miou_report(
    intersect: np.ndarray,
    union: np.ndarray,
    gt_area: np.ndarray | None = None,
    *,
    class_names: Sequence[str],
    base_names: Sequence[str] = (),
    novel_names: Sequence[str] = (),
) -> dict:
    """Dataset-level IoU per class and its means over all / base / novel classes (SPEC 7.3).

    Args:
      intersect, union: int [N] summed over the dataset.
      gt_area: int [N] summed over the dataset; gives pixel_acc (None without it).
      class_names: N unique names, in class-id order.
      base_names, novel_names: subsets of `class_names` (the rule-2 split of SPEC 5.3).

    Returns:
      {"miou", "miou_base", "miou_novel", "pixel_acc": percent or None,
       "per_class_iou": {name: percent or None}, "num_classes", "num_base", "num_novel"}.
      None marks NaN: a class with union 0, or a mean over no non-NaN class.
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

    def subset_mean(names, what):
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"{what} names not in class_names: {missing[:5]}")
        return _percent(_nanmean(iou[[index[n] for n in names]]))

    pixel_acc = None
    if gt_area is not None:
        total = float(np.sum(gt_area))
        pixel_acc = _percent(float(intersect.sum()) / total if total else float("nan"))
    return {
        "miou": _percent(_nanmean(iou)),
        "miou_base": subset_mean(base_names, "base"),
        "miou_novel": subset_mean(novel_names, "novel"),
        "pixel_acc": pixel_acc,
        "per_class_iou": {name: _percent(v) for name, v in zip(class_names, iou)},
        "num_classes": len(class_names),
        "num_base": len(base_names),
        "num_novel": len(novel_names),
    }


def write_json_atomic(path: str | os.PathLike, payload: Mapping) -> None:
    """Writes JSON to a temporary sibling, then renames it: readers never see a partial file."""
    tmp = f"{os.fspath(path)}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(payload, f, indent=1, allow_nan=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _ProgressLog:
    """Logs evaluation progress with an ETA about every 10 % of the dataset."""

    def __init__(self, step: int, size: int | None, enabled: bool):
        self.step, self.size, self.enabled = step, size, enabled
        self.every = max(1, size // 10) if size else 100
        self.start, self.done = time.perf_counter(), 0

    def image_done(self) -> None:
        self.done += 1
        if not self.enabled or self.done % self.every:
            return
        elapsed = time.perf_counter() - self.start
        eta = f", ETA {elapsed / self.done * (self.size - self.done):.0f} s" if self.size else ""
        total = f"/{self.size}" if self.size else ""
        logging.info(
            "eval step %d: %d%s images, %.0f s%s", self.step, self.done, total, elapsed, eta
        )


def run_evaluation(
    predict_fn: PredictFn,
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
) -> dict:
    """Evaluates `predict_fn` over a dataset and writes `out_dir/step_<step>.json` (SPEC 7).

    Args:
      predict_fn: see `slide_inference`.
      dataset: iterable of {"image": float32 [H, W, 3] resized and normalised, "label": int32
        [H0, W0] original-size GT (ignore -1), "raw": uint8 [H0, W0, 3], "id": str}.
      class_names, base_names, novel_names: see `miou_report`.
      crop, stride, mode: see `slide_inference`.
      step: training step, names the JSON file.
      out_dir: directory for the JSON (created if missing).
      num_panels: how many input | GT | prediction panels to return (first images).
      palette: uint8 [N, 3]; `visualize.palette(class_names)` when None.
      progress: log progress with ETA about every 10 % of the dataset.

    Returns:
      The JSON payload ({"step", "num_images", "mode"} plus `miou_report`'s keys) and "panels":
      a list of uint8 [s * H0 + legend rows, 3 * s * W0, 3] (see `visualize.panel`).
    """
    num_classes = len(class_names)
    totals = np.zeros((3, num_classes), np.int64)
    colours = visualize.palette(class_names) if palette is None else palette
    panels = []
    log = _ProgressLog(step, len(dataset) if hasattr(dataset, "__len__") else None, progress)
    for example in dataset:
        gt = np.asarray(example["label"])
        logits = slide_inference(
            predict_fn,
            example["image"],
            num_classes=num_classes,
            crop=crop,
            stride=stride,
            mode=mode,
        )
        pred = np.asarray(predict_labels(logits, gt.shape))
        totals += np.stack(class_histograms(pred, gt, num_classes))
        if len(panels) < num_panels:
            panels.append(visualize.panel(example["raw"], gt, pred, colours, class_names))
        log.image_done()
    num_images = log.done
    intersect, pred_area, gt_area = totals
    report = miou_report(
        intersect,
        pred_area + gt_area - intersect,
        gt_area,
        class_names=class_names,
        base_names=base_names,
        novel_names=novel_names,
    )
    payload = {"step": int(step), "num_images": num_images, "mode": mode, **report}
    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, f"step_{int(step)}.json"), payload)
    logging.info(
        "eval step %d: mIoU %.2f (base %.2f, novel %.2f) over %d images",
        step,
        *(
            np.nan if payload[k] is None else payload[k]
            for k in ("miou", "miou_base", "miou_novel")
        ),
        num_images,
    )
    return {**payload, "panels": panels}
