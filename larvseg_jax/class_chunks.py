"""Class chunks: labels and confidence over a vocabulary too large for one [H, W, N] array.

Large vocabularies (the 11K-21K ImageNet classes): an [H, W, N] accumulator would not fit (17 GB
for a 512 x 768 image at 11K classes). Callers accumulate `chunk` classes at a time and merge
each chunk here: per output pixel the best resized logit so far and its class (ties to the
lower class id, as argmax), and per input pixel the running softmax statistics (max, sum of
exponentials), whose 1 / sum is the confidence. The labels equal the unchunked argmax; the
confidence equals it to float rounding. The last chunk starts early so that every chunk has the
same width (one program) and ignores the classes its neighbour owns.
"""

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax

from larvseg_jax import tiles


def starts(num_classes: int, chunk: int) -> list[tuple[int, int, int]]:
    """[(c0, c_end, start)]: the classes c0..c_end-1 each chunk owns and the first class of the
    `chunk` it reads."""
    return [
        (c0, min(c0 + chunk, num_classes), min(c0, num_classes - chunk))
        for c0 in range(0, num_classes, chunk)
    ]


def owned(start: jax.Array, c0: jax.Array, c_end: jax.Array, chunk: int) -> jax.Array:
    """[chunk] bool: which of the classes start..start+chunk-1 a chunk owns (c0..c_end-1); the
    last chunk starts early so that `chunk` classes fit and re-reads some of its neighbour's."""
    ids = start + jnp.arange(chunk)
    return (ids >= c0) & (ids < c_end)


@functools.partial(jax.jit, donate_argnums=(7, 8))
def chunk_labels(acc, count, rows, cols, start, c0, c_end, best, label):
    """Tiles [K] of one class chunk: updates the running best resized logit and its class
    (strictly greater wins, so ties go to the lower class id, as argmax)."""
    mine = owned(start, c0, c_end, acc.shape[-1])

    def tile(args):
        r, c, best, label = args

        def logits_at(i, j):
            return acc[i, j] / count[i, j][..., None]

        values = jnp.where(mine, tiles.two_tap(logits_at, r, c), -jnp.inf)
        top = values.max(-1)
        better = top > best
        ids = (start + jnp.argmax(values, axis=-1)).astype(jnp.int32)
        return jnp.where(better, top, best), jnp.where(better, ids, label)

    return lax.map(tile, (rows, cols, best, label))


@functools.partial(jax.jit, donate_argnums=(5, 6))
def softmax_stats(acc, count, start, c0, c_end, top, total):
    """Merges one chunk into the per-input-pixel softmax statistics: max logit `top` and
    sum of exp(logit - top) `total` ([Hb, Wb]; padding pixels stay finite)."""
    mine = owned(start, c0, c_end, acc.shape[-1])
    logits = jnp.where(mine, acc / jnp.maximum(count, 1.0)[..., None], -jnp.inf)
    chunk_top = logits.max(-1)
    new_top = jnp.maximum(top, chunk_top)
    chunk_total = jnp.exp(logits - chunk_top[..., None]).sum(-1)
    total = total * jnp.exp(top - new_top) + chunk_total * jnp.exp(chunk_top - new_top)
    return new_top, total


@jax.jit
def confidence_tiles(total, rows, cols):
    """Tiles [K] of the resized softmax maximum, which is 1 / total at each input pixel."""
    probability = 1.0 / total
    return lax.map(
        lambda rc: tiles.two_tap(lambda i, j: probability[i, j], rc[0], rc[1]), (rows, cols)
    )


def merge(
    accumulate: Callable[[int], tuple[jax.Array, jax.Array]],
    calls: Sequence[tuple[jax.Array, jax.Array]],
    *,
    num_classes: int,
    chunk: int,
    confidence: bool,
) -> list[tuple[jax.Array, jax.Array | None]]:
    """Labels (and confidence) of one image's output tiles, one class chunk at a time.

    Args:
      accumulate: start -> the image's accumulator of classes start..start+chunk-1
        [Hb, Wb, chunk] and its window count [Hb, Wb] (how callers sum their windows differs:
        one window at a time, or a batch's windows at once). The window count is summed again
        with each chunk: 1/chunk of the accumulation's work, not worth a second program.
      calls: per resize call, the tile taps (rows, cols) of `tiles.tile_grid`.
      num_classes, chunk: N and the classes per chunk (< N).
      confidence: also the resized softmax maximum.

    Returns:
      per call, int32 [K, TILE, TILE] labels and float32 [K, TILE, TILE] confidence (or None).
    """
    best = [jnp.full((rows.shape[0], tiles.TILE, tiles.TILE), -jnp.inf) for rows, _ in calls]
    label = [jnp.zeros(b.shape, jnp.int32) for b in best]
    top = total = None
    for c0, c_end, start in starts(num_classes, chunk):
        acc, count = accumulate(start)
        for k, (rows, cols) in enumerate(calls):
            best[k], label[k] = chunk_labels(
                acc, count, rows, cols, start, c0, c_end, best[k], label[k]
            )
        if confidence:
            if top is None:
                top, total = jnp.full(count.shape, -jnp.inf), jnp.zeros(count.shape)
            top, total = softmax_stats(acc, count, start, c0, c_end, top, total)
    return [
        (label[k], confidence_tiles(total, rows, cols) if confidence else None)
        for k, (rows, cols) in enumerate(calls)
    ]
