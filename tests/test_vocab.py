"""Union vocabulary and base/novel split on the real class lists (SPEC 1.4, 5.3)."""

import numpy as np
import pytest

from larvseg_jax import vocab
from larvseg_jax.data import catalog


def read_names(fixtures_dir, name):
    return (fixtures_dir / "classes" / name).read_text().splitlines()


def test_v1_union_of_a150_and_c171_has_251_names_and_58_shared(fixtures_dir):
    a150 = read_names(fixtures_dir, "ade20k_150_names.txt")
    raw_c171 = read_names(fixtures_dir, "cocostuff_171_names.txt")
    c171 = list(catalog.class_names("c171"))
    assert c171 == [n.split("-")[0] for n in raw_c171]  # V1: cut at the first "-" (SPEC 1.4)
    assert list(catalog.class_names("a150")) == a150
    assert len(c171) == 171 and len(set(c171)) == 159  # wall x7, floor x5, ... (SPEC 1.4)
    union = vocab.build_union([a150, c171])
    assert len(union) == 251
    base, novel = vocab.base_novel_split(a150, c171)
    assert (len(base), len(novel)) == (58, 92)
    for name in ("windowpane", "blind", "television receiver", "glass", "dirt track"):
        assert name in novel  # V1 leaves these to the weak labels (SPEC 1.4)
    assert "traffic light" in base and "water" in base


def test_v1_union_of_a847_and_c171_has_914_names_and_92_shared(fixtures_dir):
    a847 = list(catalog.class_names("a847"))
    assert len(a847) == len(set(a847)) == 847
    c171 = list(catalog.class_names("c171"))
    assert len(vocab.build_union([a847, c171])) == 914
    base, novel = vocab.base_novel_split(a847, c171)
    assert (len(base), len(novel)) == (92, 755)  # "WA847 contains 755 novel categories"
    assert {"wall", "sky", "scissors", "tie"} <= set(base)


def test_imagenet_subsets_name_ade_classes():
    # I124 names are A150 names and I585 names A847 names (SPEC 5.4): the weak labels land on
    # the evaluation classes; the 21K model's union with C171 has 10,524 names.
    assert set(catalog.class_names("i124")) <= set(catalog.class_names("a150"))
    assert set(catalog.class_names("i585")) <= set(catalog.class_names("a847"))
    assert (len(catalog.class_names("i124")), len(catalog.class_names("i585"))) == (124, 585)
    i11k = catalog.class_names("i11k")
    assert len(i11k) == 11276 and len(set(i11k)) == 10472
    assert len(vocab.build_union([i11k, catalog.class_names("c171")])) == 10524
    assert len(set(catalog.read_keys("i11k.txt"))) == 11276  # one synset per class id


def test_duplicate_names_share_one_row():
    union = vocab.build_union([["wall", "sky"], ["wall", "wall", "floor"]])
    assert union == ("wall", "sky", "floor")
    np.testing.assert_array_equal(vocab.class_index(union, ["wall", "wall", "floor"]), [0, 0, 2])


def test_class_index_rejects_unknown_names():
    with pytest.raises(ValueError, match="not in the union"):
        vocab.class_index(("a", "b"), ["c"])


def test_sample_classes_keeps_every_present_class_plus_r_random():
    import jax
    import jax.numpy as jnp

    present = np.zeros(300, bool)
    present[[3, 150, 299]] = True
    sample = jax.jit(vocab.sample_classes, static_argnums=(2, 3))
    drawn = []
    for seed in range(5):
        positions, valid = sample(jax.random.PRNGKey(seed), jnp.asarray(present), 100, 140)
        pos, valid = np.asarray(positions), np.asarray(valid)
        chosen = set(pos[valid].tolist())
        assert {3, 150, 299} <= chosen
        assert 100 <= len(chosen) <= 103 and len(chosen) == int(valid.sum())
        assert len(pos[valid]) == len(chosen)  # no class listed twice
        assert valid[: len(chosen)].all()  # padding only at the end
        drawn.append(frozenset(chosen))
    assert len(set(drawn)) == 5  # a new random draw per key, not a fixed subset
    counts = np.bincount([c for d in drawn for c in d], minlength=300)
    assert (counts[~present] > 0).sum() > 200  # 5 draws of 100 cover most of the 297 others
    labels = jnp.asarray([[3, -1], [299, 150]])
    remapped = np.asarray(vocab.remap_labels(labels, positions, jnp.asarray(valid), 300))
    assert remapped[0, 1] == -1
    for (i, j), orig in np.ndenumerate(np.asarray(labels)):
        if orig >= 0:
            assert pos[remapped[i, j]] == orig


def test_sample_classes_with_small_vocabulary_takes_all():
    import jax
    import jax.numpy as jnp

    positions, valid = vocab.sample_classes(jax.random.PRNGKey(0), jnp.zeros(7, bool), 100, 7)
    assert sorted(np.asarray(positions).tolist()) == list(range(7)) and bool(valid.all())


def test_c171_coco_ids_match_mask2former(fixtures_dir):
    import json

    categories = json.loads(
        (fixtures_dir / "classes" / "cocostuff_171_mask2former.json").read_text()
    )
    assert [str(c["id"]) for c in categories] == list(catalog.read_keys("c171.txt"))
    assert [c["name"] for c in categories] == list(catalog.read_names("c171.txt"))
