"""Memory and speed options of the model against the faithful default (float32, no remat), on
the LarvSeg group loss of both sources (segmentation, and weak labels with the CA-classifier)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import segmenter, vit
from larvseg_jax.train_step import group_loss
from tests.test_train_step import PLAN, SOURCES, get_setup, main_batch, make_batch, run_step


@functools.cache
def loss_and_grads(name, seed=0, **options):
    """Loss, unweighted terms and gradients of one group of source `name` with the micro ViT
    built with `options` (remat, dtype), at the shared setup's initial params and bank."""
    setup = get_setup("larvseg")
    backbone = vit.vit_from_variant("micro", pos_grid=(4, 4), drop_path_rate=0.2, **options)
    dtype = options.get("dtype", jnp.float32)
    model = segmenter.Segmenter(backbone=backbone, num_classes=5, dtype=dtype)
    spec = SOURCES[[s.name for s in SOURCES].index(name)]
    g = PLAN.index(name)
    batch = make_batch(seed)[name]
    bank = jax.tree.map(lambda x: x[g], setup.state.bank._replace(feats=None))

    def loss_fn(params):
        loss, aux = group_loss(
            params,
            batch["image"][g],
            batch["label"][g],
            jax.random.PRNGKey(seed),
            model=model,
            spec=spec,
            settings=setup.settings,
            bank=bank if spec.ca_weight else None,
        )
        return loss, (aux["basic"], aux["aux"])

    step = jax.value_and_grad(loss_fn, has_aux=True)
    (loss, terms), grads = jax.jit(step)(setup.state.params)
    remat_blocks = str(jax.make_jaxpr(step)(setup.state.params)).count("remat2[")
    return float(loss), [float(t) for t in terms], jax.tree.leaves(grads), remat_blocks


def cosine(a, b):
    a = np.concatenate([np.ravel(x) for x in a]).astype(np.float64)
    b = np.concatenate([np.ravel(x) for x in b]).astype(np.float64)
    return a @ b / np.linalg.norm(a) / np.linalg.norm(b)


@pytest.mark.parametrize("name", ["seg", "weak"])
def test_remat_recomputes_the_same_step(name):
    """Rematerialisation recomputes the same forward: loss and gradients to float rounding."""
    loss, terms, grads, none = loss_and_grads(name)
    loss_r, terms_r, grads_r, blocks = loss_and_grads(name, remat=True)
    assert none == 0 and blocks == vit.VARIANTS["micro"]["depth"]  # one per transformer block
    assert loss > 0 and loss_r == pytest.approx(loss, rel=1e-6)
    np.testing.assert_allclose(terms_r, terms, rtol=1e-6)
    for g, g_r in zip(grads, grads_r, strict=True):
        np.testing.assert_allclose(g_r, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["seg", "weak"])
def test_bfloat16_compute_stays_close_to_float32(name):
    """bf16 matmuls with float32 params, scores, losses and bank: loss within 2 %, gradients
    pointing the same way (cosine > 0.99), every gradient float32."""
    loss, terms, grads, _ = loss_and_grads(name)
    loss_b, terms_b, grads_b, _ = loss_and_grads(name, dtype=jnp.bfloat16)
    assert loss_b == pytest.approx(loss, rel=2e-2)
    np.testing.assert_allclose(terms_b, terms, rtol=2e-2, atol=1e-3)
    assert all(g.dtype == jnp.float32 for g in grads_b)
    assert cosine(grads_b, grads) > 0.99


def test_accumulated_gradients_give_the_same_step():
    """train.accumulate_gradients (the default): each group's gradient computed in its own
    backward pass and summed in the scan, vs one backward pass through all 8 groups of one
    device: params, optimizer, bank and metrics equal to float rounding. (Several devices run
    the same scan over fewer groups, then the same psum.)"""
    num_devices = 1
    setup = get_setup("larvseg")
    assert setup.settings.accumulate_gradients  # the default
    batch = main_batch()
    state, metrics = run_step(setup, num_devices, batch)
    one_backward = dataclasses.replace(
        setup, settings=dataclasses.replace(setup.settings, accumulate_gradients=False), steps={}
    )
    want_state, want = run_step(one_backward, num_devices, batch)
    assert bool(metrics["finite"])
    assert float(metrics["loss"]) == pytest.approx(float(want["loss"]), rel=1e-6)
    np.testing.assert_allclose(metrics["group_loss"], want["group_loss"], rtol=1e-6)
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), state.params, setup.state.params)
    assert max(jax.tree.leaves(moved)) > 1e-3  # the step did change the parameters
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
        (state.params, state.opt_state, state.bank),
        (want_state.params, want_state.opt_state, want_state.bank),
    )
