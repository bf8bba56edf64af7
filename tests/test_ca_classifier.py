"""CA-classifier against the loop-based numpy reference of SPEC 2.4 / 2.5, plus its invariants."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import ca_bank, losses
from larvseg_jax import ca_classifier as ca
from tests import reference

C, M, K, D, N, SIDE = 7, 2, 3, 8, 5, 4
CLS_INDEX = np.array([4, 0, 6, 2, 3])
MAX_LABELS = 4  # L: every random_step image has at most 3 classes


def random_step(rng, kinds):
    """One device batch: embed [B, P, D] unit, score [B, P, N], loss-grid labels, feature-grid
    logits [B, SIDE, SIDE, N] (the loss grid is twice as fine)."""
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
    logits = rng.normal(size=(b, SIDE, SIDE, N))
    return embed, score, labels, logits


def reference_step(queue, ptr, full, embed, score, labels, logits, ref_cfg):
    up = reference.upsample(logits, labels.shape[1:])
    return reference.ca_reference(queue, ptr, full, embed, score, labels, up, CLS_INDEX, ref_cfg)


def jax_step(cfg, max_labels=MAX_LABELS):
    """One CA step (attend, enqueue, attentive CE) as a jitted function of (bank, embed, score,
    labels, logits). Jitted because op-by-op dispatch compiled for ~7 s per new batch shape; a
    new function per call, so that the monkeypatches of test_ca_mutations reach its trace."""

    def step(bank, embed, score, labels, logits):
        present = losses.present_classes(labels, N)
        writes, pairs = ca.attend(
            bank, embed, score, present, jnp.asarray(CLS_INDEX), cfg, max_labels=max_labels
        )
        bank = ca_bank.enqueue(bank, writes)
        loss, ce = ca.attentive_ce(
            logits,
            pairs["a"],
            pairs["label"],
            pairs["valid"],
            pairs["warm"],
            present,
            labels.shape[1:],
        )
        return loss, bank, pairs, ce

    return jax.jit(step)


def run_jax(bank, embed, score, labels, logits, cfg, max_labels=MAX_LABELS):
    return jax_step(cfg, max_labels)(bank, embed, score, labels, logits)


def settings(single_image, memory_size, warm_up, bg_mse_thresh=1.6):
    """The same options for the JAX code (CASettings) and the numpy reference (a dict)."""
    cfg = ca.CASettings(
        memory_size=memory_size,
        topk=K,
        warm_up=warm_up,
        bg_thresh=0.3,
        bg_mse_thresh=bg_mse_thresh,
        single_image=single_image,
    )
    ref_cfg = {
        "warm_up": warm_up,
        "topk": K,
        "bg_topk": 5,
        "bg_thresh": 0.3,
        "bg_mse_thresh": bg_mse_thresh,
        "single_image": single_image,
    }
    return cfg, ref_cfg


def step_matches_reference(bank, batch, cfg, ref_cfg, step=None):
    """One step of both implementations on the same bank (`step`: a `jax_step` of cfg to
    reuse); asserts equality.

    Returns the JAX bank after the step, the paths exercised and the reference's pairs.
    """
    embed, score, labels, logits = batch
    queue, ptr, full = (np.asarray(x) for x in (bank.feats, bank.ptr, bank.full))
    loss, bank, pairs, ce = (step or jax_step(cfg))(bank, embed, score, labels, logits)
    ref_loss, queue, ptr, full, ref_pairs = reference_step(
        queue, ptr, full, embed, score, labels, logits, ref_cfg
    )
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bank.feats, queue, atol=1e-12)
    np.testing.assert_array_equal(bank.ptr, ptr)
    np.testing.assert_array_equal(bank.full, full)
    np.testing.assert_allclose(bank.slot_means, queue.mean(axis=2), atol=1e-12)
    np.testing.assert_allclose(bank.means, queue.mean(axis=(1, 2)), atol=1e-12)
    seen = set()
    slot = {}
    for info in ref_pairs:
        j = slot[info["b"]] = slot.get(info["b"], -1) + 1
        b = info["b"]
        assert int(pairs["label"][b, j]) == info["l"]
        assert bool(pairs["warm"][b, j]) == bool(info["warm"]) or cfg.single_image
        np.testing.assert_allclose(ce[b, j], info["term"], rtol=1e-9, atol=1e-12)
        if "a" in info:
            seen.add("warm")
            np.testing.assert_allclose(pairs["s_fg"][b, j], info["s_fg"], atol=1e-12)
            np.testing.assert_allclose(pairs["a"][b, j], info["a"], rtol=1e-8, atol=1e-9)
            np.testing.assert_array_equal(np.nonzero(pairs["bg_mask"][b, j])[0], info["bg"])
            multi = len(set(labels[b].ravel()) - {-1}) > 1
            seen.add("multi_bg" if multi else ("kept_bg" if info["bg"] else "fallback"))
    return bank, seen, ref_pairs


def loop_settings(single_image):
    """Cross-image: M = 2 and one wrap of warm-up; single-image: M = 1, no warm-up (SPEC 2.5)."""
    return settings(single_image, 1 if single_image else M, 0 if single_image else 1)


def several_steps_match_reference(cfg, ref_cfg):
    """8 random steps of mixed single- and multi-label images; returns the paths exercised."""
    rng = np.random.default_rng(0)
    seen = set()
    with jax.enable_x64(True):
        bank = ca_bank.init_bank(jax.random.PRNGKey(0), C, cfg.memory_size, K, D, jnp.float64)
        step_fn = jax_step(cfg)
        for step in range(8):
            kinds = ["multi", "single", "single"] if step % 2 else ["single", "multi", "multi"]
            batch = random_step(rng, kinds)
            bank, step_seen, _ = step_matches_reference(bank, batch, cfg, ref_cfg, step_fn)
            seen |= step_seen
    return seen


@pytest.mark.parametrize("single_image", [False, True])
def test_several_steps_match_loop_reference(single_image):
    seen = several_steps_match_reference(*loop_settings(single_image))
    assert seen == {"warm", "fallback", "multi_bg", "kept_bg"}


def wrapping_twice_matches_reference(cfg, ref_cfg):
    """9 images all holding class 1, two steps with M = 4; returns the final bank."""
    rng = np.random.default_rng(1)
    embed, score, labels, logits = random_step(rng, ["single", "multi", "single"] * 3)
    for i in range(9):
        if not (labels[i] == 1).any():
            labels[i, -1, -1] = 1
    with jax.enable_x64(True):
        bank = ca_bank.init_bank(jax.random.PRNGKey(5), C, 4, K, D, jnp.float64)
        step_fn = jax_step(cfg)
        for _ in range(2):  # the second step starts from a bank wrapped mid-batch
            batch = (embed, score, labels, logits)
            bank, _, _ = step_matches_reference(bank, batch, cfg, ref_cfg, step_fn)
    return bank


@pytest.mark.parametrize("single_image", [False, True])
def test_a_class_wrapping_twice_within_one_batch_matches_loop_reference(single_image):
    """Later writes overwrite this step's earlier ones, and every image scores against the
    features the images before it enqueued."""
    bank = wrapping_twice_matches_reference(*settings(single_image, memory_size=4, warm_up=0))
    row = CLS_INDEX[1]
    assert int(bank.ptr[row]) == 18 % 4 and int(bank.full[row]) == 18 // 4


CONSTANT_CLASS = 3  # its bank holds one direction orthogonal to every pixel: S_c == 0


def constant_map_settings():
    """mse threshold 0.5, below the (n-1)/n that an epsilon z-score of a constant map gives."""
    return settings(False, memory_size=M, warm_up=0, bg_mse_thresh=0.5)


def constant_background_map_matches_reference(cfg, ref_cfg):
    """A single-label image whose bg candidate CONSTANT_CLASS has a constant score map (SPEC B4).

    Returns the reference's background classes of the pair.
    """
    rng = np.random.default_rng(1)  # a seed whose other classes pass the mse test
    embed, score, labels, logits = random_step(rng, ["single"])
    labels[:] = 1
    embed[..., -1] = 0.0  # no pixel has a component along the last axis, ...
    embed = reference.l2n(embed)
    score[0, :6, CONSTANT_CLASS] = 0.9  # top-5 mean above bg_thresh: a background candidate
    with jax.enable_x64(True):
        bank = ca_bank.init_bank(jax.random.PRNGKey(9), C, M, K, D, jnp.float64)
        row = CLS_INDEX[CONSTANT_CLASS]
        feats = bank.feats.at[row].set(jnp.eye(D)[-1])  # ... the only axis in the class's bank
        slot_means = feats.mean(axis=2)
        bank = bank._replace(feats=feats, slot_means=slot_means, means=slot_means.mean(axis=1))
        _, _, ref_pairs = step_matches_reference(bank, (embed, score, labels, logits), cfg, ref_cfg)
    return ref_pairs[0]["bg"]


def test_a_constant_background_map_is_dropped_like_the_reference():
    """SPEC B4: the unbiased z-score of a constant map is NaN, so the mse test drops the class."""
    bg = constant_background_map_matches_reference(*constant_map_settings())
    assert bg and CONSTANT_CLASS not in bg  # other candidates are kept, the constant one is not


def test_labels_past_max_labels_are_still_background():
    """An image with more classes than max_labels: its unvisited classes count as background."""
    cfg, ref_cfg = settings(False, memory_size=1, warm_up=0)
    rng = np.random.default_rng(2)
    embed, score, labels, logits = random_step(rng, ["multi"])
    labels[0] = np.arange(labels[0].size).reshape(labels[0].shape) % 4  # 4 classes, 2 visited
    with jax.enable_x64(True):
        bank = ca_bank.init_bank(jax.random.PRNGKey(6), C, 1, K, D, jnp.float64)
        queue, ptr, full = (np.asarray(x) for x in (bank.feats, bank.ptr, bank.full))
        _, _, pairs, _ = run_jax(bank, embed, score, labels, logits, cfg, max_labels=2)
    ref_pairs = reference_step(queue, ptr, full, embed, score, labels, logits, ref_cfg)[-1]
    assert len(ref_pairs) == 4
    for j in range(2):  # the visited pairs see the same bank and the same 3 background classes
        assert len(ref_pairs[j]["bg"]) == 3
        np.testing.assert_array_equal(np.nonzero(pairs["bg_mask"][0, j])[0], ref_pairs[j]["bg"])
        np.testing.assert_allclose(pairs["s_bg"][0, j], ref_pairs[j]["s_bg"], atol=1e-12)
        np.testing.assert_allclose(pairs["a"][0, j], ref_pairs[j]["a"], rtol=1e-8, atol=1e-9)


def test_aux_is_zero_until_the_class_has_wrapped_once():
    cfg = ca.CASettings(memory_size=3, topk=2, warm_up=1)
    rng = np.random.default_rng(3)
    bank = ca_bank.init_bank(jax.random.PRNGKey(2), C, 3, 2, D)
    labels = np.zeros((1, 2 * SIDE, 2 * SIDE), int)  # class 0 only, single-label
    step_fn = jax_step(cfg, max_labels=2)
    for step in range(4):
        embed = reference.l2n(rng.normal(size=(1, SIDE * SIDE, D)))
        score = np.tanh(rng.normal(size=(1, SIDE * SIDE, N)))
        loss, bank, _, _ = step_fn(bank, embed, score, labels, rng.normal(size=(1, SIDE, SIDE, N)))
        assert (float(loss) > 0) == (step >= 3)  # wraps after 3 writes: warm from the 4th


def test_topk_enqueues_the_highest_scoring_pixels():
    cfg = ca.CASettings(memory_size=2, topk=3)
    embed = reference.l2n(np.random.default_rng(4).normal(size=(1, 16, D)))
    score = np.zeros((1, 16, N))
    score[0, [5, 9, 2], 1] = [0.9, 0.8, 0.7]
    labels = np.ones((1, 8, 8), int)
    bank = ca_bank.init_bank(jax.random.PRNGKey(3), C, 2, 3, D)
    logits = np.zeros((1, SIDE, SIDE, N))
    _, bank, _, _ = run_jax(bank, embed, score, labels, logits, cfg, max_labels=2)
    np.testing.assert_allclose(bank.feats[CLS_INDEX[1], 0], embed[0, [5, 9, 2]], rtol=1e-6)


def test_without_background_suppression_attention_is_one_half():
    """SPEC B1: the official no-suppression path gives A = sigmoid(0) everywhere."""
    cfg = ca.CASettings(memory_size=1, topk=2, warm_up=0, background=False)
    rng = np.random.default_rng(5)
    embed, score, labels, logits = random_step(rng, ["multi"])
    bank = ca_bank.init_bank(jax.random.PRNGKey(4), C, 1, 2, D)
    _, _, pairs, _ = run_jax(bank, embed, score, labels, logits, cfg, max_labels=2)
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
        jnp.ones(n),
        jnp.asarray([1, 1, 1, 0]),
    )
    faithful = ca.single_label_background(*args, ca.CASettings(bg_thresh=0.2, bg_mse_thresh=0.5))
    assert np.asarray(faithful).tolist() == [False, False, False, True]  # NaN drops class 2
    nan_safe = ca.single_label_background(
        *args, ca.CASettings(bg_mse_thresh=0.5, nan_safe_mse=True)
    )
    assert np.asarray(nan_safe).tolist() == [False, False, True, True]
    cold = ca.single_label_background(
        *args, ca.CASettings(bg_mse_thresh=0.5, mask_cold_background=True)
    )
    assert np.asarray(cold).tolist() == [False, False, False, False]  # class 3 never wrapped


def test_cold_background_fix_on_a_multi_label_image():
    """B2 on the multi-label path: other labels whose bank never wrapped stop being background."""
    rng = np.random.default_rng(7)
    embed, score, labels, _ = random_step(rng, ["multi"])
    present = losses.present_classes(jnp.asarray(labels), N)
    classes = np.nonzero(np.asarray(present[0]))[0]
    bank = ca_bank.init_bank(jax.random.PRNGKey(8), C, 2, K, D)
    warm_row = CLS_INDEX[classes[1]]
    bank = bank._replace(full=bank.full.at[warm_row].set(1))
    args = (jnp.asarray(embed), jnp.asarray(score), present, jnp.asarray(CLS_INDEX))
    for fix, expected in ((False, set(classes[1:])), (True, {classes[1]})):
        cfg = ca.CASettings(memory_size=2, topk=K, mask_cold_background=fix)
        attend = jax.jit(functools.partial(ca.attend, cfg=cfg, max_labels=MAX_LABELS))
        _, pairs = attend(bank, *args)
        assert set(np.nonzero(np.asarray(pairs["bg_mask"][0, 0]))[0]) == expected
