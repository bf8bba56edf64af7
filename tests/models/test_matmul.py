"""models/matmul.py: float32 is plain einsum; bf16 multiplies in bf16 and accumulates in float32
in both passes, with gradients of the same equation."""

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


def dots(jaxpr) -> list[tuple[str, str, str]]:
    """(lhs, rhs, out) dtypes of every dot_general in a closed jaxpr, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(tuple(str(v.aval.dtype) for v in (*eqn.invars, *eqn.outvars)))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            found += dots(sub)
    return found


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
