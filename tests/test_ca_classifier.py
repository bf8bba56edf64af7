"""CA-classifier against the loop-based numpy reference of SPEC 2.4 / 2.5, plus its invariants."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import ca_classifier as ca
from larvseg_jax import losses
from tests import reference

C, M, K, D, N, SIDE = 7, 2, 3, 8, 5, 4
CLS_INDEX = np.array([4, 0, 6, 2, 3])


def random_step(rng, kinds):
    """One device batch: embed [B, P, D] unit, score [B, P, N], loss-grid labels, logits."""
    b = len(kinds)
    embed = reference.l2n(rng.normal(size=(b, SIDE * SIDE, D)))
    score = np.tanh(rng.normal(size=(b, SIDE * SIDE, N)))
    labels = np.full((b, 2 * SIDE, 2 * SIDE), -1)
    for i, kind in enumerate(kinds):
        if kind == "single":
            labels[i] = rng.integers(0, N)
            if rng.random() < 0.5:  # no other class scores above bg_thresh: fallback 1 - S_fg
                score[i] *= 0.1
        else:
            classes = rng.choice(N, size=rng.integers(2, 4), replace=False)
            labels[i] = rng.choice(np.append(classes, -1), size=labels[i].shape)
            labels[i, 0, : len(classes)] = classes  # every chosen class present
    logits = rng.normal(size=(b, 2 * SIDE, 2 * SIDE, N))
    return embed, score, labels, logits


def run_jax(bank, embed, score, labels, logits, cfg):
    present = losses.present_classes(jnp.asarray(labels), N)
    bank, pairs = ca.scan_pairs(
        bank, jnp.asarray(embed), jnp.asarray(score), present, jnp.asarray(CLS_INDEX), cfg
    )
    loss, ce = ca.attentive_ce(
        jnp.asarray(logits),
        pairs["a"],
        pairs["label"],
        pairs["valid"],
        pairs["warm"],
        present,
        (SIDE, SIDE),
    )
    return loss, bank, pairs, ce


@pytest.mark.parametrize("single_image", [False, True])
def test_several_steps_match_loop_reference(single_image):
    cfg = ca.CASettings(
        memory_size=1 if single_image else M,
        topk=K,
        warm_up=0 if single_image else 1,
        bg_thresh=0.3,
        bg_mse_thresh=1.6,
        max_labels=4,
        single_image=single_image,
    )
    ref_cfg = {
        "warm_up": cfg.warm_up,
        "topk": K,
        "bg_topk": 5,
        "bg_thresh": 0.3,
        "bg_mse_thresh": 1.6,
        "single_image": single_image,
    }
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        bank = ca.init_bank(jax.random.PRNGKey(0), C, cfg.memory_size, K, D, jnp.float64)
        queue, ptr, full = (np.asarray(x) for x in bank[:3])
        seen_warm = seen_fallback = seen_multi_bg = seen_kept_bg = False
        for step in range(8):
            kinds = ["multi", "single", "single"] if step % 2 else ["single", "multi", "multi"]
            embed, score, labels, logits = random_step(rng, kinds)
            loss, bank, pairs, ce = run_jax(bank, embed, score, labels, logits, cfg)
            ref_loss, queue, ptr, full, ref_pairs = reference.ca_reference(
                queue, ptr, full, embed, score, labels, logits, CLS_INDEX, ref_cfg
            )
            np.testing.assert_allclose(loss, ref_loss, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(bank.feats, queue, atol=1e-12)
            np.testing.assert_array_equal(bank.ptr, ptr)
            np.testing.assert_array_equal(bank.full, full)
            np.testing.assert_allclose(bank.means, queue.mean(axis=(1, 2)), atol=1e-12)
            slot = {}
            for info in ref_pairs:
                j = slot[info["b"]] = slot.get(info["b"], -1) + 1
                b = info["b"]
                assert int(pairs["label"][b, j]) == info["l"]
                np.testing.assert_allclose(ce[b, j], info["term"], rtol=1e-9, atol=1e-12)
                if "a" in info:
                    seen_warm = True
                    np.testing.assert_allclose(pairs["a"][b, j], info["a"], rtol=1e-8, atol=1e-9)
                    np.testing.assert_array_equal(np.nonzero(pairs["bg_mask"][b, j])[0], info["bg"])
                    multi = (labels[b] >= 0).any() and len(set(labels[b].ravel()) - {-1}) > 1
                    seen_multi_bg |= multi
                    seen_kept_bg |= (not multi) and bool(info["bg"])
                    seen_fallback |= not info["bg"]
        assert (seen_warm, seen_fallback, seen_multi_bg, seen_kept_bg) == (True,) * 4


def test_pointer_wraps_after_m_writes_and_counts_wraps():
    bank = ca.init_bank(jax.random.PRNGKey(1), 3, 4, 2, 5)
    feats = jnp.ones((2, 5)) / np.sqrt(5)
    for i in range(9):
        bank = ca.enqueue(bank, jnp.int32(1), feats * (i + 1), jnp.bool_(True))
    assert int(bank.ptr[1]) == 9 % 4 and int(bank.full[1]) == 2
    assert int(bank.ptr[0]) == 0 and int(bank.full[0]) == 0
    bank2 = ca.enqueue(bank, jnp.int32(1), feats, jnp.bool_(False))  # padded pair: no write
    jax.tree.map(np.testing.assert_array_equal, bank2, bank)


def test_aux_is_zero_until_the_class_has_wrapped_once():
    cfg = ca.CASettings(memory_size=3, topk=2, warm_up=1, max_labels=2)
    rng = np.random.default_rng(3)
    bank = ca.init_bank(jax.random.PRNGKey(2), C, 3, 2, D)
    labels = np.zeros((1, 2 * SIDE, 2 * SIDE), int)  # class 0 only, single-label
    for step in range(4):
        embed = reference.l2n(rng.normal(size=(1, SIDE * SIDE, D)))
        score = np.tanh(rng.normal(size=(1, SIDE * SIDE, N)))
        loss, bank, pairs, _ = run_jax(
            bank, embed, score, labels, rng.normal(size=(1, 8, 8, N)), cfg
        )
        assert (float(loss) > 0) == (step >= 3)  # wraps after 3 writes: warm from the 4th


def test_topk_enqueues_the_highest_scoring_pixels():
    cfg = ca.CASettings(memory_size=2, topk=3, max_labels=2)
    embed = reference.l2n(np.random.default_rng(4).normal(size=(1, 16, D)))
    score = np.zeros((1, 16, N))
    score[0, [5, 9, 2], 1] = [0.9, 0.8, 0.7]
    labels = np.ones((1, 8, 8), int)
    bank = ca.init_bank(jax.random.PRNGKey(3), C, 2, 3, D)
    _, bank, _, _ = run_jax(bank, embed, score, labels, np.zeros((1, 8, 8, N)), cfg)
    np.testing.assert_allclose(bank.feats[CLS_INDEX[1], 0], embed[0, [5, 9, 2]], rtol=1e-6)


def test_without_background_suppression_attention_is_one_half():
    """SPEC B1: the official no-suppression path gives A = sigmoid(0) everywhere."""
    cfg = ca.CASettings(memory_size=1, topk=2, warm_up=0, background=False, max_labels=2)
    rng = np.random.default_rng(5)
    embed, score, labels, logits = random_step(rng, ["multi"])
    bank = ca.init_bank(jax.random.PRNGKey(4), C, 1, 2, D)
    _, _, pairs, _ = run_jax(bank, embed, score, labels, logits, cfg)
    assert not np.any(np.asarray(pairs["a"]))


def test_fix_flags_change_only_what_they_name():
    """B2: cold (never wrapped) background classes are skipped; B4: constant maps survive mse."""
    n = 4
    s_vocab = np.tile(np.linspace(-1, 1, 16)[:, None], (1, n))
    s_vocab[:, 2] = 0.3  # a constant column: unbiased z-score is 0/0 without epsilon
    s_vocab[:, 3] = -s_vocab[:, 0]  # anti-correlated with the foreground
    args = (
        jnp.asarray(s_vocab),
        jnp.asarray(s_vocab[:, 0]),
        jnp.int32(0),
        jnp.asarray([True, False, False, False]),
        jnp.int32(1),
        jnp.ones(n),
        jnp.asarray([1, 1, 1, 0]),
    )
    faithful = ca.background_mask(*args, ca.CASettings(bg_thresh=0.2, bg_mse_thresh=0.5))
    assert np.asarray(faithful).tolist() == [False, False, False, True]  # NaN drops class 2
    nan_safe = ca.background_mask(*args, ca.CASettings(bg_mse_thresh=0.5, nan_safe_mse=True))
    assert np.asarray(nan_safe).tolist() == [False, False, True, True]
    cold = ca.background_mask(*args, ca.CASettings(bg_mse_thresh=0.5, mask_cold_background=True))
    assert np.asarray(cold).tolist() == [False, False, False, False]  # class 3 never wrapped
