"""Multi-head softmax attention core for the ViT (SPEC 1.1), heads-first [B, H, N, Dh].

Interchangeable implementations of softmax(Q K^T / sqrt(Dh)) V:
- "auto" (default): "cpu_kernel" where it applies (CPU backend, head dim a multiple of 16, the
  kernel builds), else "custom_vjp".
- "cpu_kernel": the fused C++ kernel of cpu_attention.cc (XLA FFI custom call), forward and
  backward, in float32 (bf16/fp16 inputs widened); the fastest on CPU by far, in either dtype.
- "custom_vjp": blockwise ("flash"-style) forward that keeps only O and the row log-sum-exp, and
  a hand-written backward that recomputes each query block's probabilities and uses
  D = rowsum(dO * O). No [B, H, N, N] tensor is stored for the backward pass; on XLA:CPU this is
  the fastest pure-XLA form measured on CPU (ENVIRONMENT 9), and the portable one.
- "xla": plain einsum + softmax, differentiated by JAX (the reference).
- "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, for GPUs.
"""

import functools

import jax
import jax.numpy as jnp

from larvseg_jax.models import cpu_attention
from larvseg_jax.models.matmul import accumulation_dtype

IMPLEMENTATIONS = ("auto", "cpu_kernel", "custom_vjp", "xla", "cudnn")
BLOCK_SIZE = 256  # query rows per block; 256 was the fastest on CPU for N = 1025 (ENVIRONMENT 9)


def _blocks(n: int, block: int) -> list[tuple[int, int]]:
    # Static Python slices: the uneven last block needs no padding (N = 1025 for ViT-B/16 at 512).
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def _scores(a: jax.Array, b: jax.Array) -> jax.Array:
    """a b^T over the head dim, [B, H, Na, Nb], in at least float32."""
    return jnp.einsum("bhqd,bhkd->bhqk", a, b, preferred_element_type=accumulation_dtype(a.dtype))


def _flash_forward(q, k, v, block):
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    for s, e in _blocks(q.shape[2], block):
        sc = _scores(q[:, :, s:e] * scale, k)  # [B, H, bq, N]
        m = jnp.max(sc, axis=-1, keepdims=True)
        p = jnp.exp(sc - m)
        denom = jnp.sum(p, axis=-1, keepdims=True)
        o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=p.dtype)
        outs.append((o / denom).astype(q.dtype))
        lses.append(m + jnp.log(denom))
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash_attention(q, k, v, block):
    return _flash_forward(q, k, v, block)[0]


def _flash_fwd(q, k, v, block):
    o, lse = _flash_forward(q, k, v, block)
    return o, (q, k, v, o, lse)


def _flash_bwd(block, res, do):
    q, k, v, o, lse = res
    scale = q.shape[-1] ** -0.5
    acc = accumulation_dtype(q.dtype)
    # dS = P * (dP - D) with D = rowsum(dO * O) = rowsum(P * dP): one [B, H, N, 1] vector instead
    # of a second pass over P.
    delta = jnp.sum(do.astype(acc) * o.astype(acc), axis=-1, keepdims=True)  # [B, H, N, 1]
    dq_t = []
    dk = jnp.zeros(k.shape, acc)
    dv = jnp.zeros(v.shape, acc)
    for s, e in _blocks(q.shape[2], block):
        qs = q[:, :, s:e] * scale
        # Keys first: P^T, dP^T and dS^T are [B, H, N, bq], so that dV = P^T dO and dK = dS^T Q
        # contract the minor axis of both factors. In the queries-first form those two products
        # contract the queries, the major axis of P: XLA:CPU ran them at half the speed (and
        # as float32 dots in bf16 compute). Forward + backward of a B/16 backbone: fp32 3 %,
        # bf16 9 % faster.
        p_t = jnp.exp(_scores(k, qs) - jnp.swapaxes(lse[:, :, s:e], 2, 3))  # recomputed
        do_s = do[:, :, s:e]
        # The [N, bq] factors are cast to the inputs' dtype before each product (a no-op in
        # float32): bf16 x bf16 -> fp32 dots are the fast ones, mixed operands would promote.
        dv = dv + jnp.einsum(
            "bhkq,bhqd->bhkd", p_t.astype(do.dtype), do_s, preferred_element_type=acc
        )
        dp_t = jnp.einsum("bhkd,bhqd->bhkq", v, do_s, preferred_element_type=acc)
        ds_t = (p_t * (dp_t - jnp.swapaxes(delta[:, :, s:e], 2, 3))).astype(k.dtype)
        dq_t.append(jnp.einsum("bhkd,bhkq->bhdq", k, ds_t, preferred_element_type=acc))
        dk = dk + jnp.einsum("bhkq,bhqd->bhkd", ds_t, qs, preferred_element_type=acc)
    dq = jnp.swapaxes(jnp.concatenate(dq_t, axis=3), 2, 3) * scale
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_flash_attention.defvjp(_flash_fwd, _flash_bwd)


def _xla_attention(q, k, v):
    scale = q.shape[-1] ** -0.5
    p = jax.nn.softmax(_scores(q * scale, k), axis=-1)  # [B, H, N, N]
    o = jnp.einsum("bhqk,bhkd->bhqd", p.astype(v.dtype), v, preferred_element_type=p.dtype)
    return o.astype(q.dtype)


def _cudnn_attention(q, k, v):
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        # cuDNN's fused kernels take only half precision; silently casting would break the
        # float32 parity the project promises, so the caller picks the dtype.
        raise ValueError(
            f"attention implementation 'cudnn' needs bfloat16/float16 inputs, got {q.dtype}; "
            "set the model dtype to bfloat16 or use 'custom_vjp'/'xla'"
        )
    # jax.nn.dot_product_attention is sequence-first: [B, N, H, Dh].
    q, k, v = (jnp.swapaxes(t, 1, 2) for t in (q, k, v))
    o = jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return jnp.swapaxes(o, 1, 2)


def _kernel_attention(q, k, v):
    if not cpu_attention.supports(q):
        raise ValueError(
            f"attention implementation 'cpu_kernel' takes float32/bfloat16/float16 with a head "
            f"dim that is a multiple of {cpu_attention.HEAD_DIM_MULTIPLE}, got {q.dtype} "
            f"[.., {q.shape[-1]}]; "
            "use 'auto' or 'custom_vjp'"
        )
    if not cpu_attention.available():
        raise ValueError(
            "attention implementation 'cpu_kernel' could not be built (see the warning above); "
            "use 'auto' or 'custom_vjp'"
        )
    return cpu_attention.attention(q, k, v)


def resolve(implementation: str, q: jax.Array) -> str:
    """The implementation "auto" stands for with these inputs on the default backend."""
    if implementation != "auto":
        return implementation
    if jax.default_backend() == "cpu" and cpu_attention.supports(q) and cpu_attention.available():
        return "cpu_kernel"
    return "custom_vjp"


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    implementation: str = "auto",
    block_size: int = BLOCK_SIZE,
) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v, heads first, no mask, no dropout (SPEC 1.1).

    Args:
      q: [B, H, Nq, Dh] queries.
      k: [B, H, Nk, Dh] keys.
      v: [B, H, Nk, Dh] values.
      implementation: "auto", "cpu_kernel" (fused C++ kernel), "custom_vjp" (blockwise,
        hand-written VJP), "xla" (autodiff through a plain softmax) or "cudnn" (GPU only,
        bf16/fp16 inputs).
      block_size: query rows per block of the "custom_vjp" path.

    Returns:
      [B, H, Nq, Dh] in q's dtype.
    """
    implementation = resolve(implementation, q)
    if implementation == "cpu_kernel":
        return _kernel_attention(q, k, v)
    if implementation == "custom_vjp":
        return _flash_attention(q, k, v, int(block_size))
    if implementation == "xla":
        return _xla_attention(q, k, v)
    if implementation == "cudnn":
        return _cudnn_attention(q, k, v)
    raise ValueError(f"unknown attention implementation {implementation!r}; use {IMPLEMENTATIONS}")
