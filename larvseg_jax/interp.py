"""PyTorch-compatible resizing of channel-last arrays (SPEC 1.1 pos-embed bicubic, 2.1, 12).

Every float resize is separable: one small interpolation matrix per spatial axis, built with numpy
at trace time (shapes are static) and applied with two einsums. That is exactly PyTorch's
`F.interpolate(..., align_corners=False)` without antialias, for up- and downsampling alike,
differentiable, and as fast as `jax.image.resize` (which also contracts dense weight matrices).
`jax.image.resize` itself is not used: its cubic kernel is A=-0.5 (PyTorch: -0.75) and it
antialiases when downsampling.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

_CUBIC_A = -0.75  # PyTorch's bicubic coefficient


def _bilinear_source(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyTorch's 1-D linear interpolation (half-pixel, clamped): (i0, i1, lam) per output index."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5
    # PyTorch clamps negative source coordinates to 0 for linear modes (not for cubic).
    src = np.maximum(src, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    return i0, i1, src - i0


@functools.lru_cache(maxsize=256)
def _bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D linear interpolation (half-pixel, clamped)."""
    i0, i1, lam = _bilinear_source(n_in, n_out)
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - lam)
    np.add.at(m, (rows, i1), lam)  # i1 == i0 at the last row: both weights land on one pixel
    return m


@functools.lru_cache(maxsize=256)
def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, ...]:
    """The two nonzero entries per row of `_bilinear_matrix`: int32 (i0, i1), float32 (w0, w1).

    Gathering two taps per axis resizes to any size in O(output) work with index arrays as
    data, so one compiled program serves every output size (see `slide`). Where i0 == i1 the
    summed weight sits in w0 and w1 is 0, as in the matrix.
    """
    i0, i1, lam = _bilinear_source(n_in, n_out)
    same = i0 == i1
    w0 = np.where(same, (1.0 - lam) + lam, 1.0 - lam)
    w1 = np.where(same, 0.0, lam)
    return (
        i0.astype(np.int32),
        i1.astype(np.int32),
        w0.astype(np.float32),
        w1.astype(np.float32),
    )


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """[..., 4] weights for taps i0-1, i0, i0+1, i0+2 at fractional offset t (PyTorch, A=-0.75)."""
    a = _CUBIC_A

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


@functools.lru_cache(maxsize=256)
def _bicubic_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] weights of PyTorch's 1-D cubic interpolation (half-pixel, border clamp)."""
    scale = n_in / n_out
    src = (np.arange(n_out, dtype=np.float64) + 0.5) * scale - 0.5  # not clamped for cubic
    i0 = np.floor(src).astype(np.int64)
    w = _cubic_weights(src - i0)  # [n_out, 4]
    taps = np.clip(i0[:, None] + np.arange(-1, 3)[None, :], 0, n_in - 1)  # [n_out, 4]
    m = np.zeros((n_out, n_in), np.float64)
    np.add.at(m, (np.repeat(np.arange(n_out), 4), taps.ravel()), w.ravel())
    return m


def _separable(x: jax.Array, mh: np.ndarray, mw: np.ndarray) -> jax.Array:
    """Applies [H', H] and [W', W] matrices to x [..., H, W, C]."""
    x = jnp.asarray(x)  # numpy float64 becomes float32 unless x64 is on
    # Weights stay at least float32 (a bf16 matrix would round 1/3-style weights); for float64
    # inputs (x64 parity tests) they stay float64.
    wdtype = jnp.promote_types(x.dtype, jnp.float32)
    mh = jnp.asarray(mh, wdtype)
    mw = jnp.asarray(mw, wdtype)
    # HIGHEST: on GPU the default float32 matmul may round through TF32, which would break
    # parity with PyTorch; these contractions are tiny next to the network.
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,...hwc->...owc", mh, x.astype(wdtype), precision=hi)
    y = jnp.einsum("pw,...owc->...opc", mw, y, precision=hi)
    return y.astype(x.dtype)


def _resize(x: jax.Array, out_hw: tuple[int, int], matrix) -> jax.Array:
    """[..., H, W, C] -> [..., H', W', C] with `matrix(n_in, n_out)` per axis; same size: x."""
    h, w = x.shape[-3:-1]
    out_h, out_w = (int(s) for s in out_hw)
    if (h, w) == (out_h, out_w):
        return x
    return _separable(x, matrix(h, out_h), matrix(w, out_w))


def resize_bilinear(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch `F.interpolate(mode="bilinear", align_corners=False)` on channel-last arrays.

    No antialias, so downsampling reads the 2x2 neighbours of each half-pixel source point, as
    PyTorch does (SPEC 12: logits resized to the original image size may be a downsample).

    Args:
      x: [..., H, W, C] float.
      out_hw: (H', W') static output size.

    Returns:
      [..., H', W', C] in x's dtype.
    """
    return _resize(x, out_hw, _bilinear_matrix)


def resize_bilinear_adjoint(x: jax.Array, in_hw: tuple[int, int]) -> jax.Array:
    """Transpose of `resize_bilinear` from `in_hw`: [..., H', W', C] -> [..., h, w, C].

    <resize_bilinear(z), y> == <z, resize_bilinear_adjoint(y)>: a weighted pooling of the
    upsampled z equals a pooling of z with the weights pulled back, without the upsampled array.
    """
    h, w = (int(s) for s in in_hw)
    out_h, out_w = x.shape[-3:-1]
    if (h, w) == (out_h, out_w):
        return x
    return _separable(x, _bilinear_matrix(h, out_h).T, _bilinear_matrix(w, out_w).T)


def resize_bicubic_torch(x: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch `F.interpolate(mode="bicubic", align_corners=False)` on channel-last arrays.

    Cubic convolution with A=-0.75, half-pixel centres, taps clamped at the border, no antialias
    (SPEC 1.1, 12).

    Args:
      x: [..., H, W, C] float.
      out_hw: (H', W') static output size.

    Returns:
      [..., H', W', C] in x's dtype.
    """
    return _resize(x, out_hw, _bicubic_matrix)  # same size: weights (0, 1, 0, 0), identity


def resize_pos_embed(
    table: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int]
) -> jax.Array:
    """Bicubic resize of a position table's grid, keeping the class-token row (SPEC 1.1, 1.2).

    Args:
      table: [1, 1 + h*w, D] with the class-token row first and the grid row-major.
      old_grid: (h, w) of the stored table.
      new_grid: (h', w').

    Returns:
      [1, 1 + h'*w', D].
    """
    h, w = old_grid
    new_h, new_w = new_grid
    if table.shape[1] != 1 + h * w:
        raise ValueError(
            f"position table has {table.shape[1]} rows; grid {h}x{w} needs {1 + h * w}"
        )
    d = table.shape[-1]
    cls_row, grid = table[:, :1], table[:, 1:].reshape(1, h, w, d)
    grid = resize_bicubic_torch(grid, (new_h, new_w)).reshape(1, new_h * new_w, d)
    return jnp.concatenate([cls_row, grid], axis=1)


def downsample_labels(label: jax.Array, rate: int) -> jax.Array:
    """label [..., H, W] -> [..., ceil(H/rate), ceil(W/rate)]: stride subsampling (SPEC 2.1, 12).

    Equals PyTorch's nearest resize to (H/rate, W/rate) whenever rate divides H and W, since
    its source index floor(i*rate) is then exactly i*rate.
    """
    return label[..., ::rate, ::rate]


def _nearest_index(n_in: int, n_out: int) -> np.ndarray:
    if n_in == n_out:
        return np.arange(n_out)
    # PyTorch (CPU) computes the scale and the product in float32 before the floor; copying
    # that keeps rounding identical at non-integer ratios such as 33 -> 16.
    scale = np.float32(n_in) / np.float32(n_out)
    idx = np.floor(np.arange(n_out, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(idx, n_in - 1)


def resize_nearest_torch(label: jax.Array, out_hw: tuple[int, int]) -> jax.Array:
    """PyTorch `F.interpolate(mode="nearest")` on label maps [..., H, W] -> [..., H', W'].

    The source index is floor(i * H / H') (not half-pixel), e.g. 33 -> 16 reads rows 0, 2, ...
    """
    h, w = label.shape[-2:]
    rows = jnp.asarray(_nearest_index(h, int(out_hw[0])))
    cols = jnp.asarray(_nearest_index(w, int(out_hw[1])))
    return jnp.take(jnp.take(label, rows, axis=-2), cols, axis=-1)
