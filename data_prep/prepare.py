"""Converts every downloaded dataset of the paper in one command (SPEC 5).

    python -m data_prep.prepare --out /data/larvseg --coco /data/coco_stuff164k
        --ade /data/ADEChallengeData2016 --ade-full /data/ade20k_full --imagenet /data/imagenet21k

Runs the converters of the datasets given (any subset of the four), each over all cores with a
progress line and ETA. Re-running skips what is complete and resumes what was interrupted, shard
by shard; the end prints, per source, the images written and the files rejected by reason (each
named in <source>/rejects.tsv), and writes the same as <out>/prepare_summary.json.

Sources written: --coco: c171 (train + validation); --ade: wa150, a150_seg, a150; --ade-full:
wa847, a847_seg, a847, a585; --imagenet: i124, i585, i11k (--imagenet-subsets to choose).
"""

import dataclasses
import json
import os
import sys

from absl import app, flags

from data_prep import ade20k, ade20k_full, cli, coco_stuff, imagenet

flags.DEFINE_string("coco", None, "COCO-Stuff-164k folder (images/, annotations/).")
flags.DEFINE_string("ade", None, "ADEChallengeData2016 folder (images/, annotations/).")
flags.DEFINE_string("ade-full", None, "ADE20K-Full folder ({train,val}/{image,label}).")
flags.DEFINE_string("imagenet", None, "ImageNet-21K folder of <wnid>/ synset folders.")
flags.DEFINE_list("imagenet-subsets", list(imagenet.SUBSETS), "ImageNet subsets to write.")

FLAGS = flags.FLAGS
DATASETS = {  # flag -> converter jobs(src)
    "coco": coco_stuff.jobs,
    "ade": ade20k.jobs,
    "ade-full": ade20k_full.jobs,
    "imagenet": lambda src: imagenet.jobs(src, subsets=FLAGS["imagenet-subsets"].value),
}


def make_jobs() -> list:
    given = {flag: FLAGS[flag].value for flag in DATASETS if FLAGS[flag].value}
    if not given:
        sys.exit("name at least one dataset: --coco, --ade, --ade-full, --imagenet (see --help)")
    return [job for flag, src in given.items() for job in DATASETS[flag](src)]


def main(argv):
    del argv
    summaries = cli.run(make_jobs)
    path = os.path.join(FLAGS.out, "prepare_summary.json")
    with open(path, "w") as f:
        json.dump([dataclasses.asdict(s) for s in summaries], f, indent=1)
    print(f"summary written to {path}")


if __name__ == "__main__":
    flags.adopt_module_key_flags(cli)  # --help lists --out, --workers, --shard-size
    app.run(main)
