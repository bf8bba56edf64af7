"""The model's two-operand contractions: float32 accumulation for bf16/fp16 inputs, both passes.

In float32 (the faithful default) `einsum` is `jnp.einsum`, unchanged. For bfloat16/float16
inputs it multiplies in the low precision, accumulates and returns float32 from the dot itself,
then casts to the requested dtype, and its hand-written VJP does the same for both cotangent
contractions. Why: on XLA:CPU a bf16 x bf16 -> bf16 dot runs at fp32 speed (about 270 GFLOP/s
on this project's CPU), while bf16 x bf16 -> fp32 reaches the AMX units (1.2-1.5 TFLOP/s); and
autodiff of a cast-after-dot would transpose with a float32 cotangent against a bf16 operand,
which promotes the backward dots to float32. GPUs accumulate in float32 either way.

`dense` is the projections' form, x [..., I] @ kernel [I, O] + bias, with a hand-written VJP in
every dtype (float32 too). In float32 its kernel gradient is one 2-D GEMM over the flattened
tokens: autodiff of the einsum contracts the leading axes of two [B, N, .] operands, which
XLA:CPU lays out with a transpose of the larger one first (a [3072, 2050] copy per MLP block at
B/16); and the cotangent is materialised once, where XLA had re-run the layout change that
produces it (the QKV heads-first transpose's) inside each of its consumers. Together with
token-major projections in the ViT: backbone forward + backward 1.24x -> 1.11-1.14x PyTorch's.
Its three products run on XLA's dot or, `gemm="auto"` on CPU for large float32 products, on the
C++ GEMM kernel (cpu_gemm.py): with it, and the attention kernel, the backbone takes 0.99x.
"""

import functools
import math

import jax
import jax.numpy as jnp

from larvseg_jax.models import cpu_gemm, cpu_kernels

LOW_PRECISION = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# `dense`'s GEMMs: "auto" = "cpu_kernel" for float32 products of at least cpu_gemm.MIN_FLOPS on the
# CPU backend where the kernel builds, else "xla"; "cpu_kernel" = cpu_gemm.cc (float32, AVX-512);
# "xla" = XLA's dot.
GEMM_IMPLEMENTATIONS = ("auto", "cpu_kernel", "xla")


def accumulation_dtype(dtype) -> jnp.dtype:
    """Where products of `dtype` inputs are summed: at least float32 (bf16/fp16 compute), float64
    for float64 inputs (the x64 parity tests)."""
    return jnp.promote_types(dtype, jnp.float32)


def einsum(subscripts: str, a: jax.Array, b: jax.Array, out_dtype=None) -> jax.Array:
    """jnp.einsum of two operands of one dtype; see the module docstring.

    Args:
      subscripts: "lhs,rhs->out" with explicit output (and "..." allowed); every index of an
        operand must appear in the other operand or the output, so both cotangents are
        contractions of the same form.
      a, b: operands of the same dtype.
      out_dtype: result dtype; defaults to the operands' (float32 keeps the accumulator, e.g.
        for logits).

    Returns:
      The contraction in `out_dtype`.
    """
    if a.dtype != b.dtype:
        raise ValueError(f"einsum {subscripts!r} operands differ in dtype: {a.dtype}, {b.dtype}")
    out_dtype = jnp.dtype(out_dtype or a.dtype)
    if a.dtype not in LOW_PRECISION:
        return jnp.einsum(subscripts, a, b).astype(out_dtype)
    _split(subscripts)  # fails here, not in the backward pass
    return _accumulating_einsum(subscripts, out_dtype, *cpu_kernels.same_varying(a, b))


def dense(
    x: jax.Array, kernel: jax.Array, bias=None, out_dtype=None, gemm: str = "auto"
) -> jax.Array:
    """x [..., I] @ kernel [I, O] (+ bias [O]) -> [..., O] in `out_dtype` (default: the
    operands'). Products and bias are summed in `accumulation_dtype` and rounded once (in bf16
    the bias gradient is then a float32 sum); see the module docstring for the VJP. `gemm`
    (GEMM_IMPLEMENTATIONS) runs the forward product and both gradient products."""
    if x.dtype != kernel.dtype:
        raise ValueError(f"dense operands differ in dtype: {x.dtype}, {kernel.dtype}")
    if kernel.ndim != 2 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"dense needs x [..., I] and kernel [I, O]; got {x.shape}, {kernel.shape}")
    if bias is None:
        bias = jnp.zeros((0,), accumulation_dtype(x.dtype))  # no bias: an empty placeholder
    elif bias.shape != kernel.shape[1:]:
        raise ValueError(f"dense bias {bias.shape} does not match kernel {kernel.shape}")
    use_kernel = _use_kernel(gemm, math.prod(x.shape[:-1]), *kernel.shape, x.dtype)
    x, kernel, bias = cpu_kernels.same_varying(x, kernel, bias)  # for the custom VJP
    return _dense(jnp.dtype(out_dtype or x.dtype), use_kernel, x, kernel, bias)


def _use_kernel(gemm: str, tokens: int, i: int, o: int, dtype) -> bool:
    if gemm not in GEMM_IMPLEMENTATIONS:
        raise ValueError(f"unknown GEMM implementation {gemm!r}; use one of {GEMM_IMPLEMENTATIONS}")
    if gemm == "xla":
        return False
    if gemm == "auto":
        return dtype == jnp.float32 and cpu_gemm.worth_it(tokens, o, i)
    if dtype != jnp.float32:
        raise ValueError(f"GEMM implementation 'cpu_kernel' takes float32, got {dtype}; use 'auto'")
    if not cpu_gemm.available():
        raise ValueError(
            "GEMM implementation 'cpu_kernel' is unavailable here (see the log line above); "
            "use 'auto' or 'xla'"
        )
    return True


def _contract(subscripts: str, x: jax.Array, y: jax.Array, dtype) -> jax.Array:
    acc = accumulation_dtype(x.dtype)
    return jnp.einsum(subscripts, x, y, preferred_element_type=acc).astype(dtype)


def _tokens(x: jax.Array) -> jax.Array:
    return x.reshape(-1, x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _dense(out_dtype, use_kernel, x, kernel, bias):
    acc = accumulation_dtype(x.dtype)
    if use_kernel:  # float32
        y = cpu_gemm.matmul(_tokens(x), kernel).reshape(*x.shape[:-1], -1)
    else:
        y = _contract("...i,io->...o", x, kernel, acc)
    return (y + bias.astype(acc) if bias.size else y).astype(out_dtype)


def _dense_forward(out_dtype, use_kernel, x, kernel, bias):
    return _dense(out_dtype, use_kernel, x, kernel, bias), (x, kernel, bias)


def _dense_backward(out_dtype, use_kernel, residuals, g):
    x, kernel, bias = residuals
    # The cotangent as [tokens, O], materialised once: XLA:CPU otherwise re-runs the layout
    # change that produces it (e.g. the QKV heads-first transpose's) inside each consumer.
    tokens_g = jax.lax.optimization_barrier(g.reshape(-1, g.shape[-1]))
    dbias = jnp.zeros_like(bias)  # the no-bias placeholder's
    if bias.size:
        dbias = jnp.sum(tokens_g.astype(accumulation_dtype(x.dtype)), 0).astype(bias.dtype)
    tokens_g = tokens_g.astype(x.dtype)
    if use_kernel:
        dx = cpu_gemm.matmul(tokens_g, kernel, transpose_b=True).reshape(x.shape)
        return dx, cpu_gemm.matmul(_tokens(x), tokens_g, transpose_a=True), dbias
    dx = _contract("to,io->ti", tokens_g, kernel, x.dtype).reshape(x.shape)
    if x.dtype in LOW_PRECISION:
        # bf16 x bf16 -> fp32 reaches AMX on XLA:CPU only as an NN/NT product: it transposes an
        # operand for the contraction over [B, N], but runs the 2-D [T, I]^T [T, O] form
        # without AMX (860 against 280 GFLOP/s at B/16's MLP shapes).
        g = tokens_g.reshape(*x.shape[:-1], -1)
        dkernel = _contract("...i,...o->io", x, g, kernel.dtype)
    else:  # one 2-D GEMM over tokens
        dkernel = _contract("ti,to->io", _tokens(x), tokens_g, kernel.dtype)
    return dx, dkernel, dbias


_dense.defvjp(_dense_forward, _dense_backward)


def add_broadcast(x: jax.Array, row: jax.Array) -> jax.Array:
    """x [B, ...] + row [1, ...] (e.g. the position embedding), whose gradient for `row` is a
    contraction of the cotangent with ones over B, summed in `accumulation_dtype`. Why: the
    autodiff form, a sum over the leading axis, runs on XLA:CPU as a YNNPACK reduce that takes
    12 ms per ViT-B/16 call at 2 images of 512 (0.6 ms as a contraction)."""
    if x.dtype != row.dtype or row.ndim != x.ndim or row.shape[0] != 1:
        raise ValueError(
            f"add_broadcast needs x [B, ...] and row [1, ...]; got {x.shape} "
            f"{x.dtype}, {row.shape} {row.dtype}"
        )
    return _add_broadcast(*cpu_kernels.same_varying(x, row))  # see cpu_kernels.same_varying


@jax.custom_vjp
def _add_broadcast(x, row):
    return x + row


def _add_broadcast_forward(x, row):
    return x + row, None


def _add_broadcast_backward(_, g):
    ones = jnp.ones(g.shape[:1], g.dtype)
    drow = jnp.einsum("b,b...->...", ones, g, preferred_element_type=accumulation_dtype(g.dtype))
    return g, drow[None].astype(g.dtype)


_add_broadcast.defvjp(_add_broadcast_forward, _add_broadcast_backward)


def _split(subscripts: str) -> tuple[str, str, str]:
    inputs, out = subscripts.replace(" ", "").split("->")
    lhs, rhs = inputs.split(",")
    for mine, other in ((lhs, rhs), (rhs, lhs)):
        lonely = set(mine.replace("...", "")) - set(other) - set(out)
        if lonely:  # summed within one operand: its cotangent would need a broadcast
            raise ValueError(f"einsum {subscripts!r}: indices {sorted(lonely)} only in {mine!r}")
    return lhs, rhs, out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _accumulating_einsum(subscripts, out_dtype, a, b):
    return _contract(subscripts, a, b, out_dtype)


def _forward(subscripts, out_dtype, a, b):
    return _contract(subscripts, a, b, out_dtype), (a, b)


def _backward(subscripts, out_dtype, residuals, g):
    a, b = residuals
    lhs, rhs, out = _split(subscripts)
    g = g.astype(a.dtype)
    da = _contract(f"{out},{rhs}->{lhs}", g, b, a.dtype)
    db = _contract(f"{lhs},{out}->{rhs}", a, g, b.dtype)
    return da, db


_accumulating_einsum.defvjp(_forward, _backward)
