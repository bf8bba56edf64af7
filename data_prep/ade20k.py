"""ADE20K-150 (ADEChallengeData2016) -> sources wa150 and a150_seg (train) and a150 (validation).

    python -m data_prep.ade20k --src /data/ADEChallengeData2016 --out /data/larvseg

Layout (the SceneParsing download): images/{training,validation}/*.jpg and
annotations/{training,validation}/*.png, uint8 labels with 0 = "other" and k = class k.
SPEC 5.1: mmseg's reduce_zero_label maps 0 -> 255 (ignore) and k -> k - 1, giving ids 0..149; the
converter applies it once, so the records hold the 150-class ids with ignore 255. The training
images are written once and serve both as weak data (wa150, image-level labels) and as the
supervised upper bound's pixel labels (a150_seg, hard links to the same shards).
"""

import os

import numpy as np
from absl import app

from data_prep import cli, convert, images
from larvseg_jax.errors import MissingError

VALID = np.ones(151, bool)  # stored values 0..150 (0 = other)
SPLITS = {"training": "train", "validation": "validation"}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """uint8 ADE label (0 = other) -> 0..149 with 255 = ignore (mmseg reduce_zero_label)."""
    out = label.astype(np.int32) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)


def make_example(item: convert.Item) -> dict:
    image, size, note = images.read_rgb(item.image)
    label = images.read_label(item.label)
    images.check_label(label, size, item.label, VALID)
    return {
        "image": image,
        "image_id": item.image_id,
        "label": reduce_zero_label(label),
        "note": note,
    }


def find_root(src: str) -> str:
    """The ADEChallengeData2016 folder: `src` itself or its child of that name."""
    for root in (src, os.path.join(src, "ADEChallengeData2016")):
        if os.path.isdir(os.path.join(root, "images")):
            return root
    raise MissingError(
        f"{src} holds no images/ folder: --src should be the ADEChallengeData2016 folder "
        "(images/ and annotations/, from the ADE20K SceneParsing download)"
    )


def jobs(src: str) -> list[convert.SourceJob]:
    root = find_root(src)
    listed = {}
    for subdir, split in SPLITS.items():
        image_dir, label_dir = convert.mmseg_dirs(root, subdir, "ADE20K")
        listed[split] = convert.list_pairs(split, image_dir, label_dir, ".png")
    train, train_rejects = listed["train"]
    val, val_rejects = listed["validation"]
    return [
        convert.SourceJob(
            "wa150",
            {"train": train},
            make_example,
            listing_rejects=train_rejects,
            aliases=(("a150_seg", "seg"),),
        ),
        convert.SourceJob("a150", {"validation": val}, make_example, listing_rejects=val_rejects),
    ]


def main(argv):
    del argv
    cli.run_converter(jobs)


if __name__ == "__main__":
    cli.define_src_flag("the ADEChallengeData2016 folder (images/, annotations/)")
    cli.flags.adopt_module_key_flags(cli)  # --help lists --src, --out, --workers, --shard-size
    app.run(main)
