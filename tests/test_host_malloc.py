"""host_malloc: with it, XLA:CPU's per-execution temporary buffers stop page-faulting every call.

Each case runs in a fresh interpreter: the setting is process-wide and must precede JAX's threads.
"""

import json
import platform
import subprocess
import sys

import pytest

from larvseg_jax import host_malloc

# A jitted function whose XLA temporary buffers (64 MiB) are far above glibc's mmap threshold.
PROGRAM = """
import json, resource, sys
from larvseg_jax import host_malloc
kept = host_malloc.keep_freed_memory("B/16") if sys.argv[1] == "keep" else False
import jax, jax.numpy as jnp
f = jax.jit(lambda x: jnp.sum(jnp.tanh(x @ x.T)) + jnp.sum(jnp.exp(-(x @ x.T))))
x = jnp.ones((4096, 256)) / 100
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"kept": kept, "faults": faults, "temp": temp}))
"""


def run(mode: str, **env) -> dict:
    environ = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", **env}
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode],
        capture_output=True,
        text=True,
        env=environ,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_kept_memory_is_not_faulted_again_each_call():
    default, kept = run("default"), run("keep", LARVSEG_MALLOC="keep")
    pages = default["temp"] // 4096
    assert kept["kept"] and not default["kept"]
    # Page faults of calls 2-8 (the first one also allocates for good): without it every call
    # faults its temporaries in again ...
    assert min(default["faults"][1:]) > pages // 2, default
    # ... with it calls reuse freed blocks; not every call (host_malloc's docstring: some still
    # fault a fresh block), so: at least two calls with almost no faults.
    assert sum(f < pages // 20 for f in kept["faults"][1:]) >= 2, kept


def test_opt_in_only_and_never_for_small_models_or_accelerators(monkeypatch):
    # (each returns before mallopt: this process's malloc stays as it is)
    monkeypatch.delenv("LARVSEG_MALLOC", raising=False)
    assert not host_malloc.keep_freed_memory("B/16")
    monkeypatch.setenv("LARVSEG_MALLOC", "keep")
    assert not host_malloc.keep_freed_memory("tiny") and not host_malloc.keep_freed_memory("micro")
    monkeypatch.setenv("JAX_PLATFORMS", "cuda")
    assert not host_malloc.cpu_only() and not host_malloc.keep_freed_memory("B/16")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host_malloc.cpu_only()
