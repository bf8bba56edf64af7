"""The final resize of sliding-window inference (SPEC 7.2): bilinear, in gathered output tiles.

Labels are the argmax of the logits resized to the original size. Resizing [H, W, N] logits to
[H0, W0, N] at once would be the largest array of evaluation, and a program per original size;
instead each T x T output tile gathers its two bilinear taps per axis (`interp.bilinear_taps`)
from the accumulator, so no program depends on the original size and only [T, T, N] exists.
`resize_to_labels` is the whole-image form of the same two-tap sum.
"""

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from larvseg_jax.interp import bilinear_taps

TILE = 32  # output tile side of the final resize
TILES_PER_CALL = 8  # tiles resized per call of the tile program


def taps(n_in: int, n_out: int, start: int, size: int) -> np.ndarray:
    """[4, size] (i0, i1, w0, w1) of output indices start..start+size-1, as float32 rows; the
    indices past n_out read index 0 with weight 0 (tile padding)."""
    i0, i1, w0, w1 = bilinear_taps(n_in, n_out)
    out = np.zeros((4, size), np.float32)
    stop = min(start + size, n_out)
    for row, values in enumerate((i0, i1, w0, w1)):
        out[row, : stop - start] = values[start:stop]
    return out


def two_tap(values_at, rows: jax.Array, cols: jax.Array) -> jax.Array:
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


def labels_and_confidence(acc, count, rows, cols, confidence: bool):
    """Labels (argmax of the resized logits) and, optionally, the resized softmax maximum at the
    tap grid; acc [H, W, N] summed logits and count [H, W] windows, or count None (logits)."""
    # The division happens at the gathered pixels only: padding (count 0) is never read.

    def logits_at(r, c):
        v = acc[r, c]
        return v if count is None else v / count[r, c][..., None]

    labels = jnp.argmax(two_tap(logits_at, rows, cols), axis=-1).astype(jnp.int32)
    if not confidence:
        return labels, None

    def top_probability_at(r, c):
        return jax.nn.softmax(logits_at(r, c), axis=-1).max(-1)

    return labels, two_tap(top_probability_at, rows, cols)


@functools.partial(jax.jit, static_argnames=("confidence",))
def resize_tiles(acc, count, rows, cols, *, confidence):
    """Tiles [K] of the resize: rows, cols [K, 4, T] -> labels [K, T, T] (+ confidence)."""
    return lax.map(
        lambda rc: labels_and_confidence(acc, count, rc[0], rc[1], confidence), (rows, cols)
    )


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
    rows, cols = jnp.asarray(taps(h, h0, 0, h0)), jnp.asarray(taps(w, w0, 0, w0))
    return labels_and_confidence(logits, None, rows, cols, confidence)


def tile_grid(
    in_hw: Sequence[int], out_hw: Sequence[int], *, transposed: bool = False, per_call: int = 0
) -> list[tuple[list[tuple[int, int]], np.ndarray, np.ndarray]]:
    """The output tiles of resizing `in_hw` to `out_hw`, grouped into calls.

    Args:
      in_hw: (H, W) of the image the logits were accumulated for.
      out_hw: original (H0, W0).
      transposed: the accumulator holds the image transposed (rows and taps swap).
      per_call: tiles per call (the last call padded with repeats of its last tile); 0 = all
        tiles in one call.

    Returns:
      [(corners [(r, c)] of the call's real tiles, rows [K, 4, T], cols [K, 4, T])], numpy.
    """
    (h, w), (h0, w0) = in_hw, out_hw
    corners = [(r, c) for r in range(0, h0, TILE) for c in range(0, w0, TILE)]
    per_call = per_call or len(corners)
    calls = []
    for start in range(0, len(corners), per_call):
        chunk = corners[start : start + per_call]
        chunk = chunk + [chunk[-1]] * (per_call - len(chunk))
        rows = np.stack([taps(h, h0, r, TILE) for r, _ in chunk])
        cols = np.stack([taps(w, w0, c, TILE) for _, c in chunk])
        if transposed:  # the accumulator's rows are the image's columns
            rows, cols = cols, rows
        calls.append((corners[start : start + per_call], rows, cols))
    return calls


def assemble(tiles: jax.Array, out_hw: Sequence[int]) -> jax.Array:
    """[K, T, T, ...] tiles of one call covering the whole output (row-major corners, as
    `tile_grid` with per_call=0) -> [H0, W0, ...]. Traceable."""
    h0, w0 = int(out_hw[0]), int(out_hw[1])
    nr, nc = -(-h0 // TILE), -(-w0 // TILE)
    rest = tiles.shape[3:]
    grid = tiles.reshape(nr, nc, TILE, TILE, *rest).swapaxes(1, 2)
    return grid.reshape(nr * TILE, nc * TILE, *rest)[:h0, :w0]
