"""A checkpoint that does not fit the config's train state fails in one line that says why."""

import jax
import jax.numpy as jnp
import pytest

from larvseg_jax import checkpoint


def abstract(tree):
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), tree)


@pytest.mark.parametrize(
    "target",
    [
        {"params": jnp.ones(3), "bank": {"feats": jnp.ones((2, 4))}},  # another memory size
        {"params": jnp.ones(3)},  # a run without the CA-classifier
        {"params": jnp.ones(3), "bank": {"means": jnp.ones((2, 2))}},  # another bank layout
    ],
)
def test_mismatched_checkpoint_is_a_one_line_error(tmp_path, target):
    ckpt = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, save_every_steps=1)
    ckpt.save(1, {"params": jnp.ones(3), "bank": {"feats": jnp.ones((2, 2))}}, force=True)
    ckpt.wait()
    with pytest.raises(ValueError, match="does not fit this config's train state") as err:
        ckpt.restore(1, abstract(target))
    assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    assert "bank" in str(err.value) or "shape" in str(err.value)  # says where it differs
    assert ckpt.restore(1, abstract({"params": jnp.ones(3), "bank": {"feats": jnp.ones((2, 2))}}))
    ckpt.close()
