"""A step with a NaN loss leaves the state untouched; train.nonfinite stops naming it or skips it."""

import logging

import jax
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util.tensor_util import make_ndarray as tf_array

from configs import smoke
from larvseg_jax import sharding, train
from larvseg_jax.errors import NonFiniteError
from tests.test_resume import final_state


def _config(policy):
    cfg = smoke.get_config()
    cfg.ca.enabled = True  # the memory bank must be left untouched too
    cfg.ca.memory_size, cfg.ca.topk = 2, 4
    cfg.train.nonfinite = policy
    return cfg


def _poison(monkeypatch, step, source="syn_seg"):
    """NaN images for `source` in the batch of step `step` (0-based), as bad data would give."""
    real, calls = sharding.host_batch_to_global, []

    def poisoned(batch, mesh):
        calls.append(len(calls))
        if calls[-1] == step:
            bad = {**batch[source], "image": np.full_like(batch[source]["image"], np.nan)}
            batch = {**batch, source: bad}
        return real(batch, mesh)

    monkeypatch.setattr(sharding, "host_batch_to_global", poisoned)


def test_a_nonfinite_step_leaves_params_optimizer_and_bank_untouched(tmp_path, monkeypatch):
    cfg = _config("skip")
    train.train_and_evaluate(cfg, str(tmp_path / "clean"), do_eval=False, stop_at=2)
    _poison(monkeypatch, step=2)
    train.train_and_evaluate(cfg, str(tmp_path / "poisoned"), do_eval=False, stop_at=3)
    clean, poisoned = final_state(cfg, tmp_path / "clean"), final_state(cfg, tmp_path / "poisoned")
    assert (int(clean.step), int(poisoned.step)) == (2, 3)
    for part in ("params", "opt_state", "bank"):
        jax.tree.map(np.testing.assert_array_equal, getattr(clean, part), getattr(poisoned, part))


def test_stop_names_the_step_source_and_term_and_saves_nothing_nonfinite(tmp_path, monkeypatch):
    _poison(monkeypatch, step=2)
    with pytest.raises(NonFiniteError, match=r"non-finite loss, loss_syn_seg at step 2; .*stopped"):
        train.train_and_evaluate(_config("stop"), str(tmp_path), do_eval=False)
    saved = final_state(_config("stop"), tmp_path)  # step 3 was saved before the log line
    assert int(saved.step) == 3
    assert all(np.isfinite(x).all() for x in jax.tree.leaves((saved.params, saved.bank)))


def test_skip_goes_on_and_counts_the_skipped_steps(tmp_path, monkeypatch, caplog):
    _poison(monkeypatch, step=2)
    with caplog.at_level(logging.WARNING):
        report = train.train_and_evaluate(_config("skip"), str(tmp_path))
    assert report["step"] == 6 and report["miou"] is not None
    assert any("non-finite loss, loss_syn_seg at step 2" in r.message for r in caplog.records)
    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}
    )
    acc.Reload()
    skipped = {e.step: float(tf_array(e.tensor_proto)) for e in acc.Tensors("train/skipped_steps")}
    assert skipped == {2: 0, 4: 1, 6: 0}
    final = final_state(_config("skip"), tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(final.params))
