"""models/matmul.py: float32 is plain einsum; bf16 multiplies in bf16 and accumulates in float32
in both passes, with gradients of the same equation; `dense`'s hand-written VJP equals autodiff
and forms the kernel gradient as one 2-D GEMM over tokens."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import attention, matmul, vit

CASES = [
    ("...i,io->...o", (2, 5, 8), (8, 6)),  # Dense
    ("bnd,dthk->tbhnk", (2, 5, 8), (8, 3, 2, 4)),  # fused QKV, heads first
    ("bhnk,hkd->bnd", (2, 2, 5, 4), (2, 4, 8)),  # attention output projection
    ("bhpwqc,pqcd->bhwd", (2, 3, 4, 2, 4, 3), (4, 4, 3, 8)),  # patch embedding
]


def operands(a_shape, b_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=s), dtype) for s in (a_shape, b_shape))


@pytest.mark.parametrize("subscripts, a_shape, b_shape", CASES)
def test_float32_is_plain_einsum(subscripts, a_shape, b_shape):
    a, b = operands(a_shape, b_shape, jnp.float32)
    got = jax.jit(lambda a, b: matmul.einsum(subscripts, a, b))(a, b)
    np.testing.assert_array_equal(got, jax.jit(lambda a, b: jnp.einsum(subscripts, a, b))(a, b))


@pytest.mark.parametrize("subscripts, a_shape, b_shape", CASES)
def test_bfloat16_value_and_gradients_match_float32_math(subscripts, a_shape, b_shape):
    """Against float32 einsum of the same bf16-rounded operands: the output to bf16 rounding,
    the gradients (of a float32 loss) to bf16 rounding of the cotangent."""
    a, b = operands(a_shape, b_shape, jnp.bfloat16)
    out_shape = jax.eval_shape(lambda: jnp.einsum(subscripts, a, b)).shape
    w = jnp.asarray(np.random.default_rng(1).normal(size=out_shape), jnp.float32)

    def loss(fn, a, b):
        return jnp.sum(fn(a, b).astype(jnp.float32) * w)

    def ours(a, b):
        return matmul.einsum(subscripts, a, b)

    def reference(a, b):
        return jnp.einsum(subscripts, a.astype(jnp.float32), b.astype(jnp.float32))

    out = ours(a, b)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), reference(a, b), rtol=1e-2, atol=1e-2)
    got = jax.grad(lambda a, b: loss(ours, a, b), argnums=(0, 1))(a, b)
    want = jax.grad(lambda a, b: loss(reference, a, b), argnums=(0, 1))(a, b)
    for g, r, x in zip(got, want, (a, b), strict=True):
        assert g.dtype == x.dtype == jnp.bfloat16
        scale = float(jnp.abs(r).max())
        np.testing.assert_allclose(np.float32(g), r, atol=2e-2 * scale)
    f32 = matmul.einsum(subscripts, a, b, out_dtype=jnp.float32)
    assert f32.dtype == jnp.float32  # the accumulator itself, e.g. for logits
    np.testing.assert_allclose(f32, reference(a, b), rtol=1e-5, atol=1e-5)


def equations(jaxpr) -> list:
    """Every equation of a jaxpr, those of its sub-jaxprs (custom VJPs, scans...) included."""
    found = []
    for eqn in jaxpr.eqns:
        found.append(eqn)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += equations(sub)
    return found


def dots(jaxpr) -> list[tuple[str, str, str]]:
    """(lhs, rhs, out) dtypes of every dot_general in a jaxpr, sub-jaxprs included."""
    return [
        tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars))
        for eqn in equations(jaxpr)
        if eqn.primitive.name == "dot_general"
    ]


def test_every_dot_of_a_bfloat16_mlp_step_is_bf16_in_fp32_out():
    """The point of the module: forward and backward dots of a bf16 MLP block all take bf16
    operands and produce float32 (the AMX path on CPU); none runs in float32 or bf16 out."""
    x = jnp.ones((2, 3, 8), jnp.float32)

    def dots_of_step(dtype):
        block = vit.MlpBlock(16, dtype=dtype)

        def loss(p, x):
            return jnp.sum(block.apply(p, x).astype(jnp.float32) ** 2)

        params = block.init(jax.random.PRNGKey(0), x)
        return dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(params, x).jaxpr)

    found = dots_of_step(jnp.bfloat16)
    assert len(found) == 6  # 2 forward, 4 cotangent contractions
    assert set(found) == {("bfloat16", "bfloat16", "float32")}
    assert set(dots_of_step(jnp.float32)) == {("float32", "float32", "float32")}


def test_every_dot_of_bfloat16_attention_is_bf16_in_fp32_out():
    """The same for the attention core's forward and hand-written backward."""
    q, k = operands((1, 2, 9, 4), (1, 2, 9, 4), jnp.bfloat16)

    def loss(q, k, v):
        return jnp.sum(attention.attention(q, k, v, block_size=4).astype(jnp.float32) ** 2)

    found = dots(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, k).jaxpr)
    assert len(found) == 3 * (2 + 5)  # per query block: QK, PV; recomputed QK, dV, dP, dQ, dK
    assert set(found) == {("bfloat16", "bfloat16", "float32")}


def test_an_index_summed_inside_one_operand_is_refused():
    a, b = operands((2, 3), (3, 4), jnp.bfloat16)
    with pytest.raises(ValueError, match=r"indices \['x'\] only in 'xij'"):
        matmul.einsum("xij,jk->ik", a[None], b)
    with pytest.raises(ValueError, match="operands differ in dtype"):
        matmul.einsum("ij,jk->ik", a, b.astype(jnp.float32))


DENSE_X_SHAPES = [(5, 8), (2, 5, 8), (2, 3, 4, 8)]


def plain_dense(x, kernel, bias=None):
    y = jnp.einsum("...i,io->...o", x, kernel)
    return y if bias is None else y + bias


def dense_operands(x_shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    x, kernel, bias, w = (
        jnp.asarray(rng.normal(size=s), dtype) for s in (x_shape, (8, 6), (6,), (*x_shape[:-1], 6))
    )
    return x, kernel, bias, w


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("x_shape", DENSE_X_SHAPES)
def test_dense_equals_autodiff_of_the_plain_formula_in_float64(x_shape, with_bias):
    with jax.enable_x64(True):
        x, kernel, bias, w = dense_operands(x_shape, jnp.float64)
        bias = bias if with_bias else None

        def loss(fn, x, kernel, bias):
            return jnp.sum(fn(x, kernel, bias) * w)

        got = jax.grad(lambda *a: loss(matmul.dense, *a), argnums=(0, 1, 2))(x, kernel, bias)
        want = jax.grad(lambda *a: loss(plain_dense, *a), argnums=(0, 1, 2))(x, kernel, bias)
        np.testing.assert_allclose(matmul.dense(x, kernel, bias), plain_dense(x, kernel, bias))
        for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_dense_float32_forward_is_plain_einsum_plus_bias():
    x, kernel, bias, _ = dense_operands((2, 5, 8), jnp.float32)
    got = jax.jit(matmul.dense)(x, kernel, bias)
    np.testing.assert_array_equal(got, jax.jit(plain_dense)(x, kernel, bias))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dense_kernel_gradient_form(dtype):
    """The reason for the VJP: in float32 the kernel gradient contracts [tokens, I] with
    [tokens, O] (not the [B, N, .] operands over two axes); in bf16 it keeps the [B, N] form,
    which XLA:CPU runs on AMX (the 2-D one it does not). The cotangent is materialised once
    (one optimization barrier) for the bias sum and both GEMMs."""
    x, kernel, bias, w = dense_operands((2, 5, 8), dtype)
    jaxpr = jax.make_jaxpr(
        jax.grad(
            lambda x, k, b: jnp.sum(matmul.dense(x, k, b).astype(jnp.float32) * w),
            argnums=(0, 1, 2),
        )
    )(x, kernel, bias).jaxpr
    eqns = equations(jaxpr)
    kernel_grads = [
        e for e in eqns if e.primitive.name == "dot_general" and e.outvars[0].aval.shape == (8, 6)
    ]
    assert len(kernel_grads) == 1
    (contracting, batch) = kernel_grads[0].params["dimension_numbers"]
    if dtype == jnp.float32:
        assert [v.aval.shape for v in kernel_grads[0].invars] == [(10, 8), (10, 6)]
        assert contracting == ((0,), (0,)) and batch == ((), ())
    else:
        assert [v.aval.shape for v in kernel_grads[0].invars] == [(2, 5, 8), (2, 5, 6)]
        assert contracting == ((0, 1), (0, 1)) and batch == ((), ())
    assert sum(e.primitive.name == "optimization_barrier" for e in eqns) == 1


def test_dense_bfloat16_sums_in_float32_and_its_bias_gradient_is_float32():
    x, kernel, _, w = dense_operands((2, 5, 8), jnp.bfloat16)
    bias = jnp.asarray(np.random.default_rng(2).normal(size=6), jnp.float32)  # params stay fp32
    w = w.astype(jnp.float32)

    def loss(fn, x, kernel, bias):
        return jnp.sum(fn(x, kernel, bias).astype(jnp.float32) * w)

    def reference(x, kernel, bias):
        return plain_dense(x.astype(jnp.float32), kernel.astype(jnp.float32), bias)

    out = matmul.dense(x, kernel, bias)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(out), reference(x, kernel, bias), rtol=1e-2, atol=2e-2)
    got = jax.grad(lambda *a: loss(matmul.dense, *a), argnums=(0, 1, 2))(x, kernel, bias)
    want = jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2))(x, kernel, bias)
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(np.float32(g), r, atol=2e-2 * float(jnp.abs(r).max()))
    np.testing.assert_allclose(got[2], want[2], rtol=1e-6)  # a float32 sum of w: exact-ish


def test_dense_refuses_mismatched_operands():
    x, kernel, bias, _ = dense_operands((2, 5, 8), jnp.float32)
    with pytest.raises(ValueError, match="dense operands differ in dtype"):
        matmul.dense(x, kernel.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match=r"dense needs x \[..., I\] and kernel \[I, O\]"):
        matmul.dense(x, kernel.T)
    with pytest.raises(ValueError, match="dense bias"):
        matmul.dense(x, kernel, bias[:3])


def test_add_broadcast_equals_autodiff_of_the_plain_sum_in_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(3)
        x, row, w = (jnp.asarray(rng.normal(size=s)) for s in ((3, 5, 4), (1, 5, 4), (3, 5, 4)))
        np.testing.assert_array_equal(matmul.add_broadcast(x, row), x + row)
        got = jax.grad(lambda x, r: jnp.sum(matmul.add_broadcast(x, r) * w), (0, 1))(x, row)
        want = jax.grad(lambda x, r: jnp.sum((x + r) * w), (0, 1))(x, row)
        for g, r in zip(got, want, strict=True):
            assert g.dtype == jnp.float64 and g.shape == r.shape
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-12)


def test_add_broadcast_row_gradient_is_a_contraction_not_a_reduce():
    """The reason for the VJP: XLA:CPU runs the sum over the batch as a slow reduce."""
    x, row = jnp.ones((2, 5, 4)), jnp.ones((1, 5, 4))
    row_vjp = lambda r, g: jax.vjp(lambda r: matmul.add_broadcast(x, r), r)[1](g)
    jaxpr = jax.make_jaxpr(row_vjp)(row, x)
    names = [e.primitive.name for e in equations(jaxpr.jaxpr)]
    assert "dot_general" in names and "reduce_sum" not in names


def test_add_broadcast_bfloat16_row_gradient_sums_in_float32():
    # 1 + 3 * 2^-8 is a tie between bf16 neighbours that rounds up; summed in bf16 one term at a
    # time each 2^-8 is lost (1 + 2^-8 rounds back to 1).
    w = jnp.asarray([1.0, 2**-8, 2**-8, 2**-8], jnp.float32).reshape(4, 1)
    x, row = jnp.zeros((4, 1), jnp.bfloat16), jnp.zeros((1, 1), jnp.bfloat16)
    grad = jax.grad(lambda r: jnp.sum(matmul.add_broadcast(x, r).astype(jnp.float32) * w))(row)
    assert grad.dtype == jnp.bfloat16
    assert float(grad[0, 0]) == 1.015625


def test_add_broadcast_refuses_a_row_that_is_not_one_row():
    x = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match=r"add_broadcast needs x \[B, ...\] and row \[1, ...\]"):
        matmul.add_broadcast(x, jnp.ones((2, 5, 4)))
    with pytest.raises(ValueError, match="add_broadcast needs"):
        matmul.add_broadcast(x, jnp.ones((1, 5, 4), jnp.bfloat16))
