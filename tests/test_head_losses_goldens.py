"""Head and losses against the official PyTorch code's outputs (goldens a, b, b2, c, c2, c3)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import losses
from larvseg_jax.models.head import CosineHead


def load(goldens_dir, case):
    meta = json.loads((goldens_dir / f"{case}.json").read_text())
    return meta, dict(np.load(goldens_dir / f"{case}.npz"))


def params_of(d):
    return {
        k2: jnp.asarray(d[k1])
        for k1, k2 in [
            ("P", "proj_patch"),
            ("Q", "proj_classes"),
            ("E", "cls_emb"),
            ("gamma", "gamma"),
            ("beta", "beta"),
        ]
    }


def nhwc(x):  # torch (B, C, h, w) -> (B, h, w, C)
    return np.transpose(x, (0, 2, 3, 1))


def labels_of(d, ignore):
    lab = d["label"][:, 0].astype(np.int64)
    return np.where(lab == ignore, -1, lab)


def weighted_loss(params, x, labels, cls_index, kind, weight):
    head = CosineHead(num_classes=params["cls_emb"].shape[0], dtype=x.dtype)
    logits, _ = head.apply({"params": params}, x, cls_index)
    logits, labels = losses.loss_grid_inputs(logits, labels, 2)
    if kind == "seg":
        return weight * losses.seg_ce(logits, labels)
    return weight * losses.image_level_ce(logits, labels)[0]


@pytest.mark.parametrize("prefix", ["ade", "coco", "test"])
@pytest.mark.parametrize("x64", [False, True])
def test_head_forward_matches_official(goldens_dir, prefix, x64):
    _meta, d = load(goldens_dir, "a_head_forward")
    with jax.enable_x64(x64):
        dtype = jnp.float64 if x64 else jnp.float32
        params = jax.tree.map(lambda a: a.astype(dtype), params_of(d))
        head = CosineHead(num_classes=12, dtype=dtype)
        logits, aux = head.apply(
            {"params": params},
            jnp.asarray(nhwc(d["x"]), dtype),
            jnp.asarray(d[f"{prefix}_cls_index"]),
        )
        tol = {"rtol": 1e-10, "atol": 1e-12} if x64 else {"rtol": 1e-4, "atol": 1e-5}
        np.testing.assert_allclose(logits, nhwc(d[f"{prefix}_logits"]), **tol)
        np.testing.assert_allclose(aux["score"], nhwc(d[f"{prefix}_score"]), **tol)
        np.testing.assert_allclose(aux["embed"], nhwc(d[f"{prefix}_embed"]), **tol)


CASES = [
    ("b_seg_ce", "seg"),
    ("b2_seg_ce_x8", "seg"),
    ("c_weak_ce", "weak"),
    ("c2_weak_ce_ignore_m1", "weak"),
    ("c3_weak_ce_no_pairs", "weak"),
]


@pytest.mark.parametrize("case,kind", CASES)
def test_loss_and_gradients_match_official(goldens_dir, case, kind):
    meta, d = load(goldens_dir, case)
    with jax.enable_x64(True):
        params = params_of(d)
        x = jnp.asarray(nhwc(d["x"]))
        labels = jnp.asarray(labels_of(d, meta["ignore_index"]))
        cls_index = jnp.asarray(meta["cls_index"])
        fn = lambda p, x: weighted_loss(p, x, labels, cls_index, kind, meta["basic_loss_weight"])
        loss, (g_params, g_x) = jax.value_and_grad(fn, argnums=(0, 1))(params, x)
        np.testing.assert_allclose(loss, d["loss_basic"], rtol=1e-9, atol=1e-12)
        names = {
            "proj_patch": "P",
            "proj_classes": "Q",
            "cls_emb": "E",
            "gamma": "gamma",
            "beta": "beta",
        }
        for ours, theirs in names.items():
            np.testing.assert_allclose(g_params[ours], d[f"grad_{theirs}"], rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(g_x, nhwc(d["grad_x"]), rtol=1e-8, atol=1e-12)


def golden_logits(meta, d):
    """Float64 head logits [B, h, w, N] of a loss golden's features (call under x64)."""
    head = CosineHead(num_classes=d["E"].shape[0], dtype=jnp.float64)
    return head.apply(
        {"params": params_of(d)}, jnp.asarray(nhwc(d["x"])), jnp.asarray(meta["cls_index"])
    )[0]


@pytest.mark.parametrize("case", ["b_seg_ce", "b2_seg_ce_x8", "c_weak_ce"])
def test_loss_grid_inputs_match_official(goldens_dir, case):
    meta, d = load(goldens_dir, case)
    with jax.enable_x64(True):
        logits = golden_logits(meta, d)
        labels = labels_of(d, meta["ignore_index"])
        up, ds = losses.loss_grid_inputs(logits, jnp.asarray(labels), 2)
        np.testing.assert_allclose(up, nhwc(d["logits_up"]), rtol=1e-10, atol=1e-12)
        np.testing.assert_array_equal(ds, labels_of({"label": d["label_ds"]}, meta["ignore_index"]))


@pytest.mark.parametrize("case", ["c_weak_ce", "c2_weak_ce_ignore_m1"])
def test_pair_ces_in_official_loop_order(goldens_dir, case):
    meta, d = load(goldens_dir, case)
    with jax.enable_x64(True):
        logits = golden_logits(meta, d)
        up, ds = losses.loss_grid_inputs(logits, jnp.asarray(labels_of(d, meta["ignore_index"])), 2)
        _, aux = losses.image_level_ce(up, ds)
        present = np.asarray(aux["present"])
        got = np.asarray(aux["pair_ce"])[present]  # row-major = b ascending, then l ascending
        np.testing.assert_allclose(got, d["pair_ce"], rtol=1e-10)
        assert [p["l"] for p in meta["pairs"]] == list(np.nonzero(present)[1])
