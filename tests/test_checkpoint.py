"""A checkpoint that does not fit the config's train state fails in one line that says why."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax import checkpoint

SAVED = {"params": jnp.arange(3.0), "bank": {"feats": jnp.arange(4.0).reshape(2, 2)}}


def abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


@pytest.mark.parametrize(
    "target, detail",
    [
        (  # another memory size
            {"params": jnp.ones(3), "bank": {"feats": jnp.ones((2, 4))}},
            r"shape: \(2, 4\) is not compatible with the stored shape: \(2, 2\)",
        ),
        ({"params": jnp.ones(3)}, r"differs at bank\)"),  # a run without the CA-classifier
        (  # another bank layout
            {"params": jnp.ones(3), "bank": {"means": jnp.ones((2, 2))}},
            r"differs at bank\.(feats|means)\)",
        ),
    ],
)
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
