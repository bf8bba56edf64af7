"""Batched sliding-window inference (SPEC 7.2) for images of every size, compiled a few times.

Evaluation and `segment` meet images of many sizes. Compiled per image shape (the model per window
shape, the accumulation per resized size, the final resize per original size), evaluating 64
tiny images took 256 XLA compilations. `SlideRunner` instead:

- packs the crop-size windows of consecutive images into one [B, crop, crop, 3] batch per device
  (the last one padded): one model program, and results independent of the device count;
- accumulates each image's window logits in arrays padded up to a multiple of crop / 2: one
  accumulation program per padded size (a bucket; an A150 image is 512 x 512..2048);
- resizes back to the original size in fixed output tiles (`tiles`), so no program depends on
  the original size.

The numbers are those of the per-image path (`slide_image`, the SPEC 7.2 reference): windows,
accumulation and division are the same operations; the final resize is the same two-tap sum.
Images with a window smaller than the crop (a side shorter than the crop after the evaluation
resize) and "whole" mode take the per-image path, compiled per shape.

Large vocabularies (`class_chunk` < N): the runner keeps each image's window logits at the
feature resolution (32 x 32 x N per window) and accumulates and resizes `class_chunk` classes at
a time, merged by `class_chunks`.
"""

import collections
import dataclasses
import functools
import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from larvseg_jax import class_chunks, tiles
from larvseg_jax.slide_image import (
    PredictFn,
    add_window,
    checked,
    crop_window,
    pair,
    slide_inference,
    slide_windows,
)


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
        return add_window(*carry, window, y1[b], x1[b], hw, transposed)

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
        self.crop, self.stride, self.mode = pair(crop), pair(stride), mode
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
            item = _Image(tag, np.asarray(image, np.float32), pair(out_hw), device, [])
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
        logits = checked(self.predict_fn(jax.device_put(windows, device)), size, self.num_classes)
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
        """`tiles.tile_grid` of the image in calls of TILES_PER_CALL, taps on its device."""
        grid = tiles.tile_grid(
            item.image.shape[:2],
            item.out_hw,
            transposed=item.transposed,
            per_call=tiles.TILES_PER_CALL,
        )
        return [(corners, *jax.device_put((r, c), item.device)) for corners, r, c in grid]

    def _resize(self, item: _Image, acc: jax.Array, count: jax.Array | None) -> None:
        """Dispatches the final resize of one image, TILES_PER_CALL tiles at a time."""
        for corners, rows, cols in self._tile_taps(item):
            out = tiles.resize_tiles(acc, count, rows, cols, confidence=self.confidence)
            item.tiles.append((corners, out))
        item.after = self._work[item.device]

    def _predict_alone(self, item: _Image, windows: list) -> None:
        """Class-chunked per-image path ("whole" mode, windows smaller than the crop): one model
        call per window, kept as parts."""
        with jax.default_device(item.device):
            image = jax.device_put(item.image, item.device)
            for y1, y2, x1, x2 in windows:
                hw = (y2 - y1, x2 - x1)
                logits = checked(
                    self.predict_fn(crop_window(image, y1, x1, hw=hw)), 1, self.num_classes
                )
                at = jax.device_put((np.int32([y1]), np.int32([x1])), item.device)
                item.parts.append((logits, 0, 1, *at, hw))
        self._resize_chunked(item)

    def _resize_chunked(self, item: _Image) -> None:
        """Accumulates and resizes `class_chunk` classes at a time, merging labels (and the
        softmax statistics of the confidence) across chunks; drops the kept window logits."""
        calls = self._tile_taps(item)
        bucket = self._bucket(item)

        def accumulate(start):
            acc, count = jax.device_put(
                _zeros(shape=bucket, num_classes=self.class_chunk), item.device
            )
            for logits, first, num, y1, x1, hw in item.parts:
                acc, count = _accumulate_batch(
                    acc, count, logits, first, num, y1, x1, item.transposed, start, hw=hw
                )
            return acc, count

        with jax.default_device(item.device):
            merged = class_chunks.merge(
                accumulate,
                [(rows, cols) for _, rows, cols in calls],
                num_classes=self.num_classes,
                chunk=self.class_chunk,
                confidence=self.confidence,
            )
        item.tiles += [(corners, out) for (corners, _, _), out in zip(calls, merged, strict=True)]
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
                th, tw = min(tiles.TILE, h0 - r), min(tiles.TILE, w0 - c)
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
