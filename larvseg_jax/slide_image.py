"""Sliding-window inference of one image (SPEC 7.2): the reference path, and the traceable one.

mmseg's `slide_inference`: crop-size windows on a grid (`slide_windows`), each window's logits
resized to the window and summed into an accumulator, divided by the per-pixel window count;
then the argmax of the logits resized to the original size. `slide_inference` +
`tiles.resize_to_labels` compute it for one image (the reference the batched `slide.SlideRunner`
is tested against, and its path for "whole" mode and windows smaller than the crop);
`slide_labels` is the same computation as one traceable function, class-chunked for large
vocabularies (`class_chunks`), which export compiles into a self-contained model.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from larvseg_jax import class_chunks, tiles
from larvseg_jax.interp import resize_bilinear

# Images [B, h, w, 3] -> mask-normed logits [B, h', w', N], computed on the device that holds
# the images.
PredictFn = Callable[[jax.Array], jax.Array]


def pair(v: int | Sequence[int]) -> tuple[int, int]:
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
    (crop_h, crop_w), (stride_h, stride_w) = pair(crop), pair(stride)
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
def crop_window(
    image: jax.Array, y1: jax.Array, x1: jax.Array, *, hw: tuple[int, int]
) -> jax.Array:
    # Dynamic offsets: one compilation per window size, not per window position.
    return lax.dynamic_slice(image, (y1, x1, 0), (*hw, image.shape[-1]))[None]


def add_window(acc, count, logits, y1, x1, hw, transposed=False):
    """Adds one window's logits [h', w', N], resized to `hw`, at (y1, x1) (SPEC 7.2); with
    `transposed` (a traced bool) into a transposed accumulator at (x1, y1). Only square windows
    are ever transposed: for the others `transposed` is ignored."""
    up = resize_bilinear(logits, hw)
    if transposed is not False and hw[0] == hw[1]:
        up = jnp.where(transposed, up.swapaxes(0, 1), up)
        y1, x1 = jnp.where(transposed, x1, y1), jnp.where(transposed, y1, x1)
    start = (y1, x1, 0)
    acc = lax.dynamic_update_slice(acc, lax.dynamic_slice(acc, start, up.shape) + up, start)
    cnt = lax.dynamic_slice(count, (y1, x1), hw) + 1.0
    return acc, lax.dynamic_update_slice(count, cnt, (y1, x1))


@functools.partial(jax.jit, static_argnames=("hw",), donate_argnums=(0, 1))
def _accumulate(acc, count, logits, y1, x1, *, hw):
    return add_window(acc, count, logits[0], y1, x1, hw)


@jax.jit
def _divide(acc, count):
    return acc / count[..., None]


@functools.partial(jax.jit, static_argnames=("hw",))
def _resize_one(logits, *, hw):
    return resize_bilinear(logits[0], hw)


def checked(logits: jax.Array, batch: int, num_classes: int) -> jax.Array:
    if logits.ndim != 4 or logits.shape[0] != batch or logits.shape[-1] != num_classes:
        raise ValueError(
            f"predict_fn must return [{batch}, h, w, {num_classes}], got {logits.shape}"
        )
    return logits


def slide_inference(
    predict_fn: PredictFn,
    image: np.ndarray | jax.Array,
    *,
    num_classes: int,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    mode: str = "slide",
    device: jax.Device | None = None,
) -> jax.Array:
    """Logits for one image at its (resized) input size, by sliding windows or one whole pass.

    Each window's logits are bilinearly resized to the window size, summed into an on-device
    accumulator and divided by the per-pixel window count (SPEC 7.2). Windows smaller than the
    crop (image side < crop) go to `predict_fn` as they are. Traceable (export uses it).

    Args:
      predict_fn: images [1, h, w, 3] -> mask-normed logits [1, h', w', N] at the feature
        resolution.
      image: float32 [H, W, 3], already resized and normalised.
      num_classes: N.
      crop, stride: window size and step, int or (h, w); unused in whole mode.
      mode: "slide" or "whole" (one forward over the full image).
      device: where the image goes and every step runs; None = the default device.

    Returns:
      float32 [H, W, N] logits, on `device`, not synced.
    """
    image = jnp.asarray(jax.device_put(image, device), jnp.float32)
    height, width = image.shape[:2]
    if mode == "whole":
        return _resize_one(checked(predict_fn(image[None]), 1, num_classes), hw=(height, width))
    if mode != "slide":
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    acc = jnp.zeros((height, width, num_classes), jnp.float32, device=device)
    count = jnp.zeros((height, width), jnp.float32, device=device)
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        hw = (y2 - y1, x2 - x1)
        logits = checked(predict_fn(crop_window(image, y1, x1, hw=hw)), 1, num_classes)
        acc, count = _accumulate(acc, count, logits.astype(jnp.float32), y1, x1, hw=hw)
    return _divide(acc, count)


def slide_labels(
    predict_fn: PredictFn,
    image: jax.Array,
    out_hw: Sequence[int],
    *,
    num_classes: int,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    mode: str = "slide",
    class_chunk: int = 0,
    confidence: bool = False,
) -> tuple[jax.Array, jax.Array | None]:
    """Labels (and confidence) at the original size for one image, traceable.

    `slide_inference` + `tiles.resize_to_labels`; when 0 < class_chunk < N, the same
    computation `class_chunk` classes at a time: the window logits are kept at the feature
    resolution and no [H, W, N] array exists (an 11K-class vocabulary at 512 x 683 would need
    16 GB).

    Args:
      predict_fn, num_classes, crop, stride, mode: see `slide_inference`.
      image: float32 [H, W, 3], resized and normalised.
      out_hw: original (H0, W0).
      class_chunk: classes per chunk; 0 = all at once.
      confidence: also return the softmax maximum, resized (see `tiles.resize_to_labels`).

    Returns:
      int32 [H0, W0] labels and float32 [H0, W0] confidence (or None).
    """
    if not 0 < class_chunk < num_classes:
        logits = slide_inference(
            predict_fn, image, num_classes=num_classes, crop=crop, stride=stride, mode=mode
        )
        return tiles.resize_to_labels(logits, out_hw, confidence)
    image = jnp.asarray(image, jnp.float32)
    h, w = image.shape[:2]
    if mode not in ("slide", "whole"):
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    # "whole" is one window over the image: resized to it and divided by a count of 1.
    windows = slide_windows(h, w, crop, stride) if mode == "slide" else [(0, h, 0, w)]
    parts = []
    for y1, y2, x1, x2 in windows:
        hw = (y2 - y1, x2 - x1)
        logits = checked(predict_fn(crop_window(image, y1, x1, hw=hw)), 1, num_classes)
        parts.append((logits[0].astype(jnp.float32), y1, x1, hw))
    ((_, rows, cols),) = tiles.tile_grid((h, w), out_hw)

    def accumulate(start):
        acc = jnp.zeros((h, w, class_chunk), jnp.float32)
        count = jnp.zeros((h, w), jnp.float32)
        for logits, y1, x1, hw in parts:
            acc, count = add_window(
                acc, count, logits[..., start : start + class_chunk], y1, x1, hw
            )
        return acc, count

    ((label, conf),) = class_chunks.merge(
        accumulate,
        [(rows, cols)],
        num_classes=num_classes,
        chunk=class_chunk,
        confidence=confidence,
    )
    return tiles.assemble(label, out_hw), None if conf is None else tiles.assemble(conf, out_hw)
