"""Torch-compatible resizes (models/interp.py) against golden h_interp_primitives and numpy loops."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import interp

BILINEAR_CASES = ("8to16", "8to64", "20to160", "5x7to13x11", "down_64to45x37")


@pytest.fixture(scope="module")
def golden_h(goldens_dir):
    json.loads((goldens_dir / "h_interp_primitives.json").read_text())  # the case is present
    return dict(np.load(goldens_dir / "h_interp_primitives.npz"))


def nhwc(x):  # torch (B, C, H, W) -> (B, H, W, C)
    return np.transpose(x, (0, 2, 3, 1))


def bilinear_loop(x, out_hw):
    """Per-pixel PyTorch bilinear (align_corners=False, source clamped at 0) on [H, W, C]."""
    h, w, _ = x.shape

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    out = np.zeros((*out_hw, x.shape[-1]))
    for i in range(out_hw[0]):
        y0, y1, fy = taps(i, h, out_hw[0])
        for j in range(out_hw[1]):
            x0, x1, fx = taps(j, w, out_hw[1])
            top = (1 - fx) * x[y0, x0] + fx * x[y0, x1]
            bottom = (1 - fx) * x[y1, x0] + fx * x[y1, x1]
            out[i, j] = (1 - fy) * top + fy * bottom
    return out


def bicubic_loop(x, out_hw):
    """Per-pixel PyTorch bicubic (A=-0.75, half-pixel, taps clamped) on [H, W, C]."""
    a = -0.75

    def kernel(d):
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    def taps(i, n_in, n_out):
        src = (i + 0.5) * n_in / n_out - 0.5
        i0 = int(np.floor(src))
        return [(min(max(i0 + t, 0), n_in - 1), kernel(src - (i0 + t))) for t in range(-1, 3)]

    h, w, _ = x.shape
    out = np.zeros((*out_hw, x.shape[-1]))
    for i in range(out_hw[0]):
        for j in range(out_hw[1]):
            for yi, wy in taps(i, h, out_hw[0]):
                for xi, wx in taps(j, w, out_hw[1]):
                    out[i, j] += wy * wx * x[yi, xi]
    return out


@pytest.mark.parametrize("case", BILINEAR_CASES)
def test_bilinear_matches_official_float32(golden_h, case):
    x = nhwc(golden_h[f"bilinear_{case}_in"])
    want = nhwc(golden_h[f"bilinear_{case}_out"])
    got = jax.jit(interp.resize_bilinear, static_argnums=1)(
        jnp.asarray(x, jnp.float32), want.shape[1:3]
    )
    assert got.dtype == jnp.float32 and got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", BILINEAR_CASES)
def test_bilinear_matches_official_float64(golden_h, case):
    x = nhwc(golden_h[f"bilinear_{case}_in"])
    want = nhwc(golden_h[f"bilinear_{case}_out"])
    with jax.enable_x64(True):
        got = interp.resize_bilinear(jnp.asarray(x), want.shape[1:3])
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (13, 11)), ((9, 6), (4, 5)), ((3, 3), (3, 8))])
def test_bilinear_matches_numpy_loop(in_hw, out_hw):
    x = np.random.default_rng(0).normal(size=(*in_hw, 2))
    np.testing.assert_allclose(
        np.asarray(interp.resize_bilinear(jnp.asarray(x, jnp.float32), out_hw)),
        bilinear_loop(x, out_hw),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("in_hw,out_hw", [((3, 3), (4, 4)), ((4, 4), (3, 3)), ((4, 4), (2, 8))])
def test_bicubic_matches_numpy_loop(in_hw, out_hw):
    x = np.random.default_rng(1).normal(size=(*in_hw, 3))
    np.testing.assert_allclose(
        np.asarray(interp.resize_bicubic_torch(jnp.asarray(x, jnp.float32), out_hw)),
        bicubic_loop(x, out_hw),
        rtol=1e-5,
        atol=1e-6,
    )


@pytest.mark.parametrize("in_hw,out_hw", [((5, 7), (13, 11)), ((8, 8), (32, 32)), ((9, 6), (4, 5))])
def test_bilinear_adjoint_is_the_transpose(in_hw, out_hw):
    """<U z, y> == <z, U^T y>: weighted pooling of upsampled logits, done at the small grid."""
    rng = np.random.default_rng(2)
    z, y = rng.normal(size=(2, *in_hw, 3)), rng.normal(size=(2, *out_hw, 3))
    with jax.enable_x64(True):
        up = interp.resize_bilinear(jnp.asarray(z), out_hw)
        back = interp.resize_bilinear_adjoint(jnp.asarray(y), in_hw)
        assert back.shape == z.shape
        np.testing.assert_allclose(float(jnp.vdot(up, y)), float(jnp.vdot(z, back)), rtol=1e-12)


def test_resizes_are_differentiable_with_batch_dims():
    x = jnp.ones((2, 3, 5, 7, 4))
    for fn in (interp.resize_bilinear, interp.resize_bicubic_torch):
        assert fn(x, (9, 4)).shape == (2, 3, 9, 4, 4)
        # Both kernels' weights sum to 1 per output pixel, so d(sum out)/dx sums to H'*W'.
        grad = jax.grad(lambda t, fn=fn: fn(t, (9, 4)).sum())(x)
        np.testing.assert_allclose(float(grad.sum()), 2 * 3 * 9 * 4 * 4, rtol=1e-5)


@pytest.mark.parametrize(
    "key,old,new",
    [("pe24_to32", (24, 24), (32, 32)), ("pe32_to20", (32, 32), (20, 20)),
     ("pe32_to32x20", (32, 32), (32, 20))],
)  # fmt: skip
def test_pos_embed_resize_matches_official(goldens_dir, key, old, new):
    g = np.load(goldens_dir / "g_vit_npz.npz")
    table = g["pe24_in"] if old == (24, 24) else g["pe32_in"]
    want = g[f"{key}_out"]
    got = interp.resize_pos_embed(jnp.asarray(table, jnp.float32), old, new)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), table[:, 0].astype(np.float32))
    with jax.enable_x64(True):
        got = interp.resize_pos_embed(jnp.asarray(table), old, new)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-12, atol=1e-13)


def test_nearest_label_matches_official(golden_h):
    label = golden_h["nearest_label_in"][:, 0]  # [B, 33, 32]
    want = golden_h["nearest_label_out"][:, 0]  # [B, 16, 16]
    got = np.asarray(interp.resize_nearest_torch(jnp.asarray(label, jnp.int32), (16, 16)))
    np.testing.assert_array_equal(got, want)
    # floor(i * 33 / 16) source rows, not the stride-2 rows a [::2] would take.
    rows = np.floor(np.arange(16) * 33 / 16).astype(int)
    np.testing.assert_array_equal(got, label[:, rows][:, :, ::2])


def test_downsample_labels_is_stride_and_equals_nearest_for_integer_ratio():
    label = np.random.default_rng(2).integers(-1, 9, size=(2, 32, 24))
    got = np.asarray(interp.downsample_labels(jnp.asarray(label), 2))
    np.testing.assert_array_equal(got, label[:, ::2, ::2])
    nearest = interp.resize_nearest_torch(jnp.asarray(label), (16, 12))
    np.testing.assert_array_equal(got, np.asarray(nearest))
