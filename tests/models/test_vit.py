"""ViT (models/vit.py) with imported AugReg weights against the official backbone (golden g)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import interp
from larvseg_jax.models import matmul, pretrained, vit
from tests.models.golden_vit import TINY

TAGS = ("in64", "in48", "in40x56", "in32x128")


def nhwc(x):  # torch (B, C, h, w) -> (B, h, w, C)
    return np.transpose(x, (0, 2, 3, 1))


@pytest.fixture(scope="module")
def params(goldens_dir):
    shapes = jax.eval_shape(
        lambda: vit.ViT(**TINY).init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    return pretrained.load_augreg_npz(
        goldens_dir / "g_tiny_augreg.npz", shapes["params"], pos_grid=TINY["pos_grid"]
    )


@functools.cache
def apply_fn(**fields):
    model = vit.ViT(**{**TINY, **fields})
    return jax.jit(functools.partial(model.apply, train=False))


@pytest.mark.parametrize("tag", TAGS)
def test_eval_output_matches_official_with_token_count_rule(golden_g, params, tag):
    images = jnp.asarray(nhwc(golden_g[f"{tag}_img"]), jnp.float32)
    got = apply_fn(pos_resize_rule="token_count")({"params": params}, images)
    want = nhwc(golden_g[f"{tag}_neck"])
    assert got.shape == want.shape  # in40x56 is zero-padded to 48x64: grid 3x4
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)


def test_eval_output_matches_official_in_float64(goldens_dir, golden_g):
    with jax.enable_x64(True):
        model = vit.ViT(**TINY, pos_resize_rule="token_count", dtype=jnp.float64)
        shapes = jax.eval_shape(
            lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
        )
        p64 = pretrained.load_augreg_npz(
            goldens_dir / "g_tiny_augreg.npz",
            shapes["params"],
            pos_grid=TINY["pos_grid"],
            dtype=np.float64,
        )
        for tag in ("in48", "in32x128"):
            images = jnp.asarray(nhwc(golden_g[f"{tag}_img"]))
            got = jax.jit(functools.partial(model.apply, train=False))({"params": p64}, images)
            want = nhwc(golden_g[f"{tag}_neck"])
            np.testing.assert_allclose(np.asarray(got), want, rtol=1e-9, atol=1e-10)


def test_shape_rule_resizes_non_square_grid_with_equal_token_count(golden_g, params):
    images = jnp.asarray(nhwc(golden_g["in32x128_img"]), jnp.float32)
    got = apply_fn(pos_resize_rule="shape")({"params": params}, images)  # grid 2x8, 16 tokens
    # Same as a model whose stored table was resized to 2x8 up front.
    table = params["Transformer"]["posembed_input"]["pos_embedding"]
    resized = jax.tree.map(lambda x: x, params)
    resized["Transformer"]["posembed_input"]["pos_embedding"] = interp.resize_pos_embed(
        table, (4, 4), (2, 8)
    )
    want = apply_fn(pos_grid=(2, 8))({"params": resized}, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # ...and therefore not the official output, which adds the 4x4 table row-major (SPEC D1).
    assert np.abs(np.asarray(got) - nhwc(golden_g["in32x128_neck"])).max() > 1e-2


@pytest.mark.parametrize("tag", ("in64", "in48", "in40x56"))
def test_shape_rule_agrees_with_official_on_other_grids(golden_g, params, tag):
    images = jnp.asarray(nhwc(golden_g[f"{tag}_img"]), jnp.float32)
    got = apply_fn(pos_resize_rule="shape")({"params": params}, images)
    np.testing.assert_allclose(np.asarray(got), nhwc(golden_g[f"{tag}_neck"]), rtol=1e-4, atol=1e-5)


def test_xla_attention_gives_the_same_output(golden_g, params):
    images = jnp.asarray(nhwc(golden_g["in48_img"]), jnp.float32)
    got = apply_fn(attention="xla")({"params": params}, images)
    want = apply_fn(attention="custom_vjp")({"params": params}, images)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # Equal outputs prove nothing unless the option reaches the attention call.
    with pytest.raises(ValueError, match="unknown attention implementation 'bogus'"):
        apply_fn(attention="bogus")({"params": params}, images)


def test_drop_path_is_identity_in_eval_and_active_in_train(params):
    images = jax.random.normal(jax.random.PRNGKey(1), (8, 32, 32, 3))
    model = vit.ViT(**{**TINY, "drop_path_rate": 0.5})  # block 1 drops each branch w.p. 0.5
    evaluated = jax.jit(functools.partial(model.apply, train=False))({"params": params}, images)
    plain = apply_fn()({"params": params}, images)
    np.testing.assert_allclose(np.asarray(evaluated), np.asarray(plain), rtol=1e-6, atol=1e-6)
    apply_train = jax.jit(functools.partial(model.apply, train=True))

    def train(seed):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return np.asarray(apply_train({"params": params}, images, rngs=rngs))

    first, again, other = train(0), train(0), train(1)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - np.asarray(plain)).max() > 1e-3
    assert np.abs(first - other).max() > 1e-3


def test_drop_path_zeroes_or_rescales_whole_samples():
    x = jnp.ones((4000, 3, 2))
    y = np.asarray(vit.drop_path(x, 0.25, jax.random.PRNGKey(0)))
    per_sample = y.reshape(4000, -1)
    assert np.all(per_sample == per_sample[:, :1])  # one decision per sample
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    np.testing.assert_allclose(y.mean(), 1.0, atol=0.05)  # expectation kept


def test_param_names_follow_augreg_and_variants_build():
    model = vit.vit_from_variant("micro", pos_grid=(2, 2))
    images = jnp.zeros((1, 20, 12, 3))
    init = jax.jit(functools.partial(model.init, train=False))
    variables = init(jax.random.PRNGKey(0), images)
    p = variables["params"]
    assert set(p) == {"embedding", "cls", "Transformer"}
    assert set(p["Transformer"]) == {"posembed_input", "encoderblock_0", "encoder_norm"}
    att = p["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
    assert att["query"]["kernel"].shape == (32, 2, 16)
    assert att["out"]["kernel"].shape == (2, 16, 32)
    assert set(p["Transformer"]["encoderblock_0"]["MlpBlock_3"]) == {"Dense_0", "Dense_1"}
    out = jax.jit(functools.partial(model.apply, train=False))(variables, images)
    assert out.shape == (1, 3, 2, 32)  # 20x12 padded to 24x16, patch 8
    assert vit.VARIANTS["B/16"] == {
        "width": 768,
        "depth": 12,
        "num_heads": 12,
        "mlp_dim": 3072,
        "patch_size": 16,
    }
    with pytest.raises(ValueError, match="unknown ViT variant"):
        vit.vit_from_variant("L/14")


def test_gelu_is_pytorchs_erf_formula():
    """0.5 x (1 + erf(x / sqrt 2)) in float64 (math.erf), and what flax's exact form gives."""
    import math

    x = np.concatenate([np.linspace(-12, 12, 2001), [-1e-3, 0.0, 1e-3]]).astype(np.float32)
    want = np.array([0.5 * v * (1 + math.erf(v / math.sqrt(2))) for v in x.astype(np.float64)])
    got = np.asarray(vit.gelu(jnp.asarray(x)), np.float64)
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6)
    flax_exact = np.asarray(jax.nn.gelu(jnp.asarray(x), approximate=False), np.float64)
    np.testing.assert_allclose(got, flax_exact, rtol=2e-6, atol=2e-6)
    assert not np.allclose(got, jax.nn.gelu(jnp.asarray(x), approximate=True), atol=1e-4)
    grad = jax.grad(lambda t: vit.gelu(t).sum())(jnp.asarray(x))
    want_grad = [
        0.5 * (1 + math.erf(v / math.sqrt(2))) + v * math.exp(-v * v / 2) / math.sqrt(2 * math.pi)
        for v in x.astype(np.float64)
    ]
    np.testing.assert_allclose(np.asarray(grad, np.float64), want_grad, rtol=1e-5, atol=2e-6)


def test_gradients_equal_autodiff_of_plain_projections_in_float64(monkeypatch):
    """The model's projections (patch embedding, QKV, out, MLP) through `matmul.dense`'s
    hand-written VJP give the gradients that autodiff of plain einsums gives."""

    def plain_dense(x, kernel, bias=None, out_dtype=None, gemm="auto"):
        y = jnp.einsum("...i,io->...o", x, kernel)
        return (y if bias is None else y + bias).astype(out_dtype or x.dtype)

    with jax.enable_x64(True):
        model = vit.ViT(**TINY, dtype=jnp.float64, attention="xla")
        images = jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64, 3)), jnp.float64)
        params = jax.tree.map(
            lambda p: p.astype(jnp.float64),
            model.init(jax.random.PRNGKey(0), images, train=False)["params"],
        )
        out_shape = jax.eval_shape(lambda: model.apply({"params": params}, images, train=False))
        sink = jnp.asarray(np.random.default_rng(1).normal(size=out_shape.shape), jnp.float64)

        def grads():
            return jax.grad(
                lambda p: jnp.sum(model.apply({"params": p}, images, train=False) * sink)
            )(params)

        got = grads()
        monkeypatch.setattr(matmul, "dense", plain_dense)
        want = grads()
    for (path, g), r in zip(
        jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
    ):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-12, err_msg=jax.tree_util.keystr(path))
