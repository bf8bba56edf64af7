"""The float32 CPU GEMM (models/cpu_gemm.cc via cpu_gemm.py) against float64 numpy, and how
`matmul.dense` and the models use it: gradients, "auto" dispatch, wiring, fallbacks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import attention, cpu_gemm, matmul, segmenter, vit
from tests.models.golden_vit import TINY

needs_gemm = pytest.mark.skipif(
    not cpu_gemm.available(), reason="the GEMM kernel needs AVX-512 and a C++ compiler"
)

# Edge tiles (rows not a multiple of 14, columns of 32), depths across slices of 384 and panels
# of 512 columns, a single element, and an empty depth.
SHAPES = [(1, 1, 1), (13, 7, 5), (14, 384, 32), (29, 385, 33), (100, 800, 530), (3, 0, 4)]


def operands(m, k, n, transpose_a, transpose_b, batch=(), seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, *((k, m) if transpose_a else (m, k)))).astype(np.float32)
    b = rng.standard_normal((*batch, *((n, k) if transpose_b else (k, n)))).astype(np.float32)
    return a, b


def reference(a, b, transpose_a, transpose_b):
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (np.swapaxes(a, -1, -2) if transpose_a else a) @ (
        np.swapaxes(b, -1, -2) if transpose_b else b
    )


@needs_gemm
@pytest.mark.parametrize("transpose_b", [False, True])
@pytest.mark.parametrize("transpose_a", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_matmul_matches_float64_numpy(shape, transpose_a, transpose_b):
    a, b = operands(*shape, transpose_a, transpose_b)
    got = jax.jit(lambda a, b: cpu_gemm.matmul(a, b, transpose_a, transpose_b))(a, b)
    want = reference(a, b, transpose_a, transpose_b)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * max(shape[1], 1) ** 0.5 * 4)


@needs_gemm
def test_leading_dims_and_vmap():
    a, b = operands(9, 20, 40, False, True, batch=(3,))
    got = cpu_gemm.matmul(jnp.asarray(a), jnp.asarray(b), transpose_b=True)
    np.testing.assert_allclose(got, reference(a, b, False, True), atol=1e-4)
    mapped = jax.vmap(lambda x: cpu_gemm.matmul(x, jnp.asarray(b[0]), transpose_b=True))(a)
    np.testing.assert_allclose(mapped, reference(a, b[:1], False, True), atol=1e-4)


def test_matmul_refuses_what_it_cannot_compute():
    a, b = operands(4, 5, 6, False, False)
    with pytest.raises(ValueError, match="takes two float32 arrays"):
        cpu_gemm.matmul(a.astype(np.float64), b)
    with pytest.raises(ValueError, match="shapes do not chain"):
        cpu_gemm.matmul(a, b, transpose_a=True)


def dense_inputs(dtype=jnp.float32, shape=(2, 37, 50), out=70, seed=0):
    rng = np.random.default_rng(seed)
    x, kernel, bias, w = (
        jnp.asarray(rng.standard_normal(s), dtype)
        for s in (shape, (shape[-1], out), (out,), (*shape[:-1], out))
    )
    return x, kernel, bias, w


@needs_gemm
def test_dense_through_the_kernel_equals_xla_values_and_gradients():
    x, kernel, bias, w = dense_inputs()

    def loss(gemm, x, kernel, bias):
        return jnp.sum(matmul.dense(x, kernel, bias, gemm=gemm) * w)

    for gemm in ("cpu_kernel", "xla"):  # the forward product and both gradient products
        step = jax.value_and_grad(lambda *a, g=gemm: loss(g, *a), (0, 1, 2))
        assert jax.jit(step).lower(x, kernel, bias).as_text().count("larvseg_gemm") == (
            3 if gemm == "cpu_kernel" else 0
        )
    np.testing.assert_allclose(
        matmul.dense(x, kernel, bias, gemm="cpu_kernel"),
        matmul.dense(x, kernel, bias, gemm="xla"),
        rtol=1e-5,
        atol=1e-5,
    )
    got = jax.grad(lambda *a: loss("cpu_kernel", *a), (0, 1, 2))(x, kernel, bias)
    want = jax.grad(lambda *a: loss("xla", *a), (0, 1, 2))(x, kernel, bias)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-4)


@needs_gemm
def test_auto_takes_the_kernel_for_large_float32_products_only():
    def calls(x, kernel):
        return (
            jax.jit(lambda x, k: matmul.dense(x, k))
            .lower(x, kernel)
            .as_text()
            .count("larvseg_gemm")
        )

    # 2 M N K = 2^30 exactly, the threshold; one token fewer is below it.
    big = (
        jax.ShapeDtypeStruct((1024, 512), jnp.float32),
        jax.ShapeDtypeStruct((512, 1024), jnp.float32),
    )
    small = jax.ShapeDtypeStruct((1023, 512), jnp.float32), big[1]
    assert calls(*big) == 1 and calls(*small) == 0
    bf16 = [jax.ShapeDtypeStruct(s.shape, jnp.bfloat16) for s in big]
    assert calls(*bf16) == 0  # bf16 stays on XLA's AMX dots


def test_auto_falls_back_and_explicit_use_says_why(monkeypatch):
    monkeypatch.setattr(cpu_gemm, "available", lambda: False)
    x, kernel, bias, _ = dense_inputs()
    assert not matmul._use_kernel("auto", 2**20, 2048, 2048, jnp.float32)
    with pytest.raises(ValueError, match="'cpu_kernel' is unavailable here .* use 'auto' or 'xla'"):
        matmul.dense(x, kernel, bias, gemm="cpu_kernel")
    with pytest.raises(ValueError, match="unknown GEMM implementation 'mkl'"):
        matmul.dense(x, kernel, bias, gemm="mkl")


def test_cpu_kernel_refuses_low_precision():
    x, kernel, bias, _ = dense_inputs(jnp.bfloat16)
    with pytest.raises(ValueError, match="'cpu_kernel' takes float32, got bfloat16"):
        matmul.dense(x, kernel, bias.astype(jnp.float32), gemm="cpu_kernel")


@needs_gemm
def test_every_projection_of_the_model_runs_the_chosen_gemm():
    """Patch embedding, QKV, out, both MLP layers and the head's two projections: 1 + 4 x depth
    + 2 GEMMs forward; the kernel's logits and gradients equal XLA's to float32 rounding."""
    images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float32)
    index = jnp.arange(5)

    def model(gemm):
        backbone = vit.ViT(**TINY, attention="xla", gemm=gemm)
        return segmenter.Segmenter(backbone=backbone, num_classes=5)

    params = model("xla").init(jax.random.PRNGKey(0), images, index, train=False)["params"]

    def loss(gemm, p):
        logits, _ = model(gemm).apply({"params": p}, images, index, train=False)
        return jnp.sum(logits * jnp.arange(logits.size).reshape(logits.shape) % 7), logits

    forward = jax.jit(lambda p: loss("cpu_kernel", p)[1]).lower(params).as_text()
    assert forward.count("larvseg_gemm") == 1 + 4 * TINY["depth"] + 2
    (_, got_logits), got = jax.value_and_grad(lambda p: loss("cpu_kernel", p), has_aux=True)(params)
    (_, want_logits), want = jax.value_and_grad(lambda p: loss("xla", p), has_aux=True)(params)
    np.testing.assert_allclose(got_logits, want_logits, rtol=1e-4, atol=1e-4)
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        # Float32 rounding relative to the leaf's largest gradient; the key bias's gradient is
        # zero in exact arithmetic (softmax ignores a shift of all scores), rounding noise here.
        atol = max(1e-4 * float(np.abs(r).max()), 1e-5)
        np.testing.assert_allclose(g, r, rtol=0, atol=atol, err_msg=jax.tree_util.keystr(path))


def test_a_cpu_without_avx512_keeps_xla_without_compiling(monkeypatch):
    monkeypatch.delenv("LARVSEG_KERNEL_MARCH", raising=False)
    monkeypatch.setattr(cpu_gemm.cpu_kernels, "cpu_identity", lambda: "flags\t: fpu sse avx avx2\n")

    def must_not_build(*args):
        raise AssertionError("tried to build the GEMM kernel for a CPU without AVX-512")

    monkeypatch.setattr(cpu_gemm.cpu_kernels, "register", must_not_build)
    cpu_gemm.available.cache_clear()
    try:
        assert not cpu_gemm.available()
        assert not matmul._use_kernel("auto", 2**20, 2048, 2048, jnp.float32)
    finally:
        cpu_gemm.available.cache_clear()


@needs_gemm
def test_kernels_inside_a_shard_map_that_checks_varying_axes():
    """Batch-sharded activations and replicated weights under jax.shard_map's default check_vma:
    the kernels' calls and the custom VJPs (dense, attention, the position-embedding add) take
    and return the right varying types, and the results equal XLA's."""
    mesh = jax.make_mesh((2,), ("d",), axis_types=(jax.sharding.AxisType.Explicit,))
    rng = np.random.default_rng(0)
    spec = jax.sharding.PartitionSpec
    x = jax.device_put(
        jnp.asarray(rng.standard_normal((2, 48, 32)), jnp.float32),
        jax.sharding.NamedSharding(mesh, spec("d")),
    )
    kernel, row = (
        jax.device_put(jnp.asarray(rng.standard_normal(s), jnp.float32))
        for s in ((32, 96), (1, 48, 32))
    )

    def loss(x, kernel, row, impl):
        y = matmul.dense(matmul.add_broadcast(x, row), kernel, gemm=impl)
        q = y.reshape(1, 48, 2, 48).transpose(0, 2, 1, 3)[..., :32]
        return jnp.sum(jnp.sin(attention.attention(q, q, q, implementation=impl)))

    def step(impl):
        def per_device(x, kernel, row):
            value, (dx, dk, dr) = jax.value_and_grad(loss, (0, 1, 2))(x, kernel, row, impl)
            return jax.lax.psum(value, "d"), dx, jax.lax.psum(dk, "d"), jax.lax.psum(dr, "d")

        out = (spec(), spec("d"), spec(), spec())
        return jax.jit(jax.shard_map(per_device, mesh=mesh, out_specs=out))

    assert step("cpu_kernel").lower(x, kernel, row).as_text().count("larvseg_") == 5
    got, want = step("cpu_kernel")(x, kernel, row), step("xla")(x, kernel, row)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()))
