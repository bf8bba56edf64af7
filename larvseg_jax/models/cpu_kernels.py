"""The package's C++ kernels for XLA:CPU (cpu_attention.cc, cpu_gemm.cc): build, cache, register.

Each source is compiled on first use with the local C++ compiler (`$CXX`, default g++; a few
seconds) against jaxlib's own FFI headers, for this CPU (-march=native, or
`$LARVSEG_KERNEL_MARCH`), and cached under `$LARVSEG_KERNEL_CACHE` (default
~/.cache/larvseg_jax/kernels) keyed by source, flags, compiler, jaxlib and CPU. Callers keep an
XLA implementation for where a kernel cannot be built (no compiler, no headers, a CPU it does not
support), so nothing depends on a compiler being present.
"""

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from importlib import resources

import jax
from absl import logging

from larvseg_jax import user_cache

_FLAGS = ("-std=c++17", "-shared", "-fPIC", "-w")  # with -O3 and -march, see `flags`
HEADERS = ("cpu_kernels.h",)  # what the sources share, copied beside the one compiled


def march() -> str:
    """The target CPU: `$LARVSEG_KERNEL_MARCH`, default "native" (this machine's)."""
    return os.environ.get("LARVSEG_KERNEL_MARCH") or "native"


def flags() -> tuple[str, ...]:
    """Compiler flags; the target CPU is `-march=$LARVSEG_KERNEL_MARCH` (default native, this
    machine's). A shared cache on machines of several CPU kinds can build for their common one
    (e.g. x86-64-v3 = AVX2: the attention kernel then uses 8-float vectors instead of AVX-512's
    16, and the GEMM, which needs AVX-512, is not built)."""
    return ("-O3", f"-march={march()}", *_FLAGS)


def cache_dir() -> str:
    """$LARVSEG_KERNEL_CACHE, else the user cache's kernels/. Not under $LARVSEG_CACHE: the library
    is per machine, not per world, and tests point $LARVSEG_CACHE at temporary folders."""
    return os.environ.get("LARVSEG_KERNEL_CACHE") or os.path.join(user_cache.root(), "kernels")


def cpu_identity() -> str:
    """What -march=native compiles for: the CPU model and its feature flags."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("model name", "flags"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor() or platform.machine()


def _compile(compiler: str, flag_list: tuple[str, ...], files: dict[str, bytes], out: str) -> None:
    """Compiles the first of `files` (name -> text; the others are its headers) into a temporary
    file beside `out` and renames it into place, so concurrent processes (multi-process runs,
    parallel tests) never load a half-written library."""
    folder = os.path.dirname(out)
    os.makedirs(folder, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".build_") as tmp:
        for file_name, text in files.items():
            with open(os.path.join(tmp, file_name), "wb") as f:
                f.write(text)
        src = os.path.join(tmp, next(iter(files)))
        lib = os.path.join(tmp, "lib.so")
        cmd = [compiler, *flag_list, "-I", jax.ffi.include_dir(), src, "-o", lib]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
        if done.returncode:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise RuntimeError(f"{' '.join(cmd)} failed: " + " | ".join(tail))
        os.replace(lib, out)


def build(name: str) -> str:
    """Path of the compiled library of the package source `name` (e.g. "cpu_gemm.cc") for this
    machine, compiling it if not cached.

    Raises:
      RuntimeError: no compiler, or the compilation failed (the message has its last lines).
    """
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler {os.environ.get('CXX', 'g++')!r} on PATH (set $CXX)")
    package = resources.files("larvseg_jax.models")
    files = {n: package.joinpath(n).read_bytes() for n in (name, *HEADERS)}
    version = subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, check=False
    ).stdout
    flag_list = flags()  # the same flags name the library and build it
    key = hashlib.sha256()
    for part in (*files.values(), " ".join(flag_list), version, jax.__version__, cpu_identity()):
        key.update(part if isinstance(part, bytes) else part.encode())
    out = os.path.join(cache_dir(), f"{name.rsplit('.', 1)[0]}_{key.hexdigest()[:16]}.so")
    if not os.path.exists(out):
        logging.info("Compiling the CPU kernel %s into %s", name, out)
        _compile(compiler, flag_list, files, out)
    return out


def same_varying(*arrays: jax.Array) -> list[jax.Array]:
    """The arrays cast to the union of their varying manual axes. Inside a `shard_map` that checks
    them (check_vma), an FFI call needs its operands to agree (jnp's ops arrange that for
    themselves), and a custom VJP must return cotangents of its inputs' types; casting before
    the custom VJP lets autodiff sum the cotangents of replicated operands (e.g. weights) over
    the devices. A no-op elsewhere."""
    types = [jax.typeof(a) for a in arrays]
    varying = frozenset().union(*(t.mat.varying for t in types))
    return [
        a
        if t.mat.varying == varying
        else jax.lax.pcast(a, tuple(varying - t.mat.varying), to="varying")
        for a, t in zip(arrays, types, strict=True)
    ]


def result(shape: tuple[int, ...], dtype, like: jax.Array) -> jax.ShapeDtypeStruct:
    """An FFI call's result type: `shape`, `dtype`, and the varying manual axes of its operand
    `like` (outside a shard_map, none)."""
    t = jax.typeof(like)
    if not t.mat.varying:
        return jax.ShapeDtypeStruct(shape, dtype)
    sharding = jax.sharding.NamedSharding(t.sharding.mesh, jax.sharding.PartitionSpec())
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding, manual_axis_type=t.mat)


def register(name: str, targets: dict[str, str]) -> None:
    """Builds and loads the source `name` and registers each FFI target (target name -> the
    library's handler symbol) for the CPU platform.

    Raises:
      RuntimeError, OSError, subprocess.SubprocessError: it could not be built or loaded.
    """
    lib = ctypes.cdll.LoadLibrary(build(name))
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
