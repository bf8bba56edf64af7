"""A checkpoint that does not fit the config's train state fails in one line that says why."""

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import smoke
from larvseg_jax import checkpoint, train

SAVED = {"params": jnp.arange(3.0), "bank": {"feats": jnp.arange(4.0).reshape(2, 2)}}


def abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


@pytest.mark.parametrize(
    "target, detail",
    [
        (  # another memory size
            {"params": jnp.ones(3), "bank": {"feats": jnp.ones((2, 4))}},
            r"shape: \(2, 4\) is not compatible with the stored shape: \(2, 2\) at bank\.feats",
        ),
        ({"params": jnp.ones(3)}, r"differs at bank\)"),  # a run without the CA-classifier
        (  # another bank layout
            {"params": jnp.ones(3), "bank": {"means": jnp.ones((2, 2))}},
            r"differs at bank\.(feats|means)\)",
        ),
    ],
)
# A restore that orbax starts and then abandons leaves coroutines that print tracebacks when they
# are collected: the error must come before any read (shapes are checked from the metadata).
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_mismatched_checkpoint_is_a_one_line_error(tmp_path, target, detail):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, save_every_steps=1)
    ckpt.save(1, SAVED, force=True)
    ckpt.wait()
    with pytest.raises(ValueError, match="does not fit this config's train state") as err:
        ckpt.restore(1, abstract(target))
    message = str(err.value)
    assert "\n" not in message and f"{tmp_path}/1 " in message
    assert err.match(detail)  # says where it differs
    # The same checkpoint restores onto a fitting target, values intact.
    restored = ckpt.restore(1, abstract(SAVED))
    assert jax.tree.structure(restored) == jax.tree.structure(SAVED)
    jax.tree.map(np.testing.assert_array_equal, restored, SAVED)
    ckpt.close()
    gc.collect()  # abandoned orbax reads would surface here, as the warning made an error


def test_mismatch_names_the_config_keys_that_shape_the_state(tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, save_every_steps=1)
    written = {"model": {"variant": "micro"}, "ca": {"enabled": False}, "train": {"total_steps": 6}}
    ckpt.save(1, SAVED, meta={"config": written}, force=True)
    ckpt.wait()
    now = {"model": {"variant": "tiny"}, "ca": {"enabled": True}, "train": {"total_steps": 9}}
    with pytest.raises(ValueError, match="does not fit") as err:
        ckpt.restore(1, abstract({"params": jnp.ones(3)}), config=now)
    assert err.match(
        r"written with other settings: ca.enabled False -> True, model.variant 'micro' -> 'tiny'\)"
    )  # the state-shaping keys only: train.total_steps does not change the state
    ckpt.close()


def test_config_changes_put_state_keys_first():
    old = {"train": {"total_steps": 1}, "model": {"variant": "a"}, "data": {"dir": "x"}}
    new = {"train": {"total_steps": 2}, "model": {"variant": "b"}, "data": {"dir": "x"}}
    assert checkpoint.config_changes(old, new) == [
        ("model.variant", "a", "b"),
        ("train.total_steps", 1, 2),
    ]


def test_a_full_disk_is_one_line_before_anything_is_written(tmp_path, monkeypatch):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, save_every_steps=1)
    usage = checkpoint.shutil.disk_usage(tmp_path)
    monkeypatch.setattr(
        checkpoint.shutil,
        "disk_usage",
        lambda path: usage._replace(free=20),  # bytes
    )
    with pytest.raises(ValueError, match=r"not enough free space for the checkpoint of step 1"):
        ckpt.save(1, SAVED, force=True)  # 36 bytes of state, 20 free
    ckpt.wait()
    assert ckpt.all_steps() == [] and os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert ckpt.save(1, SAVED, force=True)
    ckpt.close()


def test_keep_every_n_steps_survives_max_to_keep(tmp_path):
    ckpt = checkpoint.Checkpointer(
        str(tmp_path), max_to_keep=2, save_every_steps=2, keep_every_steps=4
    )
    for step in range(1, 13):
        ckpt.save(step, SAVED)
    ckpt.wait()
    assert ckpt.all_steps() == [4, 8, 10, 12]
    assert sorted(os.listdir(tmp_path), key=int) == ["4", "8", "10", "12"]
    ckpt.close()


def _fail_saves(monkeypatch, failing_steps, *, late):
    """Makes the saves of `failing_steps` fail with ENOSPC, once per occurrence in the list:
    while the save starts (`late` False) or in its asynchronous write, before the commit (`late`
    True)."""
    failing_steps = list(failing_steps)

    def fails(step) -> bool:
        if step in failing_steps:
            failing_steps.remove(step)
            return True
        return False

    if late:
        from orbax.checkpoint._src.path import atomicity

        original = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self._final_path.name.isdigit() and fails(int(self._final_path.name)):
                raise OSError(28, "No space left on device")
            return await original(self)

        monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
    else:
        original = checkpoint.ocp.CheckpointManager.save

        def save(self, step, *args, **kwargs):
            if fails(step):
                raise OSError(28, "No space left on device")
            return original(self, step, *args, **kwargs)

        monkeypatch.setattr(checkpoint.ocp.CheckpointManager, "save", save)


@pytest.mark.parametrize("late", [False, True])
def test_a_failed_save_is_reported_and_the_next_one_goes_ahead(tmp_path, monkeypatch, late):
    _fail_saves(monkeypatch, [2], late=late)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, save_every_steps=1)
    warnings = []
    monkeypatch.setattr(checkpoint.logging, "warning", lambda *a: warnings.append(a[0] % a[1:]))
    for step in (1, 2, 3):
        ckpt.save(step, SAVED)
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3] and ckpt.failures_in_a_row == 0
    assert sorted(n for n in os.listdir(tmp_path) if n.isdigit()) == ["1", "3"]
    assert len(warnings) == 1
    assert "the checkpoint of step 2 could not be written" in warnings[0]
    assert "No space left on device" in warnings[0] and "training goes on" in warnings[0]
    ckpt.close()


@pytest.mark.parametrize("late", [False, True])
def test_failed_saves_in_a_row_stop_the_run_in_one_line(tmp_path, monkeypatch, late):
    _fail_saves(monkeypatch, [2, 3, 4, 5], late=late)
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=5, save_every_steps=1)
    with pytest.raises(checkpoint.CheckpointError) as info:
        for step in range(1, 6):
            ckpt.save(step, SAVED)
        ckpt.wait()
    assert f"the checkpoint of step 4 could not be written to {tmp_path}" in str(info.value)
    assert "the 3th failed save in a row" not in str(info.value)
    assert "3 failed saves in a row" in str(info.value)
    assert "resume from the latest checkpoint (1)" in str(info.value)
    ckpt.close()


def test_training_goes_on_past_a_failed_save_and_retries_the_final_one(tmp_path, monkeypatch):
    _fail_saves(monkeypatch, [3, 6], late=True)  # smoke saves at steps 3 and 6 (the last)
    train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["6"]


def test_a_final_save_that_keeps_failing_fails_the_run(tmp_path, monkeypatch):
    _fail_saves(monkeypatch, [6, 6], late=False)
    with pytest.raises(checkpoint.CheckpointError, match="the final checkpoint of step 6 could"):
        train.train_and_evaluate(smoke.get_config(), str(tmp_path), do_eval=False)
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["3"]
