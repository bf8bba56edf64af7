"""The CA-classifier against the official code's six-step ImageNet-device sequence (golden d2)."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import ca_bank, losses
from larvseg_jax import ca_classifier as ca
from larvseg_jax.models.head import CosineHead

MAX_LABELS = 4  # every image of the golden holds one class


def load_golden(goldens_dir):
    meta = json.loads((goldens_dir / "d2_coseg_imagenet_device.json").read_text())
    return meta, dict(np.load(goldens_dir / "d2_coseg_imagenet_device.npz"))


@pytest.fixture(scope="module")
def golden(goldens_dir):
    return load_golden(goldens_dir)


def nhwc(x):
    return np.transpose(x, (0, 2, 3, 1))


def settings(cfg):
    return ca.CASettings(
        memory_size=cfg["memory_bank_size"],
        topk=cfg["foreground_topk"],
        warm_up=cfg["memory_bank_warm_up"],
        background=cfg["background_suppression"],
        bg_topk=cfg["background_topk"],
        bg_thresh=cfg["background_thresh"],
        bg_mse_thresh=cfg["background_mse_thresh"],
    )


def device_losses(params, x, labels, bank, cls_index, cfg, ca_settings):
    """The ImageNet device's loss_basic + loss_coseg and the updated bank (SPEC 2.3, 2.4)."""
    head = CosineHead(num_classes=params["cls_emb"].shape[0], dtype=x.dtype)
    logits, aux = head.apply({"params": params}, x, cls_index)
    b, h, w, n = logits.shape
    up, ds = losses.loss_grid_inputs(logits, labels, 2)
    basic, _ = losses.image_level_ce(up, ds)
    present = losses.present_classes(ds, n)
    writes, pairs = ca.attend(
        bank,
        aux["embed"].reshape(b, h * w, -1),
        aux["score"].reshape(b, h * w, n),
        present,
        cls_index,
        ca_settings,
        max_labels=MAX_LABELS,
    )
    bank = ca_bank.enqueue(bank, writes)
    aux_loss, ce = ca.attentive_ce(
        logits, pairs["a"], pairs["label"], pairs["valid"], pairs["warm"], present, ds.shape[1:]
    )
    w_basic, w_aux = cfg["basic_loss_weights"][2], cfg["coseg_loss_weights"][2]
    return w_basic * basic + w_aux * aux_loss, (w_basic * basic, w_aux * aux_loss, bank, pairs, ce)


def six_steps_match_official(meta, d, ca_settings):
    """Runs the golden's six steps from its initial bank; asserts every output matches."""
    cfg = meta["cfg"]
    with jax.enable_x64(True):
        params = {
            "proj_patch": d["P"],
            "proj_classes": d["Q"],
            "cls_emb": d["E"],
            "gamma": d["gamma"],
            "beta": d["beta"],
        }
        params = jax.tree.map(jnp.asarray, params)
        feats = jnp.asarray(d["bank0_queue"])
        bank = ca_bank.Bank(
            feats,
            feats.mean(axis=2),
            feats.mean(axis=(1, 2)),
            jnp.asarray(d["bank0_ptr"], jnp.int32),
            jnp.asarray(d["bank0_full"], jnp.int32),
        )
        cls_index = jnp.asarray(meta["cls_index"])
        # Jitted (one program for the six steps: op-by-op dispatch took 15 s).
        step_fn = functools.partial(device_losses, cfg=cfg, ca_settings=ca_settings)
        fn = jax.jit(jax.value_and_grad(step_fn, argnums=(0, 1), has_aux=True))
        for step in range(meta["n_steps"]):
            x = jnp.asarray(nhwc(d[f"step{step}_x"]))
            labels = jnp.asarray(d[f"step{step}_label"][:, 0])
            (_, (basic, aux, bank, pairs, ce)), (g_p, g_x) = fn(params, x, labels, bank, cls_index)
            np.testing.assert_allclose(basic, d[f"step{step}_loss_basic"], rtol=1e-9)
            np.testing.assert_allclose(aux, d[f"step{step}_loss_coseg"], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(bank.feats, d[f"step{step}_bank_queue"], atol=1e-12)
            np.testing.assert_allclose(
                bank.slot_means, d[f"step{step}_bank_queue"].mean(2), atol=1e-12
            )
            np.testing.assert_array_equal(bank.ptr, d[f"step{step}_bank_ptr"])
            np.testing.assert_array_equal(bank.full, d[f"step{step}_bank_full"])
            for ours, theirs in [
                ("proj_patch", "P"),
                ("proj_classes", "Q"),
                ("cls_emb", "E"),
                ("gamma", "gamma"),
                ("beta", "beta"),
            ]:
                np.testing.assert_allclose(
                    g_p[ours], d[f"step{step}_grad_{theirs}"], rtol=1e-7, atol=1e-12
                )
            np.testing.assert_allclose(g_x, nhwc(d[f"step{step}_grad_x"]), rtol=1e-7, atol=1e-12)
            # Per pair, in the official loop order (one label per image here).
            for info in meta["steps"][step]["pairs"]:
                i, b = info["pair"], info["b"]
                assert int(pairs["label"][b, 0]) == info["l"]
                assert bool(pairs["warm"][b, 0]) == info["warm"]
                np.testing.assert_allclose(
                    ce[b, 0], d[f"step{step}_pair{i}_aux_term"], rtol=1e-9, atol=1e-12
                )
                if f"step{step}_pair{i}_S_fg" in d:
                    np.testing.assert_allclose(
                        pairs["s_fg"][b, 0], d[f"step{step}_pair{i}_S_fg"], atol=1e-12
                    )
                    np.testing.assert_allclose(
                        pairs["s_bg"][b, 0], d[f"step{step}_pair{i}_S_bg"], atol=1e-12
                    )
                    np.testing.assert_allclose(
                        pairs["a"][b, 0], d[f"step{step}_pair{i}_a"], rtol=1e-9, atol=1e-10
                    )
                if info["n_bg_kept"] is not None:
                    assert int(pairs["bg_mask"][b, 0].sum()) == info["n_bg_kept"]


def test_six_steps_match_official(golden):
    meta, d = golden
    six_steps_match_official(meta, d, settings(meta["cfg"]))
