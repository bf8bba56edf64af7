"""Interrupt + resume gives bit-identical training, and checkpoints restore on 1 device."""

import os

import jax
import numpy as np
import pytest

from configs import smoke
from larvseg_jax import checkpoint, experiment, sharding, train
from larvseg_jax.train_step import state_shardings


def final_state(cfg, workdir, devices=None):
    setup = experiment.build_setup(cfg, str(workdir))
    if devices is not None:  # restore onto a different device count
        mesh = sharding.make_mesh(devices)
        abstract = jax.eval_shape(setup.init_fn, jax.random.PRNGKey(0))
        target = checkpoint.abstract_with_shardings(abstract, state_shardings(abstract, mesh))
    else:
        target = setup.abstract_state
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=3, save_every_steps=1
    )
    state = ckpt.restore(ckpt.latest_step(), target)
    ckpt.close()
    return jax.device_get(state)


@pytest.mark.parametrize("ca", [False, True])
def test_interrupted_run_resumes_bit_identically(tmp_path, ca):
    cfg = smoke.get_config()
    cfg.ca.enabled = ca
    cfg.ca.memory_size, cfg.ca.topk = 2, 4
    train.train_and_evaluate(cfg, str(tmp_path / "straight"), do_eval=False)
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), do_eval=False, stop_at=4)
    assert max(os.listdir(tmp_path / "resumed" / "checkpoints")) == "4"
    train.train_and_evaluate(cfg, str(tmp_path / "resumed"), do_eval=False)
    a = final_state(cfg, tmp_path / "straight")
    b = final_state(cfg, tmp_path / "resumed")
    assert int(a.step) == int(b.step) == cfg.train.total_steps
    jax.tree.map(np.testing.assert_array_equal, a, b)
    if ca:
        assert a.bank.feats is None and a.bank.slot_means.shape[0] == cfg.data.num_groups
        one = final_state(cfg, tmp_path / "straight", devices=jax.devices()[:1])
        jax.tree.map(np.testing.assert_array_equal, a, one)
        # The kept features change nothing else, bit for bit.
        cfg.ca.keep_features = True
        train.train_and_evaluate(cfg, str(tmp_path / "kept"), do_eval=False)
        kept = final_state(cfg, tmp_path / "kept")
        assert kept.bank.feats.shape[:2] == a.bank.slot_means.shape[:2]
        jax.tree.map(
            np.testing.assert_array_equal, a, kept.replace(bank=kept.bank._replace(feats=None))
        )


def test_the_step_runs_under_a_transfer_guard(tmp_path, monkeypatch):
    """An implicit host-to-device transfer in the hot path is an error, not a slowdown."""
    monkeypatch.setattr(sharding, "host_batch_to_global", lambda batch, mesh: batch)
    with pytest.raises(Exception, match="Disallowed host-to-device transfer"):
        train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False)
