"""Synthetic world: determinism, idempotence, the boat/water confound, separable classes."""

import glob
import os

import numpy as np
import pytest

from larvseg_jax.data import sources, synthetic
from tests.data.conftest import TINY


def _record_bytes(data_dir: str) -> dict:
    files = glob.glob(os.path.join(data_dir, sources.ROOT, "*", "*", "*.array_record*"))
    return {os.path.relpath(f, data_dir): open(f, "rb").read() for f in sorted(files)}


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path):
    knobs = dict(TINY, num_seg=6, num_weak=6, num_single=4, num_eval=2)
    for sub, seed in (("a", 0), ("b", 0), ("c", 1)):
        synthetic.ensure_synthetic(str(tmp_path / sub), dict(knobs, seed=seed))
    a, b, c = (_record_bytes(str(tmp_path / s)) for s in "abc")
    assert len(a) == 4 and a == b
    assert all(a[k] != c[k] for k in a)


def test_ensure_is_idempotent_and_regenerates_on_new_knobs(tmp_path):
    knobs = dict(TINY, num_seg=6, num_weak=6, num_single=4, num_eval=2)
    synthetic.ensure_synthetic(str(tmp_path), knobs)
    path = os.path.join(sources.source_dir(str(tmp_path), "syn_seg"), "dataset_info.json")
    mtime = os.path.getmtime(path)
    synthetic.ensure_synthetic(str(tmp_path), knobs)
    assert os.path.getmtime(path) == mtime
    synthetic.ensure_synthetic(str(tmp_path), dict(knobs, num_seg=8))
    assert sources.source_info("syn_seg", str(tmp_path)).num_examples == 8
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".synthetic_tmp_")]


def test_unknown_knob_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic knobs"):
        synthetic.ensure_synthetic(str(tmp_path), dict(TINY, num_sge=3))


def test_vocabularies_and_kinds(tiny_world):
    infos = {n: sources.source_info(n, tiny_world) for n in synthetic.KINDS}
    assert infos["syn_seg"].class_names == synthetic.BASE
    assert infos["syn_weak"].class_names == synthetic.BASE + synthetic.NOVEL
    assert infos["syn_single"].class_names == synthetic.NOVEL
    assert infos["syn_eval"].class_names == infos["syn_weak"].class_names
    assert infos["syn_eval"].splits == ("validation",)
    assert [infos[n].kind for n in synthetic.KINDS] == ["seg", "weak", "single", "eval"]
    assert [infos[n].num_examples for n in synthetic.KINDS] == [24, 24, 16, 4]


def test_seg_images_hold_only_base_classes_all_labelled(tiny_world):
    _, src = sources.open_source("syn_seg", tiny_world)
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
    _, src = sources.open_source("syn_weak", tiny_world)
    names = synthetic.VOCABS["syn_weak"]
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
