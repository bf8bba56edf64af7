"""The fused CPU attention kernel (models/cpu_attention.cc via cpu_attention.py): its outputs and
gradients against a float64 numpy softmax and JAX autodiff, batching, "auto" dispatch, and what
happens where it cannot be built."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import attention as attention_lib
from larvseg_jax.models import cpu_attention, vit

needs_kernel = pytest.mark.skipif(
    not cpu_attention.available(), reason="no C++ compiler: the kernel cannot be built here"
)


def numpy_attention(q, k, v):
    s = np.einsum("...qd,...kd->...qk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("...qk,...kd->...qd", p / p.sum(-1, keepdims=True), v)


def inputs(shape, seed=0, scale=1.0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    return [jax.random.normal(key, shape) * (scale if i < 2 else 1.0) for i, key in enumerate(keys)]


# Uneven query blocks (the kernel's are 64 rows), key counts that are not a multiple of the
# vector width, head dims 16/32/64, and any number of leading dims.
SHAPES = [(2, 3, 37, 16), (1, 2, 130, 32), (4, 70, 64), (2, 1, 1, 16)]


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_float64_numpy(shape):
    q, k, v, _ = inputs(shape)
    got = jax.jit(cpu_attention.attention)(q, k, v)
    want = numpy_attention(*(np.asarray(t, np.float64) for t in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-5, atol=2e-6)


@needs_kernel
def test_large_scores_stay_finite_and_exact():
    # Scores up to ~±150: the max shift and the exp clamp must not overflow or lose the winner.
    q, k, v, _ = inputs((1, 2, 50, 16), scale=6.0)
    got = np.asarray(jax.jit(cpu_attention.attention)(q, k, v))
    want = numpy_attention(*(np.asarray(t, np.float64) for t in (q, k, v)))
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("shape", SHAPES[:3])
def test_gradients_match_autodiff(shape):
    q, k, v, dout = inputs(shape)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * dout), argnums=(0, 1, 2)))

    with jax.enable_x64(True):  # the reference in float64, from the same float32 inputs
        f64 = [t.astype(jnp.float64) for t in (q, k, v)]

        def xla(q, k, v):  # [B, H, N, Dh] only: other leading dims folded into B
            four = [t.reshape((-1, 1, *t.shape[-2:])) for t in (q, k, v)]
            return attention_lib.attention(*four, implementation="xla").reshape(q.shape)

        want = grads(xla)(*f64)
        want = [np.asarray(w) for w in want]
    got = grads(cpu_attention.attention)(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=2e-5)


@needs_kernel
def test_bfloat16_inputs_are_computed_in_float32():
    """bf16 in, bf16 out: the float32 kernel on the widened inputs, rounded once; gradients in
    bf16 within bf16 rounding of the float32 ones, and of XLA's bf16 form."""
    q, k, v, dout = (t.astype(jnp.bfloat16) for t in inputs((2, 2, 70, 32)))
    got = jax.jit(cpu_attention.attention)(q, k, v)
    assert got.dtype == jnp.bfloat16
    wide = jax.jit(cpu_attention.attention)(*(t.astype(jnp.float32) for t in (q, k, v)))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(wide.astype(jnp.bfloat16)))

    def grads(fn, dtype):
        loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * dout.astype(jnp.float32))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(*(t.astype(dtype) for t in (q, k, v)))

    xla = lambda *a: attention_lib.attention(*a, implementation="custom_vjp")
    for g, w, x in zip(
        grads(cpu_attention.attention, jnp.bfloat16),
        grads(cpu_attention.attention, jnp.float32),
        grads(xla, jnp.bfloat16),
    ):
        assert g.dtype == jnp.bfloat16
        g = np.asarray(g, np.float32)
        np.testing.assert_allclose(g, np.asarray(w), rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(g, np.asarray(x, np.float32), rtol=3e-2, atol=3e-2)


@needs_kernel
def test_vmap_of_gradients_equals_per_example():
    q, k, v, dout = inputs((3, 2, 40, 16))

    def grad(q, k, v, dout):
        return jax.grad(lambda *a: jnp.sum(cpu_attention.attention(*a) * dout), argnums=(0, 1, 2))(
            q, k, v
        )

    batched = jax.jit(jax.vmap(grad))(q, k, v, dout)
    for i in range(3):
        single = jax.jit(grad)(q[i], k[i], v[i], dout[i])
        for b, s in zip(batched, single):
            np.testing.assert_allclose(np.asarray(b[i]), np.asarray(s), rtol=1e-6, atol=1e-7)


@needs_kernel
def test_auto_picks_the_kernel_only_where_it_applies():
    f32 = jnp.zeros((1, 2, 5, 16))
    assert attention_lib.resolve("auto", f32) == "cpu_kernel"
    assert attention_lib.resolve("auto", f32.astype(jnp.bfloat16)) == "cpu_kernel"
    with jax.enable_x64(True):
        assert attention_lib.resolve("auto", f32.astype(jnp.float64)) == "custom_vjp"
    assert attention_lib.resolve("auto", jnp.zeros((1, 2, 5, 8))) == "custom_vjp"  # head dim 8
    assert attention_lib.resolve("xla", f32) == "xla"
    with pytest.raises(ValueError, match="with a head dim that is a multiple of 16"):
        attention_lib.attention(
            f32[..., :8], f32[..., :8], f32[..., :8], implementation="cpu_kernel"
        )


@needs_kernel
def test_tiny_vit_gradients_equal_the_xla_attention():
    model = {
        name: vit.vit_from_variant("tiny", attention=name, pos_grid=(4, 4))
        for name in ("cpu_kernel", "custom_vjp")
    }
    images = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 32, 3))
    params = model["custom_vjp"].init(jax.random.PRNGKey(0), images, train=False)

    def grads(m):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.sin(m.apply(p, images, train=False)))))(
            params
        )

    for g, w in zip(
        jax.tree.leaves(grads(model["cpu_kernel"])), jax.tree.leaves(grads(model["custom_vjp"]))
    ):
        # Sums of many terms: float32 rounding relative to the leaf's largest gradient (up to ~50).
        w = np.asarray(w)
        atol = max(1e-5, 2e-6 * np.abs(w).max())
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-4, atol=atol)


def test_without_the_kernel_auto_falls_back_and_explicit_use_says_why(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    monkeypatch.setenv("LARVSEG_KERNEL_CACHE", "/nonexistent/never-written")
    warnings = []
    monkeypatch.setattr(cpu_attention.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    cpu_attention.available.cache_clear()
    try:
        q, k, v, _ = inputs((1, 2, 9, 16))
        assert attention_lib.resolve("auto", q) == "custom_vjp"
        assert len(warnings) == 1 and "using the XLA implementation" in warnings[0]
        assert "no C++ compiler" in warnings[0]
        np.testing.assert_allclose(
            np.asarray(attention_lib.attention(q, k, v)),
            numpy_attention(*(np.asarray(t, np.float64) for t in (q, k, v))),
            rtol=1e-5,
            atol=1e-6,
        )
        with pytest.raises(ValueError, match="could not be built .* use 'auto' or 'custom_vjp'"):
            attention_lib.attention(q, k, v, implementation="cpu_kernel")
    finally:
        cpu_attention.available.cache_clear()


AVX2_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from larvseg_jax.models import attention, cpu_attention
assert cpu_attention.available()
for shape in [(2, 3, 37, 16), (1, 2, 130, 32), (4, 70, 64)]:
    q, k, v, g = (jax.random.normal(jax.random.PRNGKey(i), shape) for i in range(4))
    def xla(q, k, v):
        four = [t.reshape((-1, 1, *t.shape[-2:])) for t in (q, k, v)]
        return attention.attention(*four, implementation="xla").reshape(q.shape)
    got, got_vjp = jax.vjp(cpu_attention.attention, q, k, v)
    want, want_vjp = jax.vjp(xla, q, k, v)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6)
    for a, b in zip(got_vjp(g), want_vjp(g)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
print("ok")
"""


def _cpu_has(flag: str) -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return flag in f.read().split()
    except OSError:
        return False


@needs_kernel
@pytest.mark.skipif(not _cpu_has("avx2"), reason="needs an x86-64 CPU with AVX2")
def test_avx2_build_matches_xla(tmp_path):
    """The kernel's 8-float-vector path (what AVX2-only CPUs compile), built here with
    LARVSEG_KERNEL_MARCH=x86-64-v3, against the XLA attention: forward and gradients."""
    macros = subprocess.run(
        [os.environ.get("CXX", "g++"), "-march=x86-64-v3", "-dM", "-E", "-x", "c++", "/dev/null"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "__AVX2__" in macros and "__AVX512F__" not in macros  # the AVX2 path is the one built
    env = {**os.environ, "LARVSEG_KERNEL_MARCH": "x86-64-v3", "LARVSEG_KERNEL_CACHE": str(tmp_path)}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    done = subprocess.run(
        [sys.executable, "-c", AVX2_CHECK],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
    assert [p for p in os.listdir(tmp_path) if p.endswith(".so")]  # built for that target
