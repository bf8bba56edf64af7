"""The sharded train step: 8 devices equal 1 device, and each group computes its own source."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from larvseg_jax import ca_classifier, groups, sharding
from larvseg_jax.models import segmenter, vit
from larvseg_jax.optim import make_optimizer
from larvseg_jax.train_step import (
    SourceSpec,
    StepSettings,
    create_train_state,
    group_loss,
    state_shardings,
    train_step,
)

SOURCES = (
    SourceSpec("weak", "weak", (0, 1, 2, 3), 0.1, 24, ca_weight=0.1),
    SourceSpec("seg", "seg", (0, 1, 4), 1.0, 32),
)
CA = ca_classifier.CASettings(memory_size=1, topk=3, warm_up=0, max_labels=4)


@pytest.fixture(scope="module", params=["baseline", "larvseg"])
def setup(request):
    return build(CA if request.param == "larvseg" else None)


def build(ca):
    plan = groups.group_sources(["weak", "seg"], [1, 1], 8)
    settings = StepSettings(
        sources=SOURCES,
        group_source_ids=tuple(["weak", "seg"].index(s) for s in plan),
        images_per_group=2,
        seg_normalize="all_pixels",
        downsample_rate=2,
        ca=ca,
    )
    backbone = vit.vit_from_variant("micro", pos_grid=(4, 4), drop_path_rate=0.2)
    model = segmenter.Segmenter(backbone=backbone, num_classes=5)
    tx, schedule = make_optimizer(
        lr=0.5, end_lr=1e-3, power=0.9, momentum=0.9, weight_decay=0.0, total_steps=10
    )
    state = create_train_state(jax.random.PRNGKey(0), model, tx, 32, settings)
    return settings, model, tx, schedule, state, plan


def make_batch(plan, rng, fill=0.0):
    batch = {}
    for spec in SOURCES:
        n = len(spec.cls_index)
        img = np.full((8, 2, spec.crop, spec.crop, 3), fill, np.float32)
        lab = np.full((8, 2, spec.crop, spec.crop), -1, np.int32)
        for g, name in enumerate(plan):
            if name == spec.name:
                img[g] = rng.normal(size=img[g].shape)
                lab[g] = rng.integers(0, n, size=lab[g].shape)
        batch[spec.name] = {"image": img, "label": lab}
    return batch


def run_step(setup, devices, batch):
    settings, model, tx, schedule, state, _ = setup
    mesh = sharding.make_mesh(devices)
    shardings = state_shardings(state, mesh)
    fn = jax.jit(
        functools.partial(
            train_step, model=model, tx=tx, settings=settings, mesh=mesh, schedule=schedule
        ),
        in_shardings=(shardings, sharding.data_sharded(mesh)),
        out_shardings=(shardings, sharding.replicated(mesh)),
    )
    state = jax.device_put(state, shardings)
    batch = sharding.host_batch_to_global(batch, mesh)
    return jax.device_get(fn(state, batch))


def test_eight_devices_equal_one_device(setup):
    assert len(jax.devices()) == 8
    batch = make_batch(setup[-1], np.random.default_rng(0))
    state8, m8 = run_step(setup, jax.devices(), batch)
    state1, m1 = run_step(setup, jax.devices()[:1], batch)
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m8["group_loss"], m1["group_loss"], rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        (state8.params, state8.bank),
        (state1.params, state1.bank),
    )
    assert int(state8.step) == 1


def test_each_group_computes_its_assigned_source(setup):
    settings, model, _, _, state, plan = setup
    batch = make_batch(plan, np.random.default_rng(1))
    _, metrics = run_step(setup, jax.devices(), batch)
    step_rng = jax.random.fold_in(state.rng, state.step)
    for g, name in enumerate(plan):
        spec = SOURCES[[s.name for s in SOURCES].index(name)]
        want, _ = group_loss(
            state.params,
            batch[name]["image"][g],
            batch[name]["label"][g],
            jax.random.fold_in(step_rng, g),
            model=model,
            spec=spec,
            settings=settings,
        )
        np.testing.assert_allclose(metrics["group_loss"][g], want, rtol=1e-5, atol=1e-6)
    # The step objective is the mean over the 8 virtual devices (DDP's gradient mean).
    np.testing.assert_allclose(metrics["loss"], np.mean(metrics["group_loss"]), rtol=1e-6)


def test_rows_of_other_sources_are_never_read(setup):
    plan = setup[-1]
    clean = make_batch(plan, np.random.default_rng(2))
    poisoned = make_batch(plan, np.random.default_rng(2), fill=np.nan)
    _, m_clean = run_step(setup, jax.devices(), clean)
    state_p, m_poisoned = run_step(setup, jax.devices(), poisoned)
    np.testing.assert_allclose(m_poisoned["loss"], m_clean["loss"], rtol=1e-6)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state_p.params))


def test_group_plan_follows_rank_mod_n():
    assert groups.group_sources(["a", "c", "i"], [3, 3, 2], 8) == list(
        "acia cia c".replace(" ", "")
    )
    assert groups.group_sources(["w", "c"], [4, 4], 8) == ["w", "c"] * 4
    with pytest.raises(ValueError, match="multiple of sum"):
        groups.group_sources(["w", "c"], [3, 2], 8)
    with pytest.raises(ValueError, match="device count"):
        groups.groups_per_device(8, 3)


def test_labels_past_max_labels_are_counted():
    """Crops with more labels than the CA pair lists hold are reported, not silently dropped."""
    setup = build(dataclasses.replace(CA, max_labels=2))
    batch = make_batch(setup[-1], np.random.default_rng(3))  # every weak crop holds all 4 classes
    _, metrics = run_step(setup, jax.devices()[:1], batch)
    assert float(metrics["unvisited_labels_weak"]) == 4 * 2 * (4 - 2)  # groups x images x over
    _, metrics = run_step(build(CA), jax.devices()[:1], batch)
    assert float(metrics["unvisited_labels_weak"]) == 0
