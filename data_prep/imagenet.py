"""ImageNet-21K subsets -> sources i124, i585 and i11k (image-level labels), SPEC 5.4.

    python -m data_prep.imagenet --src /data/imagenet21k --out /data/larvseg [--subsets i124,i585]

Layout: one folder per synset, <root>/<wnid>/*.JPEG, as fall11_whole and winter21_whole unpack
(winter21 ships one <wnid>.tar per synset: unpack each into its <wnid>/ folder first). --src may
be the folder of synset folders or its parent holding fall11_whole/ or winter21_whole/.
The synsets of each subset are the shipped lists (classes/i124.txt, i585.txt, i11k.txt: wnid and
name); an image's label is its synset's position in that list, for the whole image.

Difference from the official code: it reads CAM pseudo-masks (annotations_cam_new/, not
published) only to choose crops that no single region dominates and to skip images without a CAM
file; the label itself is the whole-image class either way. Without CAMs, every image of a synset
is used and the crop is a plain random crop (SPEC 5.4).

A synset that is missing is reported, not fatal; so is one with fewer images than its subset
expects: I11K took the synsets with more than 500 images; I124 and I585 state no minimum.
"""

import functools
import os

from absl import app

from data_prep import cli, convert, images
from larvseg_jax.data import catalog
from larvseg_jax.errors import MissingError

SUBSETS = ("i124", "i585", "i11k")
MIN_IMAGES = {"i124": 1, "i585": 1, "i11k": 501}
PAPER_IMAGES = {"i124": "174K", "i585": "739K", "i11k": "about 11M"}
LAYOUT_DIRS = ("", "fall11_whole", "winter21_whole")


def make_example(item: convert.Item) -> dict:
    image, _, note = images.read_rgb(item.image)
    return {"image": image, "image_id": item.image_id, "class_id": item.class_id, "note": note}


def find_root(src: str, wnids) -> str:
    """The folder of synset folders: src or its fall11_whole/ or winter21_whole/ child."""
    for sub in LAYOUT_DIRS:
        root = os.path.join(src, sub)
        if os.path.isdir(root) and any(os.path.isdir(os.path.join(root, w)) for w in wnids):
            return root
    raise MissingError(
        f"{src} holds none of the expected synset folders (e.g. {wnids[0]}/): --src should be "
        "the folder of <wnid>/ folders of ImageNet-21K (fall11_whole or winter21_whole), or its "
        "parent"
    )


def _first(names: list[str], n: int = 10) -> str:
    return ", ".join(names[:n]) + (" ..." if len(names) > n else "")


def _listing(subset: str, root: str):
    wnids = catalog.read_keys(f"{subset}.txt")
    items, rejects, missing, few = [], [], [], []
    for class_id, wnid in enumerate(wnids):
        folder = os.path.join(root, wnid)
        if not os.path.isdir(folder):
            missing.append(wnid)
            continue
        names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
        count = 0
        for name in names:
            path = os.path.join(folder, name)
            if not images.is_image_name(name):
                rejects.append(
                    ("train", images.Reject("not an image", path, "not an image file name"))
                )
                continue
            items.append(convert.Item(os.path.splitext(name)[0], path, class_id=class_id))
            count += 1
        if count < MIN_IMAGES[subset]:
            few.append(f"{wnid} ({count})")
    notes = [
        f"{len(wnids) - len(missing)} of {len(wnids)} synsets found (the paper used {PAPER_IMAGES[subset]} images)"
    ]
    reports = {}
    if missing:
        reports["synsets_missing.txt"] = "".join(f"{w}\n" for w in missing)
        notes.append(f"{len(missing)} synsets missing: {_first(missing)} (synsets_missing.txt)")
    if few:
        reports["synsets_with_few_images.txt"] = "".join(f"{w}\n" for w in few)
        notes.append(
            f"{len(few)} synsets with fewer than {MIN_IMAGES[subset]} images: {_first(few)} "
            "(synsets_with_few_images.txt)"
        )
    return items, rejects, notes, reports


def jobs(src: str, subsets=SUBSETS) -> list[convert.SourceJob]:
    unknown = [s for s in subsets if s not in SUBSETS]
    if unknown:
        raise MissingError(f"--subsets: unknown {unknown}; choose from {', '.join(SUBSETS)}")
    root = find_root(src, [w for s in subsets for w in catalog.read_keys(f"{s}.txt")[:50]])
    out = []
    for subset in subsets:
        items, rejects, notes, reports = _listing(subset, root)
        out.append(
            convert.SourceJob(
                subset,
                {"train": items},
                functools.partial(make_example),
                listing_rejects=rejects,
                notes=notes,
                reports=reports,
            )
        )
    return out


def main(argv):
    del argv
    subsets = [s for s in cli.FLAGS.subsets if s]
    cli.run_converter(functools.partial(jobs, subsets=subsets))


if __name__ == "__main__":
    cli.define_src_flag("the folder of ImageNet-21K synset folders (or its parent)")
    cli.flags.DEFINE_list("subsets", list(SUBSETS), "Subsets to write: i124, i585, i11k.")
    cli.flags.adopt_module_key_flags(cli)  # --help lists --src, --out, --workers, --shard-size
    app.run(main)
