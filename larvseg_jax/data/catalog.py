"""What each dataset is: kind, vocabulary, splits and converter (SPEC 1.4, 5).

The one description of a dataset, for the paper's datasets and the embedded synthetic world
alike. Vocabularies are read from `classes/` (data files with their provenance), so configs are
built and checked without any data on disk; the records are written by the `data_prep`
converters (or `synthetic.py`) and checked against this table when opened.
"""

import dataclasses
import pathlib
from collections.abc import Sequence

from larvseg_jax.errors import ConfigError, DataError

CLASSES_DIR = pathlib.Path(__file__).parent / "classes"
KINDS = ("seg", "weak", "single", "eval")
TRAIN_KINDS = ("seg", "weak", "single")
SUPERVISED_KINDS = ("seg",)  # pixel labels; their classes are "base" in evaluation

# The synthetic world's vocabularies (larvseg_jax/data/synthetic.py draws these classes).
SYNTHETIC_BASE = ("sky", "grass", "water", "road", "wall", "sand")
SYNTHETIC_NOVEL = ("boat", "car", "tent", "flower")


@dataclasses.dataclass(frozen=True)
class Dataset:
    """One source of records.

    Attributes:
      name: the paper's code (c171, wa150, a150, ...) or a synthetic source (syn_*).
      kind: "seg" (pixel labels) | "weak" (multi-label: image-level labels from a full mask) |
        "single" (one class per image, ImageNet-like) | "eval" (fully labelled test images).
      class_names: the local vocabulary; label id i means class_names[i].
      split: the split training or evaluation reads.
      converter: the command that writes its records (synthetic sources are generated on
        the fly).
      frequency_source: for evaluation sets, the training source whose per-class image counts
        (written by the converter) bin the classes into frequency buckets.
    """

    name: str
    kind: str
    class_names: tuple[str, ...]
    split: str = "train"
    converter: str = ""
    frequency_source: str = ""

    @property
    def synthetic(self) -> bool:
        return self.name.startswith("syn_")


def check_names(names: Sequence[str], where: str, *, allow_duplicates: bool = False) -> None:
    """Refuses an empty class list, a blank name and (unless allowed) a name given twice.

    Raises:
      DataError naming `where` (a file or a source) and the offending entries (1-based).
    """
    if not names:
        raise DataError(f"{where}: the class list is empty; give one class name per line")
    blank = [i + 1 for i, n in enumerate(names) if not str(n).strip()]
    if blank:
        raise DataError(f"{where}: class {blank[0]} of {len(names)} has an empty name")
    if allow_duplicates:
        return
    first: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in first:
            raise DataError(
                f"{where}: classes {first[name] + 1} and {i + 1} are both named {name!r}; class "
                "names must be unique (one output row each): rename or drop one"
            )
        first[name] = i


# Lists in which two class ids may carry the same name: ImageNet-21K synsets whose first lemma
# coincides (the official code matches by name, so they share a row; SPEC 5.2).
DUPLICATE_NAMES_OK = ("i11k.txt",)


def _columns(classes_file: str) -> list[list[str]]:
    """Tab-separated columns of a classes/ file (or of any path given absolute)."""
    return [line.split("\t") for line in (CLASSES_DIR / classes_file).read_text().splitlines()]


def read_names(classes_file: str, naming: str = "plain") -> tuple[str, ...]:
    """Names of a classes/ file in label-id order; "c171_v1" cuts each at its first "-"."""
    # "<wnid>\t<name>" for ImageNet subsets, "<COCO id>\t<name>" for COCO-Stuff.
    names = [cols[-1] for cols in _columns(classes_file)]
    where = f"classes file {CLASSES_DIR / classes_file}"
    check_names(names, where, allow_duplicates=classes_file in DUPLICATE_NAMES_OK)
    if naming == "c171_v1":  # paper-time V1 names (SPEC 1.4)
        names = [n.split("-")[0] for n in names]
    return tuple(names)


def read_columns(classes_file: str) -> list[list[str]]:
    """Every line of a classes/ file split at tabs."""
    return _columns(classes_file)


def read_keys(classes_file: str) -> tuple[str, ...]:
    """The first column of a two-column classes/ file: ImageNet wnids or COCO category ids."""
    return tuple(cols[0] for cols in _columns(classes_file))


_COCO = "python -m data_prep.coco_stuff"
_ADE = "python -m data_prep.ade20k"
_ADE_FULL = "python -m data_prep.ade20k_full"
_IMAGENET = "python -m data_prep.imagenet"
_VAL = "validation"
_A150 = read_names("a150.txt")
_A847 = read_names("a847.txt")
_SYN_ALL = SYNTHETIC_BASE + SYNTHETIC_NOVEL
DATASETS = {
    d.name: d
    for d in (
        # COCO-Stuff-164k: train (and its validation split, written beside it).
        Dataset("c171", "seg", read_names("c171.txt", "c171_v1"), converter=_COCO),
        Dataset("wa150", "weak", _A150, converter=_ADE),
        Dataset("a150", "eval", _A150, split=_VAL, converter=_ADE, frequency_source="wa150"),
        # ADE train with its pixel labels: the supervised upper bounds of Table 3.
        Dataset("a150_seg", "seg", _A150, converter=_ADE),
        Dataset("a847_seg", "seg", _A847, converter=_ADE_FULL),
        Dataset("wa847", "weak", _A847, converter=_ADE_FULL),
        Dataset("a847", "eval", _A847, split=_VAL, converter=_ADE_FULL, frequency_source="wa847"),
        Dataset("i124", "single", read_names("i124.txt"), converter=_IMAGENET),
        Dataset("i585", "single", read_names("i585.txt"), converter=_IMAGENET),
        Dataset("i11k", "single", read_names("i11k.txt"), converter=_IMAGENET),
        # A847 validation restricted to the 585 ImageNet-overlapping classes (the 21K model's
        # test set, SPEC 8); other classes are ignore.
        Dataset(
            "a585",
            "eval",
            read_names("i585.txt"),
            split=_VAL,
            converter=_ADE_FULL,
            frequency_source="wa847",
        ),
        Dataset("syn_seg", "seg", SYNTHETIC_BASE),
        Dataset("syn_weak", "weak", _SYN_ALL),
        Dataset("syn_single", "single", SYNTHETIC_NOVEL),
        Dataset("syn_eval", "eval", _SYN_ALL, split=_VAL, frequency_source="syn_weak"),
    )
}


def get(name: str, key: str = "dataset") -> Dataset:
    """The catalog entry of `name`; a ConfigError naming `key` if there is none."""
    if name not in DATASETS:
        raise ConfigError(f"config {key}: unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return DATASETS[name]


def class_names(name: str) -> tuple[str, ...]:
    return get(name).class_names
