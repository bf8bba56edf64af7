"""The fused CPU attention kernel (cpu_attention.cc) as a JAX op: build, register, differentiate.

XLA:CPU runs the attention core as separate small dots, exp and reductions; the fused kernel keeps
each query block in cache from scores to outputs and runs forward + backward of a B/16 block about
2.2x faster (README "Speed against PyTorch"). It is compiled on first use with the local C++
compiler (`$CXX`, default g++; about 3 s) against jaxlib's own FFI headers, for this CPU
(-march=native, or `$LARVSEG_KERNEL_MARCH`), and cached under `$LARVSEG_KERNEL_CACHE` (default
~/.cache/larvseg_jax/kernels) keyed by source, flags, compiler, jaxlib and CPU. Where it cannot
be built (no compiler, no headers) `available()` says why once and the caller keeps the XLA
implementation, so nothing depends on a compiler being present.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import jax
import jax.numpy as jnp
from absl import logging

from larvseg_jax import user_cache
from larvseg_jax.models.matmul import LOW_PRECISION

_SOURCE = "cpu_attention.cc"
_FORWARD = "larvseg_attention_forward"
_BACKWARD = "larvseg_attention_backward"
_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-w")  # with -O3 and -march, see `flags`
HEAD_DIM_MULTIPLE = 16  # the kernel's vector width in floats
_DTYPES = (jnp.dtype(jnp.float32), *LOW_PRECISION)  # low precision is widened to float32


def supports(q: jax.Array) -> bool:
    """Whether the kernel takes these inputs: float32 (bf16/fp16 are computed in float32), head
    dim a multiple of 16."""
    return q.dtype in _DTYPES and q.shape[-1] % HEAD_DIM_MULTIPLE == 0


def flags() -> tuple[str, ...]:
    """Compiler flags; the target CPU is `-march=$LARVSEG_KERNEL_MARCH` (default native, this
    machine's). A shared cache on machines of several CPU kinds can build for their common one
    (e.g. x86-64-v3 = AVX2: the kernel then uses 8-float vectors instead of AVX-512's 16)."""
    return ("-O3", f"-march={os.environ.get('LARVSEG_KERNEL_MARCH') or 'native'}", *_FLAGS)


def cache_dir() -> str:
    """$LARVSEG_KERNEL_CACHE, else the user cache's kernels/. Not under $LARVSEG_CACHE: the library
    is per machine, not per world, and tests point $LARVSEG_CACHE at temporary folders."""
    return os.environ.get("LARVSEG_KERNEL_CACHE") or os.path.join(user_cache.root(), "kernels")


def _cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(compiler: str, flag_list: tuple[str, ...], source: bytes, out: str) -> None:
    """Compiles into a temporary file beside `out` and renames it into place, so concurrent
    processes (multi-process runs, parallel tests) never load a half-written library."""
    folder = os.path.dirname(out)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build_") as tmp:
        src = os.path.join(tmp, _SOURCE)
        with open(src, "wb") as f:
            f.write(source)
        lib = os.path.join(tmp, "lib.so")
        cmd = [compiler, *flag_list, "-I", jax.ffi.include_dir(), src, "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd)} failed: " + " | ".join(tail))
        os.replace(lib, out)


def build() -> str:
    """Path of the compiled kernel library for this machine, compiling it if not cached.

    Raises:
      RuntimeError: no compiler, or the compilation failed (the message has its last lines).
    """
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on PATH (set $CXX)")
    source = resources.files("larvseg_jax.models").joinpath(_SOURCE).read_bytes()
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    flag_list = flags()  # the same flags name the library and build it
    key = hashlib.sha256()
    for part in (source, " ".join(flag_list), version, jax.__version__, _cpu_identity()):
        key.update(part if isinstance(part, bytes) else part.encode())
    out = os.path.join(cache_dir(), f"cpu_attention_{key.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        logging.info("Compiling the CPU attention kernel into %s", out)
        _compile(compiler, flag_list, source, out)
    return out


@functools.cache
def available() -> bool:
    """Builds, loads and registers the kernel once per process; False (with one warning that
    says why and what runs instead) where that fails."""
    try:
        lib = ctypes.cdll.LoadLibrary(build())
        for name, symbol in (
            (_FORWARD, "LarvsegAttentionForward"),
            (_BACKWARD, "LarvsegAttentionBackward"),
        ):
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(name, capsule, platform="cpu")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        logging.warning(
            "CPU attention kernel unavailable, using the XLA implementation (custom_vjp): %s", e
        )
        return False
    return True


def _forward(q, k, v):
    shapes = (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(q.shape[:-1], q.dtype))
    return jax.ffi.ffi_call(_FORWARD, shapes, vmap_method="broadcast_all")(q, k, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v on [..., N, Dh] (call `available()` first).

    The kernel computes in float32; bf16/fp16 inputs are widened and the output rounded back
    (more precise than XLA's bf16 form and, on this project's CPU, 2.4x faster forward +
    backward: the attention's per-head products are too small for the AMX units to pay off).
    """
    if q.dtype == jnp.float32:
        return _attention(q, k, v)
    f32 = jnp.float32
    return _attention(q.astype(f32), k.astype(f32), v.astype(f32)).astype(q.dtype)


@jax.custom_vjp
def _attention(q, k, v):
    return _forward(q, k, v)[0]


def _attention_fwd(q, k, v):
    o, lse = _forward(q, k, v)
    return o, (q, k, v, o, lse)


def _attention_bwd(res, do):
    q = res[0]
    grads = (jax.ShapeDtypeStruct(q.shape, q.dtype),) * 3
    return tuple(jax.ffi.ffi_call(_BACKWARD, grads, vmap_method="broadcast_all")(*res, do))


_attention.defvjp(_attention_fwd, _attention_bwd)
