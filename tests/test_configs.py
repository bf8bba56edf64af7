"""Every config builds: vocabulary, step settings, model and train step, abstractly (eval_shape)."""

import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from larvseg_jax import experiment, sharding
from larvseg_jax.train_step import create_train_state, train_step

CONFIGS = sorted(
    p.stem
    for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem not in ("__init__", "paper")
)
PAPER_SPLITS = {"a150": (58, 92), "a847": (92, 755)}


def build(name, arg=None, data_dir="/nonexistent"):
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    voc, infos = experiment.build_vocabulary(cfg, data_dir)
    settings = experiment.build_step_settings(cfg, voc, infos)
    return cfg, voc, settings


@pytest.mark.parametrize(
    "name", [c for c in CONFIGS if not c.startswith(("synthetic", "smoke", "base"))]
)
def test_paper_config_builds_model_and_step_abstractly(name):
    cfg, voc, settings = build(name)
    if cfg.data.eval_source in PAPER_SPLITS:
        assert (len(voc.base), len(voc.novel)) == PAPER_SPLITS[cfg.data.eval_source]
    model = experiment.build_model(cfg, len(voc.union))
    tx, schedule = experiment.build_optimizer(cfg)
    mesh = sharding.make_mesh()
    init = functools.partial(
        create_train_state, model=model, tx=tx, image_size=32, settings=settings
    )
    state = jax.eval_shape(init, jax.random.PRNGKey(0))
    g, b = settings.num_groups, settings.images_per_group
    batch = {
        spec.name: {
            "image": jax.ShapeDtypeStruct((g, b, spec.crop, spec.crop, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((g, b, spec.crop, spec.crop), jnp.int32),
        }
        for spec in settings.sources
    }
    step = functools.partial(
        train_step, model=model, tx=tx, settings=settings, mesh=mesh, schedule=schedule
    )
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.map(lambda x: x.shape, new_state) == jax.tree.map(lambda x: x.shape, state)
    assert metrics["group_loss"].shape == (g,)
    if cfg.ca.enabled:
        c, d = state.params["head"]["cls_emb"].shape
        assert state.bank.feats.shape == (g, c, cfg.ca.memory_size, cfg.ca.topk, d)
    else:
        assert state.bank is None


def test_sweep_arguments_are_typed_and_checked():
    _cfg, _, settings = build("larvseg_c171_wa150", "memory_size=40,topk=10")
    assert (settings.ca.memory_size, settings.ca.topk) == (40, 10)
    with pytest.raises(ValueError, match="not one of"):
        build("larvseg_c171_wa150", "memory=40")
    _, _, settings = build("larvseg_c171_wa150_i124", "ca_on=i124")
    assert [s.ca_weight for s in settings.sources] == [0.0, 0.0, 0.1]


def test_4_4_and_3_3_2_group_plans():
    _, _, s = build("larvseg_c171_wa150")
    assert [s.sources[i].name for i in s.group_source_ids] == ["wa150", "c171"] * 4
    _, _, s = build("larvseg_c171_wa150_i124")
    names = [s.sources[i].name for i in s.group_source_ids]
    assert names == ["wa150", "c171", "i124"] * 2 + ["wa150", "c171"]
    assert [s.sources[i].crop for i in s.group_source_ids][2] == 320
