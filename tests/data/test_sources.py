"""Record format: write/read round trip, ignore mapping, one-line errors."""

import io

import numpy as np
import pytest
from PIL import Image

from larvseg_jax.data import sources, transforms


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _examples(rng, n, num_classes, dtype=np.uint8, ignore=255):
    out = []
    for i in range(n):
        image = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        label = rng.integers(0, num_classes, (10 + i, 12)).astype(dtype)
        label[0, 0] = ignore
        stored = _png(label) if dtype == np.uint8 else label[..., None]
        out.append({"image": _png(image), "label": stored, "image_id": f"img{i}"})
    return out


def test_seg_source_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    examples = _examples(rng, 5, 3)
    sources.write_source(
        str(tmp_path),
        "toy",
        kind="seg",
        class_names=("a", "b", "c"),
        split_examples={"train": examples},
    )
    info, src = sources.open_source("toy", str(tmp_path))
    assert info == sources.source_info("toy", str(tmp_path))
    assert (info.kind, info.class_names, info.num_examples) == ("seg", ("a", "b", "c"), 5)
    by_id = {src[i]["image_id"].decode(): src[i] for i in range(len(src))}
    for ex in examples:
        rec = by_id[ex["image_id"]]
        assert np.array_equal(rec["image"], np.asarray(Image.open(io.BytesIO(ex["image"]))))
        stored = np.asarray(Image.open(io.BytesIO(ex["label"])))
        assert np.array_equal(rec["label"][..., 0], stored)
        decoded = transforms.Decode("toy", 3, info.ignore_codes).map(rec)
        assert decoded["label"][0, 0] == sources.IGNORE
        assert np.array_equal(decoded["label"][1:], stored[1:].astype(np.int32))


def test_uint16_labels_map_65535_to_ignore(tmp_path):
    rng = np.random.default_rng(1)
    examples = _examples(rng, 2, 847, dtype=np.uint16, ignore=65535)
    sources.write_source(
        str(tmp_path),
        "toy16",
        kind="seg",
        class_names=[f"c{i}" for i in range(847)],
        split_examples={"validation": examples},
        label_dtype="uint16",
    )
    info, src = sources.open_source("toy16", str(tmp_path), "validation")
    assert info.ignore_codes == (65535,)
    decoded = transforms.Decode("toy16", 847, info.ignore_codes).map(src[0])
    assert decoded["label"][0, 0] == sources.IGNORE
    assert decoded["label"].max() < 847 and decoded["label"].max() > 255


def test_single_source_stores_class_id(tmp_path):
    image = _png(np.zeros((8, 9, 3), np.uint8))
    examples = [{"image": image, "class_id": 2, "image_id": "x"}]
    sources.write_source(
        str(tmp_path),
        "one",
        kind="single",
        class_names=("a", "b", "c"),
        split_examples={"train": examples},
    )
    info, src = sources.open_source("one", str(tmp_path))
    assert info.kind == "single" and int(src[0]["class_id"]) == 2


def test_missing_dataset_error_names_the_converter(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset 'wa150' not found under .*data_prep"):
        sources.open_source("wa150", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ensure_synthetic"):
        sources.source_info("syn_seg", str(tmp_path))


def test_unknown_source_lists_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match=r"unknown source 'syn_wek'; known: .*syn_weak"):
        sources.open_source("syn_wek", str(tmp_path))


def test_missing_split_is_a_clear_error(tiny_world):
    with pytest.raises(ValueError, match="has no split 'train'"):
        sources.open_source("syn_eval", tiny_world, "train")


def test_out_of_range_label_names_the_record():
    rec = {"image": np.zeros((2, 2, 3), np.uint8), "label": np.full((2, 2, 1), 7, np.uint8)}
    rec["image_id"] = b"frame_42"
    with pytest.raises(ValueError, match=r"toy record 'frame_42': label id 7 is out of range"):
        transforms.Decode("toy", 6).map(rec)
    with pytest.raises(ValueError, match="class id 9"):
        transforms.Decode("toy", 6).map({"image": rec["image"], "class_id": 9, "image_id": b"x"})
