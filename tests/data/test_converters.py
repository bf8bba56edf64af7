"""data_prep converters on miniatures of each dataset's real layout (tests/data/layouts.py)."""

import functools
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep import ade20k, ade20k_full, coco_stuff, convert, imagenet, images
from larvseg_jax.data import catalog, pipeline, sources
from larvseg_jax.errors import MissingError
from larvseg_jax.vocab import IGNORE
from tests.data import layouts


def _convert(jobs, out, **kw):
    return {s.name: s for s in convert.convert_all(jobs, str(out), workers=1, shard_size=4, **kw)}


def _labels(name, out, split=None):
    records = sources.open_source(name, str(out), split)
    return {r["image_id"].decode(): r for r in (records.source[i] for i in range(len(records)))}


def _raw(path):
    return np.asarray(Image.open(path))


def test_ade20k_reduces_zero_label_and_reports_messy_files(tmp_path):
    root = layouts.ade20k(str(tmp_path / "src"), classes=[0, 1, 150, 7])
    summaries = _convert(ade20k.jobs(str(tmp_path / "src")), tmp_path / "out")
    wa150 = summaries["wa150"]
    assert wa150.written == {"train": 6} and wa150.aliases == ("a150_seg",)
    assert wa150.rejects == {"not an image": 1, "unreadable image": 1}
    assert "converted to RGB JPEG: 1 JPEG CMYK, 1 JPEG L" in wa150.notes
    for image_id, rec in _labels("wa150", tmp_path / "out").items():
        raw = _raw(f"{root}/annotations/training/{image_id}.png")
        assert np.array_equal(rec["label"][..., 0], ade20k.reduce_zero_label(raw))
        assert rec["image"].shape == (*layouts.SIZE, 3)  # grayscale and CMYK now RGB
    seg = sources.open_source("a150_seg", str(tmp_path / "out"))
    assert seg.dataset.kind == "seg" and len(seg) == 6
    rejects = os.path.join(sources.source_dir(str(tmp_path / "out"), "wa150"), "rejects.tsv")
    rows = [line.split("\t") for line in pathlib.Path(rejects).read_text().splitlines()[1:]]
    assert {(os.path.basename(r[1]), r[2]) for r in rows} == {
        ("README.txt", "not an image"),
        ("ADE_train_00000007.jpg", "unreadable image"),
    }
    ds = pipeline.make_eval_dataset("a150", data_dir=str(tmp_path / "out"), short_side=48)
    ex = next(iter(ds))
    raw = _raw(f"{root}/annotations/validation/{ex['id']}.png")
    assert np.array_equal(ex["label"], np.where(raw == 0, IGNORE, raw.astype(np.int32) - 1))


def test_per_class_image_counts_are_written(tmp_path):
    layouts.ade20k(str(tmp_path / "src"), n_train=4, classes=[1, 2, 3, 4, 5, 6])
    _convert(ade20k.jobs(str(tmp_path / "src")), tmp_path / "out")
    counts = sources.class_image_counts(str(tmp_path / "out"), "wa150")
    # 4 readable images of 3 bands each, cycling through ids 1..6 from offset 0.
    names = catalog.class_names("a150")
    assert {n: c for n, c in counts.items() if c} == {names[i]: 2 for i in range(6)}


@pytest.mark.parametrize("train_ids", [False, True])
def test_coco_stuff_maps_coco_ids_to_171_train_ids(tmp_path, train_ids):
    root = layouts.coco_stuff(str(tmp_path / "src"), train_ids=train_ids)
    summaries = _convert(coco_stuff.jobs(root), tmp_path / "out")
    c171 = summaries["c171"]
    assert c171.written == {"train": 6, "validation": 4}
    found = "_labelTrainIds.png" if train_ids else "stuffthingmaps"
    assert any(found in note for note in c171.notes)
    lut = coco_stuff.raw_to_train_ids()
    assert (lut[0], lut[10], lut[11], lut[12], lut[181], lut[90], lut[255]) == (
        0,
        10,
        255,
        11,
        170,
        255,
        255,  # person, 11th thing, unused id 12, id 13, last stuff
    )
    suffix = "_labelTrainIds.png" if train_ids else ".png"
    for split, subdir in (("train", "train2017"), ("validation", "val2017")):
        for image_id, rec in _labels("c171", tmp_path / "out", split).items():
            raw = _raw(f"{root}/annotations/{subdir}/{image_id}{suffix}")
            want = raw if train_ids else lut[raw]
            assert np.array_equal(rec["label"][..., 0], want)


def test_coco_stuff_rejects_values_outside_the_table_and_wrong_sizes(tmp_path):
    root = layouts.coco_stuff(str(tmp_path / "src"), n_train=3, n_val=1)
    labels = f"{root}/annotations/train2017"
    Image.fromarray(np.full(layouts.SIZE, 200, np.uint8)).save(f"{labels}/000000000001.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(f"{labels}/000000000002.png")
    os.remove(f"{labels}/000000000003.png")
    c171 = _convert(coco_stuff.jobs(root), tmp_path / "out")["c171"]
    assert c171.written == {"train": 0, "validation": 1}
    assert c171.rejects == {
        "label values outside the class table": 1,
        "label size differs from image": 1,
        "missing label": 1,
        "not an image": 1,
        "unreadable image": 1,
    }


def test_ade20k_full_keeps_847_ids_and_writes_the_a585_subset(tmp_path):
    a847 = catalog.class_names("a847")
    a585 = catalog.class_names("a585")
    ids = [a847.index(a585[0]), 0, 846, a847.index(a585[-1])]
    root = layouts.ade20k_full(str(tmp_path / "src"), classes=ids)
    summaries = _convert(ade20k_full.jobs(root), tmp_path / "out")
    assert summaries["wa847"].written == {"train": 6} and summaries["a585"].written == {
        "validation": 4
    }
    assert summaries["wa847"].rejects == {"not an image": 1, "unreadable image": 1}
    lut = ade20k_full.a847_to_a585()
    full = _labels("a847", tmp_path / "out")
    sub = _labels("a585", tmp_path / "out")
    for image_id, rec in full.items():
        raw = _raw(f"{root}/val/label/{image_id}.tif")
        assert raw.dtype == np.uint16 and rec["label"].dtype == np.uint16
        assert np.array_equal(rec["label"][..., 0], raw)
        assert np.array_equal(sub[image_id]["label"][..., 0], lut[raw])
    assert lut[ids[0]] == 0 and lut[ids[3]] == 584 and lut[65535] == 65535
    assert sources.open_source("a847_seg", str(tmp_path / "out")).dataset.kind == "seg"


def test_ade20k_full_accepts_the_maskformer_layout(tmp_path):
    src = tmp_path / "ADE20K_2021_17_01"
    layouts.write_pairs(
        str(src / "images_detectron2" / "training"),
        str(src / "annotations_detectron2" / "training"),
        ".tif",
        [[1, 2]] * 2,
        dtype=np.uint16,
        seed=0,
        messy=False,
    )
    layouts.write_pairs(
        str(src / "images_detectron2" / "validation"),
        str(src / "annotations_detectron2" / "validation"),
        ".tif",
        [[3]],
        dtype=np.uint16,
        seed=1,
        messy=False,
    )
    summaries = _convert(ade20k_full.jobs(str(tmp_path)), tmp_path / "out")
    assert summaries["wa847"].written == {"train": 2}
    assert any("MaskFormer" in n for n in summaries["a847"].notes)


def test_imagenet_labels_whole_images_and_reports_missing_synsets(tmp_path):
    wnids = catalog.read_keys("i124.txt")
    root = layouts.imagenet(str(tmp_path / "src"), wnids[:3], per_synset=2)
    summaries = _convert(imagenet.jobs(str(tmp_path / "src"), subsets=["i124"]), tmp_path / "out")
    i124 = summaries["i124"]
    assert i124.written == {"train": 6} and i124.rejects == {"unreadable image": 1}
    assert any("3 of 124 synsets found" in n for n in i124.notes)
    assert any("121 synsets missing" in n for n in i124.notes)
    missing = pathlib.Path(sources.source_dir(str(tmp_path / "out"), "i124"), "synsets_missing.txt")
    assert missing.read_text().split() == list(wnids[3:])
    for image_id, rec in _labels("i124", tmp_path / "out").items():
        assert wnids[int(rec["class_id"])] == image_id.split("_")[0]
    assert root.endswith("fall11_whole")


def test_rerun_is_a_no_op_and_an_interrupted_run_resumes(tmp_path, monkeypatch):
    layouts.ade20k(str(tmp_path / "src"), n_train=9)
    jobs = ade20k.jobs(str(tmp_path / "src"))
    _convert(jobs, tmp_path / "out")
    directory = sources.source_dir(str(tmp_path / "out"), "wa150")
    shards = sorted(f for f in os.listdir(directory) if ".array_record-" in f)
    assert len(shards) == 3  # 10 train files listed (one corrupt) / shard_size 4
    stamps = {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}
    assert all(s.skipped for s in _convert(jobs, tmp_path / "out").values())
    assert stamps == {f: os.stat(os.path.join(directory, f)).st_mtime_ns for f in shards}

    # A run stopped in the middle: one shard's done-file and data are gone, metadata too.
    os.remove(os.path.join(directory, "metadata.json"))
    os.remove(os.path.join(directory, shards[1]))
    os.remove(os.path.join(directory, convert.STATE_DIR, "train-00001.json"))
    converted = []
    real = ade20k.make_example
    monkeypatch.setattr(ade20k, "make_example", lambda item: converted.append(item) or real(item))
    summaries = _convert(ade20k.jobs(str(tmp_path / "src")), tmp_path / "out")
    assert len(converted) == 4  # only the missing shard was converted again
    assert summaries["wa150"].written == {"train": 9} and not summaries["wa150"].skipped
    assert stamps[shards[0]] == os.stat(os.path.join(directory, shards[0])).st_mtime_ns
    assert len(sources.open_source("wa150", str(tmp_path / "out"))) == 9


def test_changed_inputs_start_the_source_over(tmp_path):
    layouts.ade20k(str(tmp_path / "src"), n_train=3)
    _convert(ade20k.jobs(str(tmp_path / "src")), tmp_path / "out")
    layouts.ade20k(str(tmp_path / "src2"), n_train=5)
    summaries = _convert(ade20k.jobs(str(tmp_path / "src2")), tmp_path / "out")
    assert summaries["wa150"].written == {"train": 5}
    assert len(sources.open_source("a150_seg", str(tmp_path / "out"))) == 5


def test_a_wrong_src_is_one_clear_error(tmp_path):
    with pytest.raises(MissingError, match="should be the ADEChallengeData2016 folder"):
        ade20k.jobs(str(tmp_path))
    with pytest.raises(MissingError, match="should be the coco_stuff164k folder"):
        coco_stuff.jobs(str(tmp_path))
    with pytest.raises(MissingError, match="not an ADE20K-Full folder"):
        ade20k_full.jobs(str(tmp_path))
    with pytest.raises(MissingError, match="none of the expected synset folders"):
        imagenet.jobs(str(tmp_path), subsets=["i124"])


def test_read_rgb_converts_modes_and_keeps_rgb_jpegs(tmp_path, fixtures_dir):
    photo = str(fixtures_dir / "images" / "grace_hopper.jpg")
    data, size, note = images.read_rgb(photo)
    assert data == pathlib.Path(photo).read_bytes() and note == ""  # stored as downloaded
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 3] = 0  # fully transparent: white, not the black under it
    Image.fromarray(rgba).save(tmp_path / "a.png")
    data, size, note = images.read_rgb(str(tmp_path / "a.png"))
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    assert size == (4, 5) and note == "PNG RGBA" and decoded.min() > 240
    for bad, reason in (
        ("truncated.jpg", "unreadable image"),
        ("not_an_image.jpg", "unreadable image"),
    ):
        with pytest.raises(images.Reject, match=reason):
            images.read_rgb(str(fixtures_dir / "bad" / bad))


@pytest.mark.parametrize("module", ["coco_stuff", "ade20k", "ade20k_full", "imagenet"])
def test_command_line_help_and_wrong_src(module, tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[2]
    run = functools.partial(
        subprocess.run, cwd=repo, capture_output=True, text=True, check=False, timeout=120
    )
    help_text = run([sys.executable, "-m", f"data_prep.{module}", "--help"]).stdout
    for flag in ("--src", "--out", "--workers", "--shard-size"):
        assert flag in help_text
    bad = run([sys.executable, "-m", f"data_prep.{module}", "--src", str(tmp_path), "--out", "x"])
    assert bad.returncode == 1
    assert bad.stderr.count("\n") == 1 and bad.stderr.startswith(f"error: {tmp_path}")
