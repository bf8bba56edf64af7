"""Sliding-window inference (SPEC 7.2) for images of every size, compiled a handful of times.

Evaluation and `segment` meet images of many sizes. Compiled per image shape (the model per window
shape, the accumulation per resized size, the final resize per original size), evaluating 64
tiny images took 256 XLA compilations. `SlideRunner` instead:

- packs the crop-size windows of consecutive images into one [B, crop, crop, 3] batch per device
  (the last one padded): one model program, and results independent of the device count;
- accumulates each image's window logits in arrays padded up to a multiple of crop / 2: one
  accumulation program per padded size (a bucket; an A150 image is 512 x 512..2048);
- resizes back to the original size in fixed T x T output tiles that gather the two bilinear taps
  per axis (`interp.bilinear_taps`), so no program depends on the original size, and the
  [H0, W0, N] resized logits never exist at once.

The numbers are those of the per-image path (`slide_inference` + `resize_to_labels`, the SPEC 7.2
reference): windows, accumulation and division are the same operations; the final resize is the
same two-tap sum. Images with a window smaller than the crop (a side shorter than the crop after
the evaluation resize) and "whole" mode take the per-image path, compiled per shape.

Large vocabularies (`class_chunk` < N, e.g. the 11K-21K ImageNet classes): the accumulator
[Hb, Wb, N] would not fit (17 GB for a 512 x 768 bucket at 11K classes). The runner then keeps
each image's window logits at the feature resolution (32 x 32 x N per window) and accumulates and
resizes `class_chunk` classes at a time, keeping per output pixel the best value and class so far
and per input pixel the running softmax statistics (max, sum of exponentials) for the
confidence. The labels are the unchunked argmax (same per-class arithmetic, ties to the lower
class id); the confidence equals it to float rounding.
"""

import collections
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from larvseg_jax.interp import bilinear_taps, resize_bilinear

# Images [B, h, w, 3] -> mask-normed logits [B, h', w', N], computed on the device that holds
# the images.
PredictFn = Callable[[jax.Array], jax.Array]
TILE = 32  # output tile side of the final resize
TILES_PER_CALL = 8  # tiles resized per call of the tile program


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


# ---- the per-image path (reference, "whole" mode, windows smaller than the crop, export) ----


@functools.partial(jax.jit, static_argnames=("hw",))
def _crop(image: jax.Array, y1: jax.Array, x1: jax.Array, *, hw: tuple[int, int]) -> jax.Array:
    # Dynamic offsets: one compilation per window size, not per window position.
    return lax.dynamic_slice(image, (y1, x1, 0), (*hw, image.shape[-1]))[None]


def _add_window(acc, count, logits, y1, x1, hw, transposed=False):
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
    return _add_window(acc, count, logits[0], y1, x1, hw)


@jax.jit
def _divide(acc, count):
    return acc / count[..., None]


@functools.partial(jax.jit, static_argnames=("hw",))
def _resize_one(logits, *, hw):
    return resize_bilinear(logits[0], hw)


def _checked(logits: jax.Array, batch: int, num_classes: int) -> jax.Array:
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
        return _resize_one(_checked(predict_fn(image[None]), 1, num_classes), hw=(height, width))
    if mode != "slide":
        raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
    acc = jnp.zeros((height, width, num_classes), jnp.float32, device=device)
    count = jnp.zeros((height, width), jnp.float32, device=device)
    for y1, y2, x1, x2 in slide_windows(height, width, crop, stride):
        hw = (y2 - y1, x2 - x1)
        logits = _checked(predict_fn(_crop(image, y1, x1, hw=hw)), 1, num_classes)
        acc, count = _accumulate(acc, count, logits.astype(jnp.float32), y1, x1, hw=hw)
    return _divide(acc, count)


# ---- the final resize: two bilinear taps per axis, gathered ----


def _taps(n_in: int, n_out: int, start: int, size: int) -> np.ndarray:
    """[4, size] (i0, i1, w0, w1) of output indices start..start+size-1, as float32 rows; the
    indices past n_out read index 0 with weight 0 (tile padding)."""
    i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
    out = np.zeros((4, size), np.float32)
    stop = min(start + size, n_out)
    for row, taps in enumerate((i0, i1, w0, w1)):
        out[row, : stop - start] = taps[start:stop]
    return out


def _two_tap(values_at, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Bilinear resize at a grid of output points: rows [4, R], cols [4, C] taps; `values_at`
    (r [R, 1], c [1, C]) -> [R, C, ...] values of the source there.

    The four corner terms are summed as (00 + 11) + (01 + 10), an order that swapping rows and
    columns leaves unchanged, so a transposed source gives the transposed result bit for bit.
    It equals `interp.resize_bilinear` (rows, then columns) up to float rounding.
    """
    r0, r1 = rows[0].astype(jnp.int32)[:, None], rows[1].astype(jnp.int32)[:, None]
    c0, c1 = cols[0].astype(jnp.int32)[None, :], cols[1].astype(jnp.int32)[None, :]
    v00, v10, v01, v11 = values_at(r0, c0), values_at(r1, c0), values_at(r0, c1), values_at(r1, c1)
    extra = (1,) * (v00.ndim - 2)
    rw0, rw1 = rows[2].reshape(-1, 1, *extra), rows[3].reshape(-1, 1, *extra)
    cw0, cw1 = cols[2].reshape(1, -1, *extra), cols[3].reshape(1, -1, *extra)
    return (v00 * (rw0 * cw0) + v11 * (rw1 * cw1)) + (v01 * (rw0 * cw1) + v10 * (rw1 * cw0))


def _labels_and_confidence(acc, count, rows, cols, confidence: bool):
    """Labels (argmax of the resized logits) and, optionally, the resized softmax maximum at the
    tap grid; acc [H, W, N] summed logits and count [H, W] windows, or count None (logits)."""
    # The division happens at the gathered pixels only: padding (count 0) is never read.

    def logits_at(r, c):
        v = acc[r, c]
        return v if count is None else v / count[r, c][..., None]

    labels = jnp.argmax(_two_tap(logits_at, rows, cols), axis=-1).astype(jnp.int32)
    if not confidence:
        return labels, None

    def top_probability_at(r, c):
        return jax.nn.softmax(logits_at(r, c), axis=-1).max(-1)

    return labels, _two_tap(top_probability_at, rows, cols)


@functools.partial(jax.jit, static_argnames=("confidence",))
def _resize_tiles(acc, count, rows, cols, *, confidence):
    """Tiles [K] of the resize: rows, cols [K, 4, T] -> labels [K, T, T] (+ confidence)."""
    return lax.map(
        lambda rc: _labels_and_confidence(acc, count, rc[0], rc[1], confidence), (rows, cols)
    )


# ---- class chunks (large vocabularies) ----


def _owned(start: jax.Array, c0: jax.Array, c_end: jax.Array, chunk: int) -> jax.Array:
    """[chunk] bool: which of the classes start..start+chunk-1 a chunk owns (c0..c_end-1); the
    last chunk starts early so that `chunk` classes fit and re-reads some of its neighbour's."""
    ids = start + jnp.arange(chunk)
    return (ids >= c0) & (ids < c_end)


@functools.partial(jax.jit, donate_argnums=(7, 8))
def _chunk_labels(acc, count, rows, cols, start, c0, c_end, best, label):
    """Tiles [K] of one class chunk: updates the running best resized logit and its class
    (strictly greater wins, so ties go to the lower class id, as argmax)."""
    owned = _owned(start, c0, c_end, acc.shape[-1])

    def tile(args):
        r, c, best, label = args

        def logits_at(i, j):
            return acc[i, j] / count[i, j][..., None]

        values = jnp.where(owned, _two_tap(logits_at, r, c), -jnp.inf)
        top = values.max(-1)
        better = top > best
        ids = (start + jnp.argmax(values, axis=-1)).astype(jnp.int32)
        return jnp.where(better, top, best), jnp.where(better, ids, label)

    return lax.map(tile, (rows, cols, best, label))


@functools.partial(jax.jit, donate_argnums=(5, 6))
def _chunk_softmax_stats(acc, count, start, c0, c_end, top, total):
    """Merges one chunk into the per-input-pixel softmax statistics: max logit `top` and
    sum of exp(logit - top) `total` ([Hb, Wb]; padding pixels stay finite)."""
    owned = _owned(start, c0, c_end, acc.shape[-1])
    logits = jnp.where(owned, acc / jnp.maximum(count, 1.0)[..., None], -jnp.inf)
    chunk_top = logits.max(-1)
    new_top = jnp.maximum(top, chunk_top)
    chunk_total = jnp.exp(logits - chunk_top[..., None]).sum(-1)
    total = total * jnp.exp(top - new_top) + chunk_total * jnp.exp(chunk_top - new_top)
    return new_top, total


@jax.jit
def _confidence_tiles(total, rows, cols):
    """Tiles [K] of the resized softmax maximum, which is 1 / total at each input pixel."""
    probability = 1.0 / total
    return lax.map(lambda rc: _two_tap(lambda i, j: probability[i, j], rc[0], rc[1]), (rows, cols))


def resize_to_labels(
    logits: jax.Array, out_hw: Sequence[int], confidence: bool = False
) -> tuple[jax.Array, jax.Array | None]:
    """Labels at the original size: argmax of the bilinearly resized logits (SPEC 7.2; the
    official softmax before the argmax does not change it). Traceable, shapes static.

    Args:
      logits: [H, W, N].
      out_hw: original (H0, W0).
      confidence: also return the softmax maximum at the input size, resized bilinearly.

    Returns:
      int32 [H0, W0] labels and float32 [H0, W0] confidence (or None).
    """
    (h, w), (h0, w0) = logits.shape[:2], (int(out_hw[0]), int(out_hw[1]))
    rows, cols = jnp.asarray(_taps(h, h0, 0, h0)), jnp.asarray(_taps(w, w0, 0, w0))
    return _labels_and_confidence(logits, None, rows, cols, confidence)


# ---- the batched runner ----


@functools.partial(jax.jit, static_argnames=("shape", "num_classes"))
def _zeros(*, shape, num_classes):
    return jnp.zeros((*shape, num_classes), jnp.float32), jnp.zeros(shape, jnp.float32)


@functools.partial(jax.jit, static_argnames=("hw",), donate_argnums=(0, 1))
def _accumulate_batch(acc, count, logits, first, num, y1, x1, transposed, start=0, *, hw):
    """Adds windows first..first+num-1 of a batch's logits [B, h', w', N] into one image's
    accumulators, window k at (y1[k], x1[k]) (bounds are data: one program per bucket); an
    accumulator of C < N classes takes the classes start..start+C-1 (class chunks)."""
    classes = acc.shape[-1]

    def body(k, carry):
        b = first + k
        window = lax.dynamic_index_in_dim(logits, b, keepdims=False)
        window = lax.dynamic_slice_in_dim(window, start, classes, axis=-1).astype(jnp.float32)
        return _add_window(*carry, window, y1[b], x1[b], hw, transposed)

    return lax.fori_loop(0, num, body, (acc, count))


@dataclasses.dataclass(eq=False)
class _Image:
    """One image on its way through the runner."""

    tag: Any
    image: np.ndarray  # float32 [H, W, 3], resized and normalised
    out_hw: tuple[int, int]
    device: Any
    windows: list
    queued: int = 0  # windows put in a batch so far
    acc: Any = None  # padded [Hb, Wb, N] sum and [Hb, Wb] count, until resized
    count: Any = None
    transposed: bool = False  # stored as [W, H] (portrait image, square crop)
    tiles: list = dataclasses.field(default_factory=list)  # resize outputs, on the device
    # Class-chunked runs: (logits [B, h', w', N], first, num, y1 [B], x1 [B], window hw) parts
    # of the model outputs holding this image's windows, kept until its last window is in.
    parts: list = dataclasses.field(default_factory=list)
    after: int = -1  # its device's work count when its resize was dispatched


class SlideRunner:
    """Streams images through sliding-window inference, batched over windows, images and devices.

    Image i goes to devices[i % n]; each device fills its own window batch from its images, so
    devices work independently (asynchronous dispatch) and the host decodes the next images while
    they compute. Results come back in input order; an image is read back only once a later batch
    is queued on its device.
    """

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        num_classes: int,
        crop: int | Sequence[int],
        stride: int | Sequence[int],
        mode: str = "slide",
        batch: int = 8,
        devices: Sequence[jax.Device] | None = None,
        confidence: bool = False,
        full_batches: bool = True,
        class_chunk: int = 0,
    ):
        """
        Args:
          predict_fn: see `PredictFn`; it must run on the device that holds its input.
          num_classes: N.
          crop, stride, mode: see `slide_inference`.
          batch: windows per model call and device.
          devices: round-robin targets; default all local devices.
          confidence: also return the softmax maximum per pixel (see `resize_to_labels`).
          full_batches: pad the last, partial batch of each device to `batch` windows, so every
            model call is the same program and a window's logits do not depend on which
            windows share its call or how many devices there are (results are bit-identical
            across device counts); False pads to a power of two instead (less work for one
            small image, as in the demo; a float-rounding difference may then flip a pixel
            where two classes tie).
          class_chunk: accumulate and resize this many classes at a time when N is larger
            (large vocabularies; see the module docstring); 0 = all classes at once.
        """
        if mode not in ("slide", "whole"):
            raise ValueError(f"mode must be 'slide' or 'whole', got {mode!r}")
        if batch < 1:
            raise ValueError(f"batch must be at least 1, got {batch}")
        self.predict_fn, self.num_classes = predict_fn, num_classes
        self.crop, self.stride, self.mode = _pair(crop), _pair(stride), mode
        self.batch, self.confidence, self.full_batches = int(batch), confidence, full_batches
        if class_chunk < 0:
            raise ValueError(f"class_chunk must be 0 (off) or positive, got {class_chunk}")
        self.class_chunk = int(class_chunk) if 0 < class_chunk < num_classes else 0
        self.devices = list(jax.local_devices() if devices is None else devices)
        self._buffers = {d: [] for d in self.devices}  # (image, window index) waiting per device
        self._work = {d: 0 for d in self.devices}  # batches and per-image calls per device
        self.windows_run = 0  # windows through the batched model calls, padding included

    def run(
        self, items: Iterable[tuple[Any, np.ndarray, Sequence[int]]]
    ) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        """(tag, image float32 [H, W, 3] resized and normalised, original (H0, W0)) ->
        (tag, int32 [H0, W0] labels, float32 [H0, W0] confidence or None), in input order."""
        order: collections.deque[_Image] = collections.deque()
        limit = len(self.devices) * (self.batch + 2)
        for i, (tag, image, out_hw) in enumerate(items):
            device = self.devices[i % len(self.devices)]
            item = _Image(tag, np.asarray(image, np.float32), _pair(out_hw), device, [])
            order.append(item)
            self._submit(item)
            while order and (self._read_ahead(order[0]) or len(order) > limit):
                yield self._read(order.popleft())
        for device in self.devices:
            self._dispatch(device)
        while order:
            yield self._read(order.popleft())

    def _read_ahead(self, item: _Image) -> bool:
        return item.tiles != [] and self._work[item.device] > item.after

    def _submit(self, item: _Image) -> None:
        h, w = item.image.shape[:2]
        windows = slide_windows(h, w, self.crop, self.stride) if self.mode == "slide" else []
        if self.mode == "whole" or any(
            (y2 - y1, x2 - x1) != self.crop for y1, y2, x1, x2 in windows
        ):
            self._work[item.device] += 1
            if self.class_chunk:
                self._predict_alone(item, windows or [(0, h, 0, w)])
                return
            logits = slide_inference(
                self.predict_fn,
                item.image,
                num_classes=self.num_classes,
                crop=self.crop,
                stride=self.stride,
                mode=self.mode,
                device=item.device,
            )
            self._resize(item, logits, None)
            return
        item.windows = windows
        # Portrait images accumulate transposed (square crops): half the bucket shapes.
        item.transposed = self.crop[0] == self.crop[1] and item.image.shape[0] > item.image.shape[1]
        for k in range(len(windows)):
            self._buffers[item.device].append((item, k))
            if len(self._buffers[item.device]) == self.batch:
                self._dispatch(item.device)

    def _dispatch(self, device) -> None:
        """Runs the model on `device`'s buffered windows and adds them to their images."""
        buffer, self._buffers[device] = self._buffers[device], []
        if not buffer:
            return
        size = self.batch
        if not self.full_batches:
            size = min(self.batch, 1 << (len(buffer) - 1).bit_length())  # the tail to 2**k
        windows = np.zeros((size, *self.crop, 3), np.float32)
        y1, x1 = np.zeros(size, np.int32), np.zeros(size, np.int32)
        for b, (item, k) in enumerate(buffer):
            y1[b], _, x1[b], _ = item.windows[k]
            windows[b] = item.image[y1[b] : y1[b] + self.crop[0], x1[b] : x1[b] + self.crop[1]]
        logits = _checked(self.predict_fn(jax.device_put(windows, device)), size, self.num_classes)
        self.windows_run += size
        self._work[device] += 1
        y1, x1 = jax.device_put((y1, x1), device)
        b = 0
        while b < len(buffer):
            item = buffer[b][0]
            num = 1
            while b + num < len(buffer) and buffer[b + num][0] is item:
                num += 1
            if self.class_chunk:
                item.parts.append((logits, b, num, y1, x1, self.crop))
            else:
                if item.acc is None:
                    with jax.default_device(device):
                        zeros = _zeros(shape=self._bucket(item), num_classes=self.num_classes)
                    # Committed, as the accumulation's outputs are: one program, not two.
                    item.acc, item.count = jax.device_put(zeros, device)
                item.acc, item.count = _accumulate_batch(
                    item.acc, item.count, logits, b, num, y1, x1, item.transposed, hw=self.crop
                )
            item.queued += num
            if item.queued == len(item.windows):
                if self.class_chunk:
                    self._resize_chunked(item)
                else:
                    self._resize(item, item.acc, item.count)
                item.acc = item.count = None
            b += num

    def _bucket(self, item: _Image) -> tuple[int, int]:
        """The padded accumulator size: each side (swapped for a transposed image) rounded up to
        crop x 1, 1.5, 2, 3, 4, 6, ... (at most 1/3 wasted), so an A150 evaluation at 512 meets
        about five sizes."""
        h, w = item.image.shape[:2]
        if item.transposed:
            h, w = w, h
        return _bucket_side(h, self.crop[0]), _bucket_side(w, self.crop[1])

    def _tile_taps(self, item: _Image) -> list:
        """[(corners, rows [K, 4, T], cols [K, 4, T])]: the image's output tiles in calls of
        TILES_PER_CALL (the last padded with repeats), taps on its device."""
        (h, w), (h0, w0) = item.image.shape[:2], item.out_hw
        corners = [(r, c) for r in range(0, h0, TILE) for c in range(0, w0, TILE)]
        calls = []
        for start in range(0, len(corners), TILES_PER_CALL):
            chunk = corners[start : start + TILES_PER_CALL]
            chunk = chunk + [chunk[-1]] * (TILES_PER_CALL - len(chunk))
            rows = np.stack([_taps(h, h0, r, TILE) for r, _ in chunk])
            cols = np.stack([_taps(w, w0, c, TILE) for _, c in chunk])
            if item.transposed:  # the accumulator's rows are the image's columns
                rows, cols = cols, rows
            rows, cols = jax.device_put((rows, cols), item.device)
            calls.append((corners[start : start + TILES_PER_CALL], rows, cols))
        return calls

    def _resize(self, item: _Image, acc: jax.Array, count: jax.Array | None) -> None:
        """Dispatches the final resize of one image, TILES_PER_CALL tiles at a time."""
        for corners, rows, cols in self._tile_taps(item):
            out = _resize_tiles(acc, count, rows, cols, confidence=self.confidence)
            item.tiles.append((corners, out))
        item.after = self._work[item.device]

    def _predict_alone(self, item: _Image, windows: list) -> None:
        """Class-chunked per-image path ("whole" mode, windows smaller than the crop): one model
        call per window, kept as parts."""
        with jax.default_device(item.device):
            image = jax.device_put(item.image, item.device)
            for y1, y2, x1, x2 in windows:
                hw = (y2 - y1, x2 - x1)
                logits = _checked(self.predict_fn(_crop(image, y1, x1, hw=hw)), 1, self.num_classes)
                at = jax.device_put((np.int32([y1]), np.int32([x1])), item.device)
                item.parts.append((logits, 0, 1, *at, hw))
        self._resize_chunked(item)

    def _resize_chunked(self, item: _Image) -> None:
        """Accumulates and resizes `class_chunk` classes at a time, merging labels (and the
        softmax statistics of the confidence) across chunks; drops the kept window logits."""
        n, chunk, device = self.num_classes, self.class_chunk, item.device
        calls = self._tile_taps(item)
        shape = (len(calls), TILES_PER_CALL, TILE, TILE)
        with jax.default_device(device):
            best = [jnp.full(shape[1:], -jnp.inf, jnp.float32) for _ in calls]
            label = [jnp.zeros(shape[1:], jnp.int32) for _ in calls]
            bucket = self._bucket(item)
            top, total = jnp.full(bucket, -jnp.inf), jnp.zeros(bucket)
            for c0 in range(0, n, chunk):
                c_end, start = min(c0 + chunk, n), min(c0, n - chunk)
                acc, count = jax.device_put(_zeros(shape=bucket, num_classes=chunk), device)
                for logits, first, num, y1, x1, hw in item.parts:
                    acc, count = _accumulate_batch(
                        acc, count, logits, first, num, y1, x1, item.transposed, start, hw=hw
                    )
                for k, (_, rows, cols) in enumerate(calls):
                    best[k], label[k] = _chunk_labels(
                        acc, count, rows, cols, start, c0, c_end, best[k], label[k]
                    )
                if self.confidence:
                    top, total = _chunk_softmax_stats(acc, count, start, c0, c_end, top, total)
        for k, (corners, rows, cols) in enumerate(calls):
            conf = _confidence_tiles(total, rows, cols) if self.confidence else None
            item.tiles.append((corners, (label[k], conf)))
        item.parts = []
        item.after = self._work[item.device]

    def _read(self, item: _Image) -> tuple[Any, np.ndarray, np.ndarray | None]:
        """The only device-to-host transfer of an image: its tiles, assembled."""
        if not item.tiles:
            self._dispatch(item.device)  # its windows are still waiting for a full batch
        h0, w0 = item.out_hw
        labels = np.empty((h0, w0), np.int32)
        conf = np.empty((h0, w0), np.float32) if self.confidence else None
        for corners, (tile_labels, tile_conf) in item.tiles:
            tile_labels = np.asarray(tile_labels)
            tile_conf = None if tile_conf is None else np.asarray(tile_conf)
            if item.transposed:
                tile_labels = tile_labels.swapaxes(1, 2)
                tile_conf = None if tile_conf is None else tile_conf.swapaxes(1, 2)
            for k, (r, c) in enumerate(corners):
                th, tw = min(TILE, h0 - r), min(TILE, w0 - c)
                labels[r : r + th, c : c + tw] = tile_labels[k, :th, :tw]
                if conf is not None:
                    conf[r : r + th, c : c + tw] = tile_conf[k, :th, :tw]
        return item.tag, labels, conf


def _bucket_side(n: int, crop: int) -> int:
    """The smallest of crop x 1, 1.5, 2, 3, 4, 6, 8, ... that holds n."""
    k = 0
    while (size := math.ceil(crop * 2 ** (k // 2) * (1.5 if k % 2 else 1.0))) < n:
        k += 1
    return size
