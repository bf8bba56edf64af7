"""ADE20K-Full (847 classes) -> wa847 and a847_seg (train), a847 and a585 (validation), SPEC 5.1.

    python -m data_prep.ade20k_full --src /data/ade20k_full --out /data/larvseg

Two layouts of the same files are accepted (the converter says which it found):
- the LarvSeg configs' root: {train,val}/image/*.jpg and {train,val}/label/*.tif;
- MaskFormer's `datasets/prepare_ade20k_full_sem_seg.py` output inside ADE20K_2021_17_01:
  images_detectron2/{training,validation}/*.jpg, annotations_detectron2/{training,validation}/*.tif.
Labels are uint16 TIFFs with values 0..846 and 65535 unlabelled, no zero reduction (the official
code reads them as int16, so 65535 is -1 = ignore). They are stored as uint16 with ignore 65535.
a585 is the validation split with the 585 classes of ImageNet-585 (classes/i585.txt, all A847
names) renumbered in that list's order and every other class ignored: the test set of the
21K-category model (SPEC 8).
"""

import functools
import os

import numpy as np
from absl import app

from data_prep import cli, convert, images
from larvseg_jax.data import catalog
from larvseg_jax.errors import MissingError

IGNORE = 65535
LAYOUTS = {
    "LarvSeg ({train,val}/image, {train,val}/label)": {
        "train": ("train/image", "train/label"),
        "validation": ("val/image", "val/label"),
    },
    "MaskFormer (images_detectron2, annotations_detectron2)": {
        "train": ("images_detectron2/training", "annotations_detectron2/training"),
        "validation": ("images_detectron2/validation", "annotations_detectron2/validation"),
    },
}


@functools.cache  # built once per process, not per image
def _valid() -> np.ndarray:
    valid = np.zeros(IGNORE + 1, bool)
    valid[:847] = True
    valid[IGNORE] = True
    return valid


@functools.cache  # built once per process, not per image
def a847_to_a585() -> np.ndarray:
    """uint16 [65536] lookup: A847 id -> position in the I585 list, every other value ignore."""
    a847 = {name: i for i, name in enumerate(catalog.class_names("a847"))}
    lut = np.full(IGNORE + 1, IGNORE, np.uint16)
    for position, name in enumerate(catalog.class_names("a585")):
        lut[a847[name]] = position
    return lut


def make_example(item: convert.Item, subset: str) -> dict:
    image, size, note = images.read_rgb(item.image)
    label = images.read_label(item.label)
    images.check_label(label, size, item.label, _valid())
    label = label.astype(np.uint16)
    if subset == "a585":
        label = a847_to_a585()[label]
    return {"image": image, "image_id": item.image_id, "label": label[..., None], "note": note}


def find_layout(src: str) -> tuple[str, dict]:
    for candidate in (src, os.path.join(src, "ADE20K_2021_17_01")):
        for layout, dirs in LAYOUTS.items():
            if all(
                os.path.isdir(os.path.join(candidate, d)) for pair in dirs.values() for d in pair
            ):
                return layout, {
                    s: tuple(os.path.join(candidate, d) for d in p) for s, p in dirs.items()
                }
    raise MissingError(
        f"{src} is not an ADE20K-Full folder: expected train/image, train/label, val/image, "
        "val/label (LarvSeg layout) or images_detectron2/ and annotations_detectron2/ (the output "
        "of MaskFormer's prepare_ade20k_full_sem_seg.py)"
    )


def jobs(src: str) -> list[convert.SourceJob]:
    layout, dirs = find_layout(src)
    listed = {split: convert.list_pairs(split, *dirs[split], ".tif") for split in dirs}
    train, train_rejects = listed["train"]
    val, val_rejects = listed["validation"]
    notes = [f"layout: {layout}"]
    return [
        convert.SourceJob(
            "wa847",
            {"train": train},
            functools.partial(make_example, subset="a847"),
            label_dtype="uint16",
            listing_rejects=train_rejects,
            notes=notes,
            aliases=(("a847_seg", "seg"),),
        ),
    ] + [
        convert.SourceJob(
            name,
            {"validation": val},
            functools.partial(make_example, subset=name),
            label_dtype="uint16",
            listing_rejects=val_rejects,
            notes=notes + extra,
        )
        for name, extra in (
            ("a847", []),
            ("a585", ["labels: the 585 ImageNet-585 classes, every other class ignored"]),
        )
    ]


def main(argv):
    del argv
    cli.run_converter(jobs)


if __name__ == "__main__":
    cli.define_src_flag("the ade20k_full folder (or ADE20K_2021_17_01 after MaskFormer's script)")
    cli.flags.adopt_module_key_flags(cli)  # --help lists --src, --out, --workers, --shard-size
    app.run(main)
