"""data_prep.ade20k on a tiny fake ADEChallengeData2016 tree."""

import numpy as np
import pytest
from PIL import Image

from data_prep import ade20k
from larvseg_jax.data import pipeline, sources
from larvseg_jax.vocab import IGNORE


def _fake_ade(root, subdir, n, rng):
    (root / "images" / subdir).mkdir(parents=True)
    (root / "annotations" / subdir).mkdir(parents=True)
    labels = {}
    for i in range(n):
        stem = f"ADE_{subdir}_{i:08d}"
        image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        Image.fromarray(image).save(root / "images" / subdir / f"{stem}.jpg")
        label = rng.integers(0, 151, (24, 32)).astype(np.uint8)
        label[0, 0], label[0, 1] = 0, 150
        Image.fromarray(label).save(root / "annotations" / subdir / f"{stem}.png")
        labels[stem] = label
    return labels


def test_converter_reduces_zero_label(tmp_path):
    rng = np.random.default_rng(0)
    ade = tmp_path / "ADEChallengeData2016"
    train = _fake_ade(ade, "training", 3, rng)
    val = _fake_ade(ade, "validation", 2, rng)
    data_dir = str(tmp_path / "data")
    ade20k.convert(str(ade), data_dir, ["wa150", "a150"])
    records = sources.open_source("wa150", data_dir)
    info, src = records.dataset, records.source
    assert (info.kind, len(records), len(info.class_names)) == ("weak", 3, 150)
    assert info.class_names[0] == "wall"
    for i in range(len(src)):
        rec = src[i]
        raw = train[rec["image_id"].decode()]
        assert np.array_equal(rec["label"][..., 0], ade20k.reduce_zero_label(raw))
        assert rec["label"][0, 0, 0] == 255 and rec["label"][0, 1, 0] == 149
    ds = pipeline.make_eval_dataset("a150", data_dir=data_dir, short_side=48)
    assert len(ds) == 2
    for ex in ds:
        raw = val[ex["id"]]
        assert ex["label"][0, 0] == IGNORE
        assert np.array_equal(ex["label"][raw > 0], raw[raw > 0].astype(np.int32) - 1)
        assert ex["image"].shape == (48, 64, 3)


def test_converter_rejects_a_wrong_root(tmp_path):
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no .jpg images"):
        ade20k.convert(str(tmp_path), str(tmp_path / "data"), ["wa150"])
