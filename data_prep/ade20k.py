"""ADEChallengeData2016 -> ArrayRecord sources wa150 / a150_seg (training) and a150 (validation).

SPEC 5.1: labels are PNGs with 0 = "other" and k = class k; mmseg's reduce_zero_label maps
0 -> 255 (ignore) and k -> k - 1, giving ids 0..149. The converter applies it once, so the
records hold the 150-class ids with ignore 255. JPEGs are stored as they are (no re-encoding).

    python -m data_prep.ade20k --ade_dir /data/ADEChallengeData2016 --data_dir /data/larvseg
"""

import io
import os
from collections.abc import Iterator, Sequence

import numpy as np
from absl import app, flags, logging
from PIL import Image

from larvseg_jax.data import catalog, sources

# source -> (kind, ADE subdirectory, split written)
OUTPUTS = {
    "wa150": ("weak", "training", "train"),
    "a150_seg": ("seg", "training", "train"),
    "a150": ("eval", "validation", "validation"),
}


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """uint8 ADE label (0 = other) -> 0..149 with 255 = ignore (mmseg reduce_zero_label)."""
    out = label.astype(np.int32) - 1
    out[label == 0] = 255
    return out.astype(np.uint8)


def _examples(ade_dir: str, subdir: str) -> Iterator[dict]:
    image_dir = os.path.join(ade_dir, "images", subdir)
    label_dir = os.path.join(ade_dir, "annotations", subdir)
    names = sorted(f for f in os.listdir(image_dir) if f.endswith(".jpg"))
    if not names:
        raise FileNotFoundError(f"no .jpg images in {image_dir}: is --ade_dir the ADE root?")
    for name in names:
        stem = name[: -len(".jpg")]
        label_path = os.path.join(label_dir, stem + ".png")
        if not os.path.exists(label_path):
            raise FileNotFoundError(f"{label_path} is missing (annotation of {name})")
        label = np.asarray(Image.open(label_path))
        if label.ndim != 2 or label.max() > 150:
            raise ValueError(f"{label_path}: expected a 1-channel PNG with ids 0..150")
        buf = io.BytesIO()
        Image.fromarray(reduce_zero_label(label)).save(buf, format="PNG")
        yield {
            "image": os.path.join(image_dir, name),
            "label": buf.getvalue(),
            "image_id": stem,
        }


def convert(ade_dir: str, data_dir: str, names: Sequence[str] = ("wa150", "a150")) -> None:
    """Writes the requested sources (keys of OUTPUTS) under data_dir."""
    for name in names:
        if name not in OUTPUTS:
            raise ValueError(f"unknown ADE output {name!r}; known: {sorted(OUTPUTS)}")
        kind, subdir, split = OUTPUTS[name]
        path = sources.write_source(
            data_dir,
            name,
            kind=kind,
            class_names=catalog.class_names("a150"),
            split_examples={split: lambda subdir=subdir: _examples(ade_dir, subdir)},
            image_format="jpeg",
        )
        logging.info("wrote %s (%s, %s) to %s", name, kind, split, path)


FLAGS = flags.FLAGS
flags.DEFINE_string("ade_dir", None, "ADEChallengeData2016 root (images/, annotations/).")
flags.DEFINE_string("data_dir", None, "Data root the trainer reads (config data.dir).")
flags.DEFINE_list("sources", ["wa150", "a150"], "Outputs to write: wa150, a150_seg, a150.")


def main(argv):
    del argv
    convert(FLAGS.ade_dir, FLAGS.data_dir, FLAGS.sources)


if __name__ == "__main__":
    flags.mark_flags_as_required(["ade_dir", "data_dir"])
    app.run(main)
