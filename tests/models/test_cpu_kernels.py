"""models/cpu_kernels.py: the C++ kernels' build cache and what happens without a compiler."""

import os

import pytest

from larvseg_jax.models import cpu_attention, cpu_kernels

needs_kernel = pytest.mark.skipif(
    not cpu_attention.available(), reason="no C++ compiler: the kernels cannot be built here"
)


@needs_kernel
def test_build_is_cached_per_source_and_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("LARVSEG_KERNEL_CACHE", str(tmp_path))
    path = cpu_kernels.build("cpu_attention.cc")
    assert os.path.dirname(path) == str(tmp_path) and os.path.exists(path)

    def must_not_compile(*args):
        raise AssertionError("compiled again although the library is cached")

    monkeypatch.setattr(cpu_kernels, "_compile", must_not_compile)
    assert cpu_kernels.build("cpu_attention.cc") == path
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".build_")]  # no leftovers


def test_missing_or_failing_compiler_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("LARVSEG_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler 'no-such-compiler-xyz'"):
        cpu_kernels.build("cpu_attention.cc")
    monkeypatch.setenv("CXX", "false")  # exists, fails every compilation
    with pytest.raises(RuntimeError, match="false .* failed"):
        cpu_kernels.build("cpu_attention.cc")
    assert not os.listdir(tmp_path)  # no half-built library left behind
