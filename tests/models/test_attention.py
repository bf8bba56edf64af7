"""Attention core (models/attention.py): blockwise custom VJP vs autodiff and a numpy softmax."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import attention as attention_lib


def qkv_and_cotangent(n=37, dh=8, seed=0):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q, k, v, dout = (jax.random.normal(key, (2, 3, n, dh)) for key in keys)
    return q, k, v, dout


def numpy_attention(q, k, v):
    s = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bhqk,bhkd->bhqd", p / p.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("implementation", ["custom_vjp", "xla"])
def test_forward_matches_numpy(implementation):
    q, k, v, _ = qkv_and_cotangent()
    fn = functools.partial(attention_lib.attention, implementation=implementation, block_size=16)
    got = jax.jit(fn)(q, k, v)
    want = numpy_attention(*(np.asarray(t, np.float64) for t in (q, k, v)))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_size", [8, 16, 256])  # uneven last block, one block
def test_custom_vjp_gradients_match_autodiff(block_size):
    q, k, v, dout = qkv_and_cotangent()

    def loss(implementation):
        def f(q, k, v):
            o = attention_lib.attention(
                q, k, v, implementation=implementation, block_size=block_size
            )
            return jnp.sum(o * dout)

        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

    want = loss("xla")(q, k, v)
    got = loss("custom_vjp")(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5)


def test_custom_vjp_gradients_match_autodiff_float64():
    with jax.enable_x64(True):
        q, k, v, dout = (t.astype(jnp.float64) for t in qkv_and_cotangent(n=19))

        def grads(implementation):
            def f(q, k, v):
                o = attention_lib.attention(q, k, v, implementation=implementation, block_size=8)
                return jnp.sum(o * dout)

            return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

        for g, w in zip(grads("custom_vjp"), grads("xla")):
            np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


def test_rejects_unknown_implementation_and_cudnn_in_float32():
    q, k, v, _ = qkv_and_cotangent(n=4)
    with pytest.raises(ValueError, match="unknown attention implementation"):
        attention_lib.attention(q, k, v, implementation="flash")
    with pytest.raises(ValueError, match="bfloat16"):
        attention_lib.attention(q, k, v, implementation="cudnn")
