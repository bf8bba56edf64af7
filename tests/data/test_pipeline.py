"""Mixing into the group layout, determinism, exact resume, evaluation dataset (SPEC 3, 4, 7.1)."""

import numpy as np

from larvseg_jax import groups
from larvseg_jax.data import catalog, pipeline
from larvseg_jax.vocab import IGNORE

SOURCES = ("syn_weak", "syn_seg", "syn_single")
STREAMS = tuple(pipeline.StreamSpec(n, c) for n, c in zip(SOURCES, (32, 32, 24)))
PLAN = groups.group_sources(SOURCES, (3, 3, 2), 8)


def _iterator(data_dir, local_groups=range(8), seed=0):
    return pipeline.make_train_iterator(
        STREAMS,
        data_dir=data_dir,
        group_sources=PLAN,
        local_groups=list(local_groups),
        images_per_group=2,
        seed=seed,
    )


def _equal(a, b) -> bool:
    return all(np.array_equal(a[s][k], b[s][k]) for s in a for k in ("image", "label"))


def test_rows_hold_their_source_and_zero_ignore_elsewhere(tiny_world):
    batch = next(_iterator(tiny_world))
    assert sorted(batch) == sorted(SOURCES)
    for i, name in enumerate(SOURCES):
        crop = (32, 32, 24)[i]
        image, label = batch[name]["image"], batch[name]["label"]
        assert image.shape == (8, 2, crop, crop, 3) and image.dtype == np.float32
        assert label.shape == (8, 2, crop, crop) and label.dtype == np.int32
        mine = np.array([s == name for s in PLAN])
        assert mine.sum() == (3, 3, 2)[i]
        assert (image[~mine] == 0).all() and (label[~mine] == IGNORE).all()
        assert all((label[g, b] != IGNORE).any() for g in np.nonzero(mine)[0] for b in range(2))
        assert label.max() < len(catalog.class_names(name))


def test_single_label_rows_are_one_class_everywhere(tiny_world):
    label = next(_iterator(tiny_world))["syn_single"]["label"]
    for g in [g for g, s in enumerate(PLAN) if s == "syn_single"]:
        for b in range(2):
            assert len(np.unique(label[g, b])) == 1 and label[g, b, 0, 0] >= 0


def test_stream_positions_split_each_epoch_disjointly():
    size, per_step = 24, 6  # 3 groups x B=2 of a 24-example source: 4 steps per epoch
    starts = [pipeline.stream_position(t, per_step, size) for t in range(8)]
    assert starts == [0, 6, 12, 18, 24, 30, 36, 42]
    size = 25  # 25 % 6 = 1 example dropped per epoch; steps never straddle epochs
    starts = [pipeline.stream_position(t, per_step, size) for t in range(5)]
    assert starts == [0, 6, 12, 18, 25]


class _Tag:
    """Fake augmented stream element: image and label filled with the record index."""

    def __call__(self, index):
        return {"image": np.full((4, 4, 3), index, np.float32), "label": np.full((4, 4), index)}


def test_groups_of_a_source_read_disjoint_records():
    sizes = {"syn_weak": 14, "syn_seg": 12, "syn_single": 9}
    streams = {
        name: pipeline.grain.MapDataset.source(list(range(n)))
        .seed(i)
        .shuffle()
        .repeat()
        .map(_Tag())
        for i, (name, n) in enumerate(sizes.items())
    }
    per_step = {name: PLAN.count(name) * 2 for name in SOURCES}
    rows = [
        (name, [h for h, s in enumerate(PLAN) if s == name].index(g) * 2)
        for g, name in enumerate(PLAN)
    ]
    assemble = pipeline.AssembleStep(streams, sizes, {n: 4 for n in SOURCES}, rows, per_step, 2)
    for name in SOURCES:
        mine = [g for g, s in enumerate(PLAN) if s == name]
        steps_per_epoch = sizes[name] // per_step[name]
        for epoch in range(2):
            seen = []
            for t in range(epoch * steps_per_epoch, (epoch + 1) * steps_per_epoch):
                ids = assemble.map(t)[name]["label"][mine, :, 0, 0].ravel().tolist()
                assert len(set(ids)) == len(ids) == per_step[name]  # disjoint across groups
                seen += ids
            assert len(set(seen)) == len(seen)  # without replacement within an epoch


def test_process_shards_equal_the_rows_of_the_full_batch(tiny_world):
    full = next(_iterator(tiny_world))
    low = next(_iterator(tiny_world, local_groups=range(4)))
    high = next(_iterator(tiny_world, local_groups=range(4, 8)))
    for name in SOURCES:
        for key in ("image", "label"):
            np.testing.assert_array_equal(full[name][key][:4], low[name][key])
            np.testing.assert_array_equal(full[name][key][4:], high[name][key])


def test_stream_is_a_function_of_the_seed(tiny_world):
    a, b, c = _iterator(tiny_world), _iterator(tiny_world), _iterator(tiny_world, seed=1)
    first = [next(a) for _ in range(3)]
    assert all(_equal(x, next(b)) for x in first)
    assert not _equal(first[0], next(c))
    assert not _equal(first[0], first[1])


def test_state_restore_resumes_at_the_identical_batch(tiny_world):
    it = _iterator(tiny_world)
    for _ in range(13):  # past the first epoch of syn_single (16 examples / 4 per step)
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(2)]
    fresh = _iterator(tiny_world)
    fresh.set_state(state)
    assert all(_equal(e, next(fresh)) for e in expected)


def test_eval_dataset_shapes(tiny_world):
    ds = pipeline.make_eval_dataset("syn_eval", data_dir=tiny_world, short_side=40, max_images=3)
    assert len(ds) == 3
    for ex in ds:
        h0, w0 = ex["label"].shape
        assert ex["raw"].shape == (h0, w0, 3) and ex["raw"].dtype == np.uint8
        assert min(ex["image"].shape[:2]) == 40 and ex["image"].dtype == np.float32
        assert ex["label"].dtype == np.int32 and isinstance(ex["id"], str)
    assert len(pipeline.make_eval_dataset("syn_eval", data_dir=tiny_world, short_side=40)) == 4
