"""AugReg .npz import (models/pretrained.py) against the official loader's state dict (golden g)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from larvseg_jax.models import pretrained, vit
from tests.models.golden_vit import TINY


@pytest.fixture(scope="module")
def init_params():
    model = vit.ViT(**TINY)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )
    return jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes["params"])


def torch_state_dict(p):
    """The official ViT's state-dict layout computed from our params tree."""
    d = TINY["width"]
    sd = {
        "cls_token": p["cls"],
        "pos_embed": p["Transformer"]["posembed_input"]["pos_embedding"],
        "patch_embed.projection.weight": np.transpose(p["embedding"]["kernel"], (3, 2, 0, 1)),
        "patch_embed.projection.bias": p["embedding"]["bias"],
        "ln1.weight": p["Transformer"]["encoder_norm"]["scale"],
        "ln1.bias": p["Transformer"]["encoder_norm"]["bias"],
    }
    for i in range(TINY["depth"]):
        blk = p["Transformer"][f"encoderblock_{i}"]
        att = blk["MultiHeadDotProductAttention_1"]
        pre = f"layers.{i}."
        qkv = [att[n] for n in ("query", "key", "value")]
        sd[pre + "ln1.weight"] = blk["LayerNorm_0"]["scale"]
        sd[pre + "ln1.bias"] = blk["LayerNorm_0"]["bias"]
        sd[pre + "attn.attn.in_proj_weight"] = np.concatenate(
            [t["kernel"].reshape(d, d).T for t in qkv]
        )
        sd[pre + "attn.attn.in_proj_bias"] = np.concatenate([t["bias"].reshape(d) for t in qkv])
        sd[pre + "attn.attn.out_proj.weight"] = att["out"]["kernel"].reshape(d, d).T
        sd[pre + "attn.attn.out_proj.bias"] = att["out"]["bias"]
        sd[pre + "ln2.weight"] = blk["LayerNorm_2"]["scale"]
        sd[pre + "ln2.bias"] = blk["LayerNorm_2"]["bias"]
        for j in range(2):
            dense = blk["MlpBlock_3"][f"Dense_{j}"]
            name = pre + ("ffn.layers.0.0." if j == 0 else "ffn.layers.1.")
            sd[name + "weight"] = dense["kernel"].T
            sd[name + "bias"] = dense["bias"]
    return sd


@pytest.mark.parametrize("filename", ["g_tiny_augreg.npz", "g_tiny_augreg_opt_target.npz"])
def test_loaded_params_match_official_state_dict(goldens_dir, golden_g, init_params, filename):
    params = pretrained.load_augreg_npz(
        goldens_dir / filename, init_params, pos_grid=TINY["pos_grid"]
    )
    assert jax.tree.structure(params) == jax.tree.structure(init_params)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    sd = torch_state_dict(params)
    want = {k.removeprefix("sd/"): v for k, v in golden_g.items() if k.startswith("sd/")}
    assert sorted(sd) == sorted(want)
    for name, value in sd.items():
        # The pos table went through the 3x3 -> 4x4 bicubic resize; everything else is a copy.
        np.testing.assert_allclose(value, want[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_pos_table_resize_matches_official_in_float64(goldens_dir, golden_g, init_params):
    with jax.enable_x64(True):
        params = pretrained.load_augreg_npz(
            goldens_dir / "g_tiny_augreg.npz",
            init_params,
            pos_grid=TINY["pos_grid"],
            dtype=np.float64,
        )
    np.testing.assert_allclose(
        params["Transformer"]["posembed_input"]["pos_embedding"],
        golden_g["sd/pos_embed"],
        rtol=1e-12,
        atol=1e-13,
    )


def test_missing_file_names_the_path(tmp_path, init_params):
    path = tmp_path / "nope.npz"
    with pytest.raises(FileNotFoundError, match="nope.npz"):
        pretrained.load_augreg_npz(path, init_params, pos_grid=TINY["pos_grid"])


def test_missing_key_names_file_and_key(goldens_dir, tmp_path, init_params):
    arrays = dict(np.load(goldens_dir / "g_tiny_augreg.npz"))
    del arrays["Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"]
    path = tmp_path / "cut.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=r"cut\.npz.*encoderblock_1/MlpBlock_3/Dense_0/bias"):
        pretrained.load_augreg_npz(path, init_params, pos_grid=TINY["pos_grid"])


def test_shape_mismatch_names_file_and_key(goldens_dir):
    model = vit.ViT(**{**TINY, "mlp_dim": 64})
    params = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3)), train=False)
    )["params"]  # the loader reads only shapes
    with pytest.raises(ValueError, match=r"g_tiny_augreg\.npz: key .*MlpBlock_3/Dense_0/.*expects"):
        pretrained.load_augreg_npz(
            goldens_dir / "g_tiny_augreg.npz", params, pos_grid=TINY["pos_grid"]
        )
