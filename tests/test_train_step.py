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
# warm_up=0: the aux term counts from the first step. max_labels=3: the main batch (1-2 labels per
# weak crop) visits every label; the crowded batch (up to 4) has labels past the pair lists.
CA = ca_classifier.CASettings(memory_size=1, topk=3, warm_up=0)
MAX_LABELS = 3
PLAN = groups.group_sources(["weak", "seg"], [1, 1], 8)
WEAK_GROUPS = [g for g, name in enumerate(PLAN) if name == "weak"]
B = 2  # images per group


@dataclasses.dataclass
class Setup:
    settings: StepSettings
    model: segmenter.Segmenter
    tx: object
    schedule: object
    state: object
    steps: dict = dataclasses.field(default_factory=dict)  # device count -> compiled step
    losses: dict = dataclasses.field(default_factory=dict)  # source -> jitted group_loss

    def group_loss(self, name):
        """`group_loss` of source `name`, jitted once per setup (the per-group reference)."""
        if name not in self.losses:
            spec = SOURCES[[s.name for s in SOURCES].index(name)]
            self.losses[name] = jax.jit(
                functools.partial(group_loss, model=self.model, spec=spec, settings=self.settings)
            )
        return self.losses[name]


@functools.cache
def get_setup(name):
    """The baseline (no CA-classifier) or the LarvSeg step; built once, shared by the module."""
    settings = StepSettings(
        sources=SOURCES,
        group_source_ids=tuple(["weak", "seg"].index(s) for s in PLAN),
        images_per_group=B,
        seg_normalize="all_pixels",
        downsample_rate=2,
        ca=CA if name == "larvseg" else None,
        max_labels=MAX_LABELS,
    )
    backbone = vit.vit_from_variant("micro", pos_grid=(4, 4), drop_path_rate=0.2)
    model = segmenter.Segmenter(backbone=backbone, num_classes=5)
    tx, schedule = make_optimizer(
        lr=0.5, end_lr=1e-3, power=0.9, momentum=0.9, weight_decay=0.0, total_steps=10
    )
    state = create_train_state(jax.random.PRNGKey(0), model, tx, 32, settings)
    return Setup(settings, model, tx, schedule, state)


@pytest.fixture(scope="module", params=["baseline", "larvseg"])
def setup(request):
    return get_setup(request.param)


def weak_label(rng, crop, classes, dense):
    """Blobs (the first class fills the crop, the others are rectangles), or per-pixel noise."""
    if dense:
        return rng.choice(classes, size=(crop, crop)).astype(np.int32)
    lab = np.full((crop, crop), classes[0], np.int32)
    for c in classes[1:]:
        y, x = rng.integers(0, crop // 2, size=2)
        lab[y : y + crop // 2, x : x + crop // 2] = c
    lab[:, -2:] = -1  # an ignored strip: pooled over, never an image label
    return lab


def make_batch(seed, fill=0.0, crowded=False):
    """Weak crops hold 1 or 2 of the 4 weak classes (crowded: 2 to 4), so the kept-class
    softmax has absent classes and both weak losses have a gradient."""
    rng = np.random.default_rng(seed)
    batch = {}
    counts = [4, 2, 3, 4] if crowded else [1, 2]
    i = 0
    for spec in SOURCES:
        n, crop = len(spec.cls_index), spec.crop
        img = np.full((8, B, crop, crop, 3), fill, np.float32)
        lab = np.full((8, B, crop, crop), -1, np.int32)
        for g, name in enumerate(PLAN):
            if name != spec.name:
                continue
            img[g] = rng.normal(size=img[g].shape)
            for b in range(B):
                if spec.kind == "seg":
                    lab[g, b] = rng.integers(0, n, size=(crop, crop))
                    lab[g, b][rng.random((crop, crop)) < 0.1] = -1
                else:
                    k = counts[i % len(counts)]
                    i += 1
                    classes = rng.choice(n, size=k, replace=False)
                    lab[g, b] = weak_label(rng, crop, classes, crowded)
        batch[spec.name] = {"image": img, "label": lab}
    return batch


@functools.cache
def main_batch():
    return make_batch(0)


def weak_present(batch):
    """[8, B, 4] bool image-level labels of the weak crops (loss grid = stride-2 labels)."""
    lab = batch["weak"]["label"][:, :, ::2, ::2]
    return np.stack([np.any(lab == c, axis=(2, 3)) for c in range(4)], -1)


def run_step(setup, num_devices, batch):
    if num_devices not in setup.steps:
        mesh = sharding.make_mesh(jax.devices()[:num_devices])
        shardings = state_shardings(setup.state, mesh)
        fn = jax.jit(
            functools.partial(
                train_step,
                model=setup.model,
                tx=setup.tx,
                settings=setup.settings,
                mesh=mesh,
                schedule=setup.schedule,
            ),
            in_shardings=(shardings, sharding.data_sharded(mesh)),
            out_shardings=(shardings, sharding.replicated(mesh)),
        )
        setup.steps[num_devices] = (mesh, shardings, fn)
    mesh, shardings, fn = setup.steps[num_devices]
    state = jax.device_put(setup.state, shardings)
    return jax.device_get(fn(state, sharding.host_batch_to_global(batch, mesh)))


def group_bank(state, g):
    """Group g's bank as the train step hands it to `group_loss` (features dropped)."""
    if state.bank is None:
        return None
    return jax.tree.map(lambda x: x[g], state.bank._replace(feats=None))


def test_batches_have_absent_weak_classes():
    """Guards the inputs: with every class present the weak losses would be 0 (no gradient)."""
    n_main = weak_present(main_batch())[WEAK_GROUPS].sum(-1)
    assert sorted(set(n_main.ravel())) == [1, 2]
    n_crowded = weak_present(make_batch(3, crowded=True))[WEAK_GROUPS].sum(-1)
    assert n_crowded.max() == 4 and n_crowded.min() < MAX_LABELS


def test_eight_devices_equal_one_device(setup):
    assert len(jax.devices()) == 8
    batch = main_batch()
    state8, m8 = run_step(setup, 8, batch)
    state1, m1 = run_step(setup, 1, batch)
    for key in m8:
        np.testing.assert_allclose(m8[key], m1[key], rtol=1e-5, atol=1e-7, err_msg=key)
    assert float(m8["loss_weak"]) > 1e-3 and float(m8["loss_seg"]) > 1e-3
    # Compare the updates, not the parameters (which would hide a small gradient difference).
    p0 = jax.device_get(setup.state.params)
    delta8 = jax.tree.map(np.subtract, state8.params, p0)
    delta1 = jax.tree.map(np.subtract, state1.params, p0)
    scale = max(np.abs(d).max() for d in jax.tree.leaves(delta1))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5 * scale), delta8, delta1
    )
    # Union rows 2 and 3 are weak-only classes: they move only through the weak groups' loss.
    emb = delta8["head"]["cls_emb"]
    assert np.abs(emb[2:4]).max(axis=1).min() > 1e-3 * scale
    if setup.state.bank is not None:
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
            state8.bank,
            state1.bank,
        )
        # M = 1: each enqueue completes a pass, so `full` counts the writes of each class: one
        # per weak image holding it, none in the segmentation groups.
        present = weak_present(batch)
        want = np.zeros((8, 5), np.int32)
        for g in WEAK_GROUPS:
            want[g, :4] = present[g].sum(0)
        np.testing.assert_array_equal(state8.bank.full, want)
        np.testing.assert_array_equal(state1.bank.full, want)
    assert int(state8.step) == 1 and int(state1.step) == 1


def test_each_group_computes_its_assigned_source(setup):
    state, batch = setup.state, main_batch()
    _, metrics = run_step(setup, 8, batch)
    step_rng = jax.random.fold_in(state.rng, state.step)
    basic = {"weak": [], "seg": []}
    aux = []
    for g, name in enumerate(PLAN):
        want, parts = setup.group_loss(name)(
            state.params,
            batch[name]["image"][g],
            batch[name]["label"][g],
            jax.random.fold_in(step_rng, g),
            bank=group_bank(state, g),
        )
        np.testing.assert_allclose(metrics["group_loss"][g], want, rtol=1e-5, atol=1e-6)
        basic[name].append(float(parts["basic"]))
        if name == "weak":
            aux.append(float(parts["aux"]))
    # The step objective is the mean over the 8 virtual devices (DDP's gradient mean).
    np.testing.assert_allclose(metrics["loss"], np.mean(metrics["group_loss"]), rtol=1e-6)
    for name in ("weak", "seg"):
        assert min(basic[name]) > 1e-3
        np.testing.assert_allclose(metrics[f"loss_{name}"], np.mean(basic[name]), rtol=1e-5)
    if state.bank is None:
        assert "aux_weak" not in metrics
    else:
        assert min(aux) > 1e-3  # every weak group has a CA term at the first step (warm_up 0)
        np.testing.assert_allclose(metrics["aux_weak"], np.mean(aux), rtol=1e-5)
        assert float(metrics["unvisited_labels_weak"]) == 0  # 1-2 labels, max_labels 3


def test_weak_basic_and_ca_losses_have_nonzero_gradients():
    """A weak group's image-level CE and CA term both move the parameters at the first step."""
    setup = get_setup("larvseg")
    state, batch, g = setup.state, main_batch(), WEAK_GROUPS[1]
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), g)
    spec = SOURCES[0]

    def terms(params):  # the weighted loss and its two unweighted parts
        loss, parts = group_loss(
            params,
            batch["weak"]["image"][g],
            batch["weak"]["label"][g],
            key,
            model=setup.model,
            spec=spec,
            settings=setup.settings,
            bank=group_bank(state, g),
        )
        return jax.numpy.stack([loss, parts["basic"], parts["aux"]])

    values, jac = jax.jit(lambda p: (terms(p), jax.jacrev(terms)(p)))(state.params)
    grad_loss, grad_basic, grad_aux = (
        np.concatenate([np.ravel(x[i]) for x in jax.tree.leaves(jac)]) for i in range(3)
    )
    assert values[1] > 1e-3 and values[2] > 1e-3
    assert np.all(np.isfinite(grad_loss))
    assert np.linalg.norm(grad_basic) > 1e-4 and np.linalg.norm(grad_aux) > 1e-4
    # The CA term alone changes the gradient: ca_weight 0.1 vs 0 differ by 0.1 * d(aux).
    ca_only = grad_loss - spec.basic_weight * grad_basic
    np.testing.assert_allclose(ca_only, spec.ca_weight * grad_aux, rtol=1e-4, atol=1e-7)
    assert np.linalg.norm(ca_only) > 1e-2 * spec.basic_weight * np.linalg.norm(grad_basic)


def test_rows_of_other_sources_are_never_read(setup):
    clean = main_batch()
    poisoned = make_batch(0, fill=np.nan)
    state_c, m_clean = run_step(setup, 8, clean)
    state_p, m_poisoned = run_step(setup, 8, poisoned)
    np.testing.assert_allclose(m_poisoned["loss"], m_clean["loss"], rtol=1e-6)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves((state_p.params, state_p.bank)))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
        (state_p.params, state_p.bank),
        (state_c.params, state_c.bank),
    )


def test_group_plan_follows_rank_mod_n():
    assert groups.group_sources(["a", "c", "i"], [3, 3, 2], 8) == list(
        "acia cia c".replace(" ", "")
    )
    assert groups.group_sources(["w", "c"], [4, 4], 8) == ["w", "c"] * 4
    with pytest.raises(ValueError, match=r"num_groups=8 .*ratio.* 5"):
        groups.group_sources(["w", "c"], [3, 2], 8)
    with pytest.raises(ValueError, match="device count 3"):
        groups.groups_per_device(8, 3)


def test_labels_past_max_labels_are_counted():
    """Crops with more labels than the CA pair lists hold are reported, not silently dropped."""
    setup = get_setup("larvseg")
    batch = make_batch(3, crowded=True)
    state, metrics = run_step(setup, 1, batch)
    present = weak_present(batch)
    n_labels = present.sum(-1)
    want = np.maximum(n_labels[WEAK_GROUPS] - MAX_LABELS, 0).sum()
    assert want > 0 and float(metrics["unvisited_labels_weak"]) == want
    assert np.isfinite(float(metrics["aux_weak"])) and float(metrics["aux_weak"]) > 0
    # Only the first max_labels labels (ascending) of an image get a pair and an enqueue.
    visited = present & (np.cumsum(present, -1) <= MAX_LABELS)
    want_full = np.zeros((8, 5), np.int32)
    for g in WEAK_GROUPS:
        want_full[g, :4] = visited[g].sum(0)
    np.testing.assert_array_equal(state.bank.full, want_full)
