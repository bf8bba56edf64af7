"""The float32 CPU GEMM (cpu_gemm.cc) as a JAX op, for `matmul.dense`'s three products.

Inside one jit with the ViT-B/16 projections' shapes it takes 0.92-0.93x the time of XLA:CPU's own
GEMM (README "Speed against PyTorch"). It needs AVX-512; it is built on first use (`cpu_kernels`),
and where it cannot be, `available()` says why once and `dense` keeps XLA's dot.
"""

import functools
import subprocess

import jax
import jax.numpy as jnp
from absl import logging

from larvseg_jax.models import cpu_kernels

_SOURCE = "cpu_gemm.cc"
_TARGET = "larvseg_gemm"
MIN_FLOPS = 2**30  # "auto" uses the kernel from this size of product (2 M N K) up; see `worth_it`


def _cpu_has_avx512() -> bool:
    if cpu_kernels.march() != "native":  # a chosen target: the compiler says if it has AVX-512
        return True
    return " avx512f" in cpu_kernels.cpu_identity()


@functools.cache
def available() -> bool:
    """Builds, loads and registers the kernel once per process; False where it cannot (a CPU
    without AVX-512: one info line; a failed build: one warning that says why), XLA's dot then
    runs instead."""
    if not _cpu_has_avx512():
        logging.info(
            "CPU GEMM kernel not used: it needs AVX-512, this CPU has none; XLA's dot runs"
        )
        return False
    try:
        cpu_kernels.register(_SOURCE, {_TARGET: "LarvsegGemm"})
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        logging.warning("CPU GEMM kernel unavailable, XLA's dot runs instead: %s", e)
        return False
    return True


def worth_it(m: int, n: int, k: int) -> bool:
    """Whether "auto" takes the kernel for an [m, k] x [k, n] product on this backend: float32 on
    CPU from MIN_FLOPS up (below, XLA's dot and its fusions cost less than a custom call; the
    tiny test models stay on XLA), where the kernel builds."""
    return jax.default_backend() == "cpu" and 2 * m * n * k >= MIN_FLOPS and available()


def matmul(a: jax.Array, b: jax.Array, transpose_a: bool = False, transpose_b: bool = False):
    """op(a) @ op(b) for float32 a [..., M, K] and b [..., K, N] (op = transpose of the last two
    axes where asked), leading dims equal; call `available()` first."""
    if a.dtype != jnp.float32 or b.dtype != jnp.float32 or a.ndim < 2 or b.ndim != a.ndim:
        raise ValueError(
            f"cpu_gemm.matmul takes two float32 arrays of one rank >= 2, got {a.dtype}{a.shape} "
            f"and {b.dtype}{b.shape}"
        )
    m, k = (a.shape[-1], a.shape[-2]) if transpose_a else a.shape[-2:]
    kb, n = (b.shape[-1], b.shape[-2]) if transpose_b else b.shape[-2:]
    if k != kb or a.shape[:-2] != b.shape[:-2]:
        raise ValueError(
            f"cpu_gemm.matmul shapes do not chain: {a.shape} (transposed: {transpose_a}) and "
            f"{b.shape} (transposed: {transpose_b})"
        )
    a, b = cpu_kernels.same_varying(a, b)
    out = cpu_kernels.result((*a.shape[:-2], m, n), jnp.float32, a)
    call = jax.ffi.ffi_call(_TARGET, out, vmap_method="broadcast_all")
    return call(a, b, transpose_a=bool(transpose_a), transpose_b=bool(transpose_b))
