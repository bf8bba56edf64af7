"""Every config builds: vocabulary, step settings, model and train step, abstractly (eval_shape)."""

import copy
import dataclasses
import functools
import importlib
import pathlib

import jax
import jax.numpy as jnp
import pytest

from configs import base
from larvseg_jax import experiment, sharding
from larvseg_jax.errors import ConfigError
from larvseg_jax.train_step import create_train_state, metric_names, train_step

CONFIGS = sorted(
    p.stem
    for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
    if p.stem not in ("__init__", "paper")
)
PAPER_SPLITS = {"a150": (58, 92), "a847": (92, 755)}


def build(name, arg=None):
    cfg = importlib.import_module(f"configs.{name}").get_config(arg)
    experiment.validate(cfg)
    voc = experiment.build_vocabulary(cfg)
    settings = experiment.build_step_settings(cfg, voc)
    return cfg, voc, settings


def test_every_config_file_is_tested():
    assert len(CONFIGS) == 18 and {"base", "smoke", "synthetic_larvseg"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_model_and_step_abstractly(name):
    cfg, voc, settings = build(name)
    if cfg.data.eval_source in PAPER_SPLITS:
        assert (len(voc.base), len(voc.novel)) == PAPER_SPLITS[cfg.data.eval_source]
    tx, schedule = experiment.build_optimizer(cfg)
    model = experiment.build_model(cfg, len(voc.union))
    state = jax.eval_shape(init_fn(model, tx, settings), jax.random.PRNGKey(0))
    g, b = settings.num_groups, settings.images_per_group
    if cfg.ca.enabled:
        c, d = state.params["head"]["cls_emb"].shape
        assert state.bank.feats is None  # never read by the step: not kept by default
        assert state.bank.slot_means.shape == (g, c, cfg.ca.memory_size, d)
        kept = experiment.build_step_settings(cfg, voc)
        kept = dataclasses.replace(kept, ca=dataclasses.replace(kept.ca, keep_features=True))
        full = jax.eval_shape(init_fn(model, tx, kept), jax.random.PRNGKey(0))
        assert full.bank.feats.shape == (g, c, cfg.ca.memory_size, cfg.ca.topk, d)
    else:
        assert state.bank is None
    # The step is traced with the micro ViT: sources, groups, CA and class sampling are the
    # config's own; tracing ViT-B/16 once more per config would only cost time.
    small_cfg = copy.deepcopy(cfg)
    small_cfg.model.variant = "micro"
    small = experiment.build_model(small_cfg, len(voc.union))
    state = jax.eval_shape(init_fn(small, tx, settings), jax.random.PRNGKey(0))
    batch = {
        spec.name: {
            "image": jax.ShapeDtypeStruct((g, b, spec.crop, spec.crop, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((g, b, spec.crop, spec.crop), jnp.int32),
        }
        for spec in settings.sources
    }
    step = functools.partial(
        train_step,
        model=small,
        tx=tx,
        settings=settings,
        mesh=sharding.make_mesh(),
        schedule=schedule,
    )
    new_state, metrics = jax.eval_shape(step, state, batch)
    assert jax.tree.map(lambda x: x.shape, new_state) == jax.tree.map(lambda x: x.shape, state)
    assert metrics["group_loss"].shape == (g,)
    assert set(metrics) == {"group_loss", "finite", "grads_finite", "step", *metric_names(settings)}


def init_fn(model, tx, settings):
    return functools.partial(
        create_train_state, model=model, tx=tx, image_size=32, settings=settings
    )


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
    _, _, s = build("synthetic_baseline")  # config order, not key order: rank % 3
    assert [s.sources[i].name for i in s.group_source_ids][:3] == [
        "syn_weak",
        "syn_seg",
        "syn_single",
    ]


def test_synthetic_vocabulary_split():
    _, voc, settings = build("synthetic_larvseg")
    assert voc.base == ("sky", "grass", "water", "road", "wall", "sand")
    assert voc.novel == ("boat", "car", "tent", "flower")
    assert [s.ca_weight for s in settings.sources] == [0.1, 0.0, 0.1]
    _, _, settings = build("synthetic_baseline")  # CA off: no source gets a CA weight
    assert [s.ca_weight for s in settings.sources] == [0.0, 0.0, 0.0]


def _with(**changes):
    cfg = base.get_config()
    for key, value in changes.items():
        node = cfg
        *path, leaf = key.split("__")
        for part in path:
            node = node[part]
        node[leaf] = value
    return cfg


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"model__variant": "huge"}, r"model.variant='huge' is unknown; use one of B/16"),
        ({"model__gemm": "mkl"}, r"model.gemm=.mkl. is unknown; use one of auto"),
        ({"data__eval_source": "syn_seg"}, r"data.eval_source='syn_seg' is a training set"),
        ({"data__eval_source": "a150"}, r"mix synthetic and real datasets"),
        ({"data__num_groups": 6}, r"data.num_groups=6 must be a multiple of the sources' total"),
        ({"data__sources__syn_seg__order": 0}, r"order are \[0, 0, 2\]"),
        ({"data__sources__syn_seg__ratio": 0}, r"data.sources.syn_seg.ratio=0 must be >= 1"),
        ({"loss__seg_normalize": "mean"}, r"loss.seg_normalize='mean' is unknown"),
        ({"eval__mode": "tiles"}, r"eval.mode='tiles' is unknown"),
        ({"train__nonfinite": "ignore"}, r"train.nonfinite='ignore' is unknown; use one of stop"),
        ({"ca__single_image": True}, r"ca.single_image needs ca.memory_size=1"),
        ({"data__base_from": "c17"}, r"data.base_from: unknown dataset 'c17'"),
        (
            {"ca__enabled": True, "ca__topk": 40, "data__sources__syn_single__crop": 48},
            r"ca.topk=40 exceeds the 36 feature pixels of a 48-px crop of data.sources.syn_single",
        ),
    ],
)
def test_validate_names_the_bad_key(changes, message):
    with pytest.raises(ConfigError, match=message):
        experiment.validate(_with(**changes))


def test_unknown_source_names_its_key():
    cfg = base.get_config()
    cfg.data.sources = {"syn_wek": base.source(order=0, ratio=1, crop=64, weight=1.0)}
    with pytest.raises(ConfigError, match=r"data.sources.syn_wek: unknown dataset 'syn_wek'"):
        experiment.validate(cfg)
    cfg.data.sources = {"a150": base.source(order=0, ratio=1, crop=64, weight=1.0)}
    with pytest.raises(ConfigError, match=r"data.sources.a150: 'a150' is an evaluation set"):
        experiment.validate(cfg)


@pytest.mark.slow
def test_vit_b16_trains_and_evaluates_on_the_smoke_data(tmp_path):
    """The paper's ViT-B/16 through the whole loop (opt-in: --runslow, about a minute)."""
    from configs import smoke
    from larvseg_jax import train

    cfg = smoke.get_config()
    cfg.model.variant = "B/16"
    cfg.model.pos_grid = (4, 4)  # 64-px crops / patch 16
    cfg.train.total_steps = cfg.train.checkpoint_every_steps = cfg.train.eval_every_steps = 2
    cfg.train.log_every_steps = 1
    report = train.train_and_evaluate(cfg, str(tmp_path))
    assert report["step"] == 2 and report["num_images"] == 4
    assert 0 <= report["miou"] <= 100
