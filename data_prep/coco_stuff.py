"""COCO-Stuff-164k -> source c171 (splits train and validation), SPEC 5.1.

    python -m data_prep.coco_stuff --src /data/coco_stuff164k --out /data/larvseg

Layout: images/{train2017,val2017}/*.jpg (COCO 2017) and annotations/{train2017,val2017}/ with
either
- the raw "stuffthingmaps" (stuffthingmaps_trainval2017.zip): uint8 PNG <id>.png with value =
  COCO category id - 1 (0..181) and 255 unlabelled. The 171 used ids map to train ids 0..170 in
  id order (the order of classes/c171.txt, whose first column is the COCO id); the 11 unused ids
  (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91) and 255 become ignore 255, as mmseg's
  tools/dataset_converters/coco_stuff164k.py does;
- or that script's output, <id>_labelTrainIds.png (0..170, 255), read as it is.
The converter says which one it found.
"""

import functools
import os

import numpy as np
from absl import app

from data_prep import cli, convert, images
from larvseg_jax.data import catalog
from larvseg_jax.errors import DataError, MissingError

SPLITS = {"train2017": "train", "val2017": "validation"}
TRAIN_IDS_SUFFIX = "_labelTrainIds.png"


@functools.cache  # built once per process, not per image
def raw_to_train_ids() -> np.ndarray:
    """uint8 [256] lookup: stuffthingmap value (COCO id - 1) -> train id, else 255."""
    lut = np.full(256, 255, np.uint8)
    for train_id, coco_id in enumerate(int(k) for k in catalog.read_keys("c171.txt")):
        lut[coco_id - 1] = train_id
    return lut


@functools.cache  # built once per process, not per image
def _valid(encoding: str) -> np.ndarray:
    valid = np.zeros(256, bool)
    valid[: 182 if encoding == "raw" else 171] = True
    valid[255] = True
    return valid


def make_example(item: convert.Item, encoding: str) -> dict:
    image, size, note = images.read_rgb(item.image)
    label = images.read_label(item.label)
    images.check_label(label, size, item.label, _valid(encoding))
    if encoding == "raw":
        label = raw_to_train_ids()[label]
    return {
        "image": image,
        "image_id": item.image_id,
        "label": label.astype(np.uint8),
        "note": note,
    }


def label_encoding(label_dir: str) -> str:
    """ "train_ids" if the folder holds mmseg's converted *_labelTrainIds.png, else "raw"."""
    names = os.listdir(label_dir)
    return "train_ids" if any(n.endswith(TRAIN_IDS_SUFFIX) for n in names) else "raw"


def jobs(src: str) -> list[convert.SourceJob]:
    root = src
    if not os.path.isdir(os.path.join(root, "images")):
        raise MissingError(
            f"{src} holds no images/ folder: --src should be the coco_stuff164k folder "
            "(images/{train2017,val2017}/ from COCO 2017 and annotations/{train2017,val2017}/ "
            "from stuffthingmaps_trainval2017.zip)"
        )
    splits, rejects, encodings = {}, [], set()
    for subdir, split in SPLITS.items():
        image_dir, label_dir = convert.mmseg_dirs(root, subdir, "COCO-Stuff")
        encoding = label_encoding(label_dir)
        encodings.add(encoding)
        suffix = TRAIN_IDS_SUFFIX if encoding == "train_ids" else ".png"
        items, listing_rejects = convert.list_pairs(split, image_dir, label_dir, suffix)
        splits[split], rejects = items, rejects + listing_rejects
    if len(encodings) > 1:
        raise DataError(
            f"{root}/annotations: train2017 and val2017 hold different label encodings (one "
            f"has *{TRAIN_IDS_SUFFIX}, the other not): convert both or neither"
        )
    (encoding,) = encodings
    note = {
        "raw": "labels: stuffthingmaps (COCO id - 1), mapped to the 171 train ids",
        "train_ids": f"labels: *{TRAIN_IDS_SUFFIX} (already train ids 0..170), read as they are",
    }[encoding]
    return [
        convert.SourceJob(
            "c171",
            splits,
            functools.partial(make_example, encoding=encoding),
            listing_rejects=rejects,
            notes=[note],
        )
    ]


def main(argv):
    del argv
    cli.run_converter(jobs)


if __name__ == "__main__":
    cli.define_src_flag("the coco_stuff164k folder (images/, annotations/)")
    cli.flags.adopt_module_key_flags(cli)  # --help lists --src, --out, --workers, --shard-size
    app.run(main)
