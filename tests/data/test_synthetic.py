"""Synthetic world: determinism, idempotence, the boat/water confound, separable classes."""

import glob
import os
import shutil

import numpy as np
import pytest

from larvseg_jax.data import catalog, sources, synthetic
from larvseg_jax.errors import ConfigError
from tests.data.conftest import TINY


def _record_bytes(root: str, knobs: dict) -> dict:
    data_dir = synthetic.ensure_synthetic(root, knobs)
    files = glob.glob(os.path.join(data_dir, sources.ROOT, "*", "*", "*.array_record*"))
    return {os.path.relpath(f, data_dir): open(f, "rb").read() for f in sorted(files)}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    knobs = dict(TINY, num_seg=6, num_weak=6, num_single=4, num_eval=2)
    a, b, c = (
        _record_bytes(str(tmp_path / sub), dict(knobs, seed=seed))
        for sub, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    assert len(a) == 4 and a == b
    assert all(a[k] != c[k] for k in a)


def test_worlds_are_cached_once_per_knobs(tmp_path):
    knobs = dict(TINY, num_seg=6, num_weak=6, num_single=4, num_eval=2)
    first = synthetic.ensure_synthetic(str(tmp_path), knobs)
    path = os.path.join(sources.source_dir(first, "syn_seg"), "dataset_info.json")
    mtime = os.path.getmtime(path)
    assert synthetic.ensure_synthetic(str(tmp_path), knobs) == first
    assert os.path.getmtime(path) == mtime  # not regenerated
    other = synthetic.ensure_synthetic(str(tmp_path), dict(knobs, num_seg=8))
    assert other != first and len(sources.open_source("syn_seg", other)) == 8
    assert len(sources.open_source("syn_seg", first)) == 6  # the first world is kept
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic_tmp_")]


def test_a_world_finished_by_another_run_is_used(tmp_path, monkeypatch):
    """Two runs generating the same world at once: the second rename loses and keeps the first."""
    knobs = dict(TINY, num_seg=6, num_weak=6, num_single=4, num_eval=2)
    final = synthetic.world_dir(str(tmp_path), knobs)
    real_rename = os.rename

    def finish_first(src, dst):  # another run completes the same world just before us
        if dst == final and not os.path.exists(final):
            shutil.copytree(src, final)
        return real_rename(src, dst)

    monkeypatch.setattr(synthetic.os, "rename", finish_first)
    assert synthetic.ensure_synthetic(str(tmp_path), knobs) == final
    assert len(sources.open_source("syn_weak", final)) == 6
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic_tmp_")]


def test_unknown_knob_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="unknown synthetic knobs"):
        synthetic.ensure_synthetic(str(tmp_path), dict(TINY, num_sge=3))


def test_vocabularies_and_kinds(tiny_world):
    records = {n: sources.open_source(n, tiny_world) for n in synthetic.NAMES}
    infos = {n: r.dataset for n, r in records.items()}
    assert infos["syn_seg"].class_names == synthetic.BASE
    assert infos["syn_weak"].class_names == synthetic.BASE + synthetic.NOVEL
    assert infos["syn_single"].class_names == synthetic.NOVEL
    assert infos["syn_eval"].class_names == infos["syn_weak"].class_names
    assert records["syn_eval"].split == "validation"
    assert [infos[n].kind for n in synthetic.NAMES] == ["seg", "weak", "single", "eval"]
    assert [len(records[n]) for n in synthetic.NAMES] == [24, 24, 16, 4]


def test_seg_images_hold_only_base_classes_all_labelled(tiny_world):
    src = sources.open_source("syn_seg", tiny_world).source
    for i in range(len(src)):
        assert src[i]["label"].max() < len(synthetic.BASE)


def test_boats_sit_on_water_in_weak_and_single_data():
    knobs = dict(synthetic.DEFAULT_KNOBS, image_size=32)
    water, boat = synthetic.ALL.index("water"), synthetic.ALL.index("boat")
    boats = 0
    for i in range(60):
        rng = np.random.default_rng(i)
        _, label = synthetic.make_example("weak", rng, knobs)
        if (label == boat).any():
            boats += 1
            assert (label == water).any()
        for cls in range(len(synthetic.BASE), len(synthetic.ALL)):
            _, label = synthetic.make_example("single", np.random.default_rng([i, cls]), knobs, cls)
            frac = (label == cls).mean()
            assert 0 < frac < 0.5  # the object is a minority of the image
            assert (label == water).any() == (cls == boat)
    assert boats > 10


def test_confound_zero_keeps_boats_off_water():
    knobs = dict(synthetic.DEFAULT_KNOBS, image_size=32, confound=0.0)
    water, boat = synthetic.ALL.index("water"), synthetic.ALL.index("boat")
    for i in range(20):
        _, label = synthetic.make_example("single", np.random.default_rng(i), knobs, boat)
        assert not (label == water).any()


def test_weak_records_store_the_confound(tiny_world):
    src = sources.open_source("syn_weak", tiny_world).source
    names = catalog.class_names("syn_weak")
    for i in range(len(src)):
        present = set(np.unique(src[i]["label"]))
        if names.index("boat") in present:
            assert names.index("water") in present


def test_class_colours_are_separated():
    knobs = dict(synthetic.DEFAULT_KNOBS, image_size=32)
    sums = np.zeros((len(synthetic.ALL), 3))
    counts = np.zeros(len(synthetic.ALL))
    for i in range(40):
        image, label = synthetic.make_example("eval", np.random.default_rng(i), knobs)
        for c in np.unique(label):
            sums[c] += image[label == c].reshape(-1, 3).sum(0)
            counts[c] += (label == c).sum()
    means = sums / counts[:, None]
    dist = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert dist[~np.eye(len(means), dtype=bool)].min() > 40
