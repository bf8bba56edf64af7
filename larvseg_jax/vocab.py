"""Union vocabulary, per-source index lists and the base/novel split (SPEC 1.4, 5.2, 5.3).

Classes are matched by name string: a name shared by two sources is one row of the class
embedding table, trained by both. A source only ever sees its own classes in the softmax.
"""

from collections.abc import Sequence

import numpy as np


def c171_v1_names(raw_names: Sequence[str]) -> list[str]:
    """Paper-time (V1) C171 names: each raw COCO-Stuff name cut at its first "-" (SPEC 1.4)."""
    return [name.split("-")[0] for name in raw_names]


def build_union(name_lists: Sequence[Sequence[str]]) -> tuple[str, ...]:
    """Union of several vocabularies, in order of first occurrence (a fixed, reproducible order)."""
    seen: dict[str, None] = {}
    for names in name_lists:
        for name in names:
            seen.setdefault(name, None)
    return tuple(seen)


def class_index(union: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """Rows of the union table for a source's classes ([N] int32; duplicates share a row)."""
    position = {name: i for i, name in enumerate(union)}
    missing = [n for n in names if n not in position]
    if missing:
        raise ValueError(f"classes {missing[:5]} are not in the union vocabulary")
    return np.asarray([position[n] for n in names], np.int32)


def base_novel_split(
    eval_names: Sequence[str], supervised_names: Sequence[str]
) -> tuple[list[str], list[str]]:
    """Base = evaluation classes that receive pixel labels (same name as a supervised class).

    This is the paper-time "rule 2" of SPEC 5.3 (58/92 on A150 with V1 C171 names).
    """
    supervised = set(supervised_names)
    base = [n for n in eval_names if n in supervised]
    novel = [n for n in eval_names if n not in supervised]
    return base, novel
