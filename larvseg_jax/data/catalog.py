"""What each real dataset of the paper is: kind, vocabulary and label encoding (SPEC 1.4, 5).

The vocabularies are read from `classes/` (data files with their provenance), so configs can be
built and checked without the datasets on disk; the records themselves are written by the
`data_prep` converters.
"""

import dataclasses
import functools
import pathlib

CLASSES_DIR = pathlib.Path(__file__).parent / "classes"


@dataclasses.dataclass(frozen=True)
class DatasetCard:
    name: str  # the paper's code: c171, wa150, a150, ...
    kind: str  # "seg" (pixel labels) | "weak" (multi-label) | "single" (ImageNet) | "eval"
    classes_file: str  # file in classes/
    naming: str = "plain"  # "c171_v1": cut each name at its first "-" (paper-time V1, SPEC 1.4)
    splits: tuple[str, ...] = ("train",)


CARDS = {
    card.name: card
    for card in (
        DatasetCard("c171", "seg", "c171.txt", naming="c171_v1"),
        DatasetCard("wa150", "weak", "a150.txt"),
        DatasetCard("a150", "eval", "a150.txt", splits=("validation",)),
        # ADE train with its pixel labels: the supervised upper bounds of Table 3.
        DatasetCard("a150_seg", "seg", "a150.txt"),
        DatasetCard("a847_seg", "seg", "a847.txt"),
        DatasetCard("wa847", "weak", "a847.txt"),
        DatasetCard("a847", "eval", "a847.txt", splits=("validation",)),
        DatasetCard("i124", "single", "i124.txt"),
        DatasetCard("i585", "single", "i585.txt"),
        DatasetCard("i11k", "single", "i11k.txt"),
        # A847 validation restricted to the 585 ImageNet-overlapping classes (the 21K model's
        # test set, SPEC 8); other classes are ignore.
        DatasetCard("a585", "eval", "i585.txt", splits=("validation",)),
    )
}


@functools.cache
def class_names(name: str) -> tuple[str, ...]:
    """The dataset's class names in label-id order, with its naming rule applied."""
    card = CARDS[name]
    lines = (CLASSES_DIR / card.classes_file).read_text().splitlines()
    names = [line.split("\t")[-1] for line in lines]  # "<wnid>\t<name>" for ImageNet subsets
    if card.naming == "c171_v1":
        names = [n.split("-")[0] for n in names]
    return tuple(names)
