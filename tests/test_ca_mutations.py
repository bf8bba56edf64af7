"""Each faithful quirk (SPEC 11) and the loop order, flipped alone, fails a parity test.

Every flip is one named settings flag or monkeypatch. Each test runs the very comparison of a
golden or numpy-reference test (the helpers of test_ca_classifier.py, test_ca_classifier_golden.py
and test_head_losses_goldens.py) and requires it to fail by far more than its tolerance, so the
parity tests would notice if a quirk were "fixed" or the scoring order changed.

What golden d2 cannot catch, a reference case does:
  * B4: with d2's mse threshold 2.0 a constant map is dropped with or without an epsilon (an
    epsilon z-score of a constant map gives mse < (n-1)/n < 1); the constant-map reference case
    of test_ca_classifier.py, with threshold 0.5, catches it.
  * Which other pairs' writes a pair sees: in d2 no warm pair keeps a background class that
    another pair of its step writes, so of the order flips only the own-write one changes d2 (it
    warms a class one write early); the wrapping reference, where every image holds the same
    class, catches all of them.
"""

import dataclasses
import functools
import math
import re

import jax.numpy as jnp
import pytest

from larvseg_jax import ca_classifier as ca
from larvseg_jax import losses
from tests import test_ca_classifier as ref_tests
from tests import test_ca_classifier_golden as golden_tests
from tests import test_head_losses_goldens as head_goldens

CLEAR_MARGIN = 1000  # a caught flip misses its comparison by at least this many tolerances

SEEN_WRITES = ca._seen_writes
ATTENTIVE_CE = ca.attentive_ce
SEG_CE = losses.seg_ce

# Replacements of `ca._seen_writes(num_pairs, single_image)`, the [T, T] "pair i sees write j".
ORDER_FLIPS = {
    "own_write_in_cross_image_mode": lambda t, single_image: SEEN_WRITES(t, True),
    "later_pairs_writes_too": lambda t, single_image: ~jnp.eye(t, dtype=bool),
    "reverse_loop_order": lambda t, single_image: SEEN_WRITES(t, single_image).T,
}


def miss(check, *args) -> float:
    """Runs a parity comparison that must fail; returns by how many tolerances it misses.

    That is the first failing `assert_allclose`'s max relative difference over its rtol, or inf
    for an exact comparison (bank pointers, a warm flag, a label, a background count).
    """
    with pytest.raises(AssertionError) as err:
        check(*args)
    message = str(err.value)
    rtol = re.search(r"rtol=([^,\s]+)", message)
    rel = re.search(r"Max relative difference[^:]*: (\S+)", message)
    if rtol is None or rel is None or float(rtol.group(1)) == 0:
        return math.inf
    return float(rel.group(1)) / float(rtol.group(1))


def warm_pairs_only(logits, a, labels, valid, warm, *args, **kwargs):
    """`attentive_ce` with B11 fixed: the denominator counts only warm pairs."""
    kwargs["num_pairs"] = jnp.sum(valid & warm)
    return ATTENTIVE_CE(logits, a, labels, valid, warm, *args, **kwargs)


@pytest.fixture(scope="module")
def d2(goldens_dir):
    return golden_tests.load_golden(goldens_dir)


def golden_d2_miss(d2, **flags) -> float:
    """test_six_steps_match_official with CASettings flags changed."""
    meta, d = d2
    cfg = dataclasses.replace(golden_tests.settings(meta["cfg"]), **flags)
    return miss(golden_tests.six_steps_match_official, meta, d, cfg)


def loop_reference_miss(single_image=False, **flags) -> float:
    """test_several_steps_match_loop_reference with CASettings flags changed."""
    cfg, ref_cfg = ref_tests.loop_settings(single_image)
    cfg = dataclasses.replace(cfg, **flags)
    return miss(ref_tests.several_steps_match_reference, cfg, ref_cfg)


def wrapping_reference_miss(single_image=False) -> float:
    """test_a_class_wrapping_twice_within_one_batch_matches_loop_reference."""
    cfg, ref_cfg = ref_tests.settings(single_image, memory_size=4, warm_up=0)
    return miss(ref_tests.wrapping_twice_matches_reference, cfg, ref_cfg)


def test_b2_skipping_cold_background_classes_fails_golden_d2(d2):
    assert golden_d2_miss(d2, mask_cold_background=True) > CLEAR_MARGIN


def test_b2_skipping_cold_background_classes_fails_the_loop_reference():
    assert loop_reference_miss(mask_cold_background=True) > CLEAR_MARGIN


def test_b4_epsilon_in_the_mse_z_scores_fails_the_constant_map_reference():
    cfg, ref_cfg = ref_tests.constant_map_settings()
    cfg = dataclasses.replace(cfg, nan_safe_mse=True)
    check = ref_tests.constant_background_map_matches_reference
    assert miss(check, cfg, ref_cfg) > CLEAR_MARGIN


@pytest.mark.parametrize("case", ["b_seg_ce", "b2_seg_ce_x8"])
def test_b10_seg_ce_over_valid_pixels_fails_goldens_b(goldens_dir, monkeypatch, case):
    monkeypatch.setattr(losses, "seg_ce", functools.partial(SEG_CE, normalize="valid_pixels"))
    check = head_goldens.test_loss_and_gradients_match_official
    assert miss(check, goldens_dir, case, "seg") > CLEAR_MARGIN


def test_b11_warm_pairs_only_denominator_fails_golden_d2(d2, monkeypatch):
    monkeypatch.setattr(ca, "attentive_ce", warm_pairs_only)
    assert golden_d2_miss(d2) > CLEAR_MARGIN


def test_b11_warm_pairs_only_denominator_fails_the_loop_reference(monkeypatch):
    monkeypatch.setattr(ca, "attentive_ce", warm_pairs_only)
    assert loop_reference_miss() > CLEAR_MARGIN


@pytest.mark.parametrize("flip", sorted(ORDER_FLIPS))
def test_cross_image_order_flips_fail_the_wrapping_reference(monkeypatch, flip):
    monkeypatch.setattr(ca, "_seen_writes", ORDER_FLIPS[flip])
    assert wrapping_reference_miss() > CLEAR_MARGIN


def test_a_cross_image_pair_seeing_its_own_write_fails_golden_d2(d2, monkeypatch):
    monkeypatch.setattr(ca, "_seen_writes", ORDER_FLIPS["own_write_in_cross_image_mode"])
    assert golden_d2_miss(d2) > CLEAR_MARGIN


def test_single_image_pair_not_seeing_its_own_write_fails_the_wrapping_reference(monkeypatch):
    monkeypatch.setattr(ca, "_seen_writes", lambda t, single_image: SEEN_WRITES(t, False))
    assert wrapping_reference_miss(single_image=True) > CLEAR_MARGIN
