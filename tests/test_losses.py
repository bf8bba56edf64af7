"""Losses and head against the plain-numpy reference of SPEC's equations on random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import losses
from larvseg_jax.models.head import CosineHead
from tests import reference


def random_labels(rng, shape, num_classes, ignore_frac=0.1):
    labels = rng.integers(0, num_classes, shape)
    return np.where(rng.random(shape) < ignore_frac, -1, labels)


def test_head_matches_numpy_reference():
    rng = np.random.default_rng(0)
    d, n_union = 16, 9
    x = rng.normal(size=(2, 4, 5, d)).astype(np.float32)
    cls_index = np.array([3, 1, 1, 7, 0])
    head = CosineHead(num_classes=n_union)
    params = head.init(jax.random.PRNGKey(0), x, cls_index)["params"]
    params = dict(params, gamma=jnp.float32(1.7), beta=jnp.float32(-0.3))
    logits, aux = head.apply({"params": params}, x, cls_index)
    p = jax.tree.map(np.asarray, params)
    z, s, e = reference.head_forward(
        x.astype(np.float64), p["proj_patch"], p["proj_classes"], p["cls_emb"], 1.7, -0.3, cls_index
    )
    np.testing.assert_allclose(logits, z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(aux["score"], s, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux["embed"], e, rtol=1e-5, atol=1e-6)


def test_head_init_matches_official_distributions():
    head = CosineHead(num_classes=400)
    x = np.zeros((1, 1, 1, 256), np.float32)
    p = head.init(jax.random.PRNGKey(1), x, np.arange(3))["params"]
    assert abs(float(jnp.std(p["cls_emb"])) - 0.02) < 0.001  # plain normal, SPEC D2
    assert abs(float(jnp.std(p["proj_patch"])) - 256**-0.5) < 0.002
    assert float(p["gamma"]) == 1.0 and float(p["beta"]) == 0.0


@pytest.mark.parametrize("normalize", ["all_pixels", "valid_pixels"])
def test_seg_ce_matches_reference(normalize):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 6, 7, 5)).astype(np.float32)
    labels = random_labels(rng, (2, 6, 7), 5, ignore_frac=0.3)
    got = losses.seg_ce(jnp.asarray(logits), jnp.asarray(labels), normalize=normalize)
    np.testing.assert_allclose(
        got, reference.seg_ce(logits.astype(np.float64), labels, normalize), rtol=1e-5
    )


def test_seg_ce_rejects_unknown_normalisation():
    with pytest.raises(ValueError, match="seg_normalize"):
        losses.seg_ce(jnp.zeros((1, 2, 2, 3)), jnp.zeros((1, 2, 2), jnp.int32), normalize="mean")


def test_image_level_ce_matches_reference():
    rng = np.random.default_rng(2)
    logits = (3 * rng.normal(size=(3, 6, 6, 8))).astype(np.float32)
    labels = rng.choice([0, 2, 5, 7, -1], size=(3, 6, 6))
    labels[2] = -1  # an image without labels contributes no pair
    labels[1] = 4  # a single-label image
    got, aux = losses.image_level_ce(jnp.asarray(logits), jnp.asarray(labels))
    want, pair_ces = reference.image_level_ce(logits.astype(np.float64), labels)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(aux["pair_ce"])[np.asarray(aux["present"])], pair_ces, rtol=1e-5
    )
    assert int(aux["num_pairs"]) == len(pair_ces)


def test_image_level_ce_without_pairs_is_zero_with_zero_gradient():
    labels = -jnp.ones((2, 4, 4), jnp.int32)
    loss, grad = jax.value_and_grad(lambda z: losses.image_level_ce(z, labels)[0])(
        jnp.ones((2, 4, 4, 3))
    )
    assert float(loss) == 0.0 and not np.any(np.asarray(grad))


def test_upsampling_matches_reference():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(1, 4, 5, 3)).astype(np.float32)
    labels = random_labels(rng, (1, 16, 20), 3)
    up, ds = losses.loss_grid_inputs(jnp.asarray(logits), jnp.asarray(labels), 2)
    np.testing.assert_allclose(
        up, reference.upsample(logits.astype(np.float64), (8, 10)), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(ds, labels[:, ::2, ::2])  # PyTorch "nearest" x0.5 = [::2]


def test_present_classes_ignores_ignore_pixels():
    labels = jnp.asarray([[[0, -1], [3, 3]], [[-1, -1], [-1, -1]]])
    present = np.asarray(losses.present_classes(labels, 4))
    np.testing.assert_array_equal(present, [[1, 0, 0, 1], [0, 0, 0, 0]])


def test_padding_columns_equal_deleting_them():
    """A sampled vocabulary padded with masked columns gives the unpadded losses (SPEC 2.6)."""
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 3, 8)).astype(np.float32)
    cls_index = np.array([0, 2, 5, 1, 1])
    mask = np.array([True, True, False, True, False])
    head = CosineHead(num_classes=6)
    params = head.init(jax.random.PRNGKey(0), x, cls_index)["params"]
    masked, _ = head.apply({"params": params}, x, cls_index, jnp.asarray(mask))
    plain, _ = head.apply({"params": params}, x, cls_index[mask])
    np.testing.assert_allclose(np.asarray(masked)[..., mask], plain, rtol=1e-5, atol=1e-6)
    labels = rng.choice([0, 1, -1], size=(2, 3, 3))  # ids in the unpadded vocabulary
    padded_labels = np.where(labels >= 0, np.flatnonzero(mask)[np.maximum(labels, 0)], -1)
    for fn in (
        lambda z, y, m: losses.seg_ce(z, y, class_mask=m),
        lambda z, y, m: losses.image_level_ce(z, y, m)[0],
    ):
        np.testing.assert_allclose(
            fn(masked, jnp.asarray(padded_labels), jnp.asarray(mask)),
            fn(plain, jnp.asarray(labels), None),
            rtol=1e-5,
        )
