"""The evaluation images an analysis reads and the category sets it reports (SPEC 5.3, 7.1).

Images are read exactly as evaluation reads them (`pipeline.make_eval_dataset`: the config's
test resize for the network, labels at the original size), and base / novel are named as the
evaluation report names them (`experiment.build_vocabulary`: base = evaluation classes that
receive pixel labels in training), so an analysis speaks of the same images and classes as the
model's `eval/step_<N>.json`.
"""

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import ml_collections

from larvseg_jax import experiment
from larvseg_jax.data import catalog, pipeline
from larvseg_jax.errors import ConfigError, MissingError
from larvseg_jax.inference import ImageError, Predictor, read_rgb

CATEGORY_SETS = ("novel", "base", "all")


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """An evaluation set as the model's config reads it.

    Attributes:
      name: the catalog name (syn_eval, a150, ...).
      class_names: the set's vocabulary; label id i means class_names[i].
      base, novel: the split of class_names the evaluation report uses.
      dataset: grain MapDataset of {"image" float32 [H, W, 3] resized and normalised, "label"
        int32 [H0, W0] (ignore -1), "raw" uint8 [H0, W0, 3], "id" str}.
    """

    name: str
    class_names: tuple[str, ...]
    base: tuple[str, ...]
    novel: tuple[str, ...]
    dataset: Any

    def __len__(self) -> int:
        return len(self.dataset)

    def categories(self, which: str, flag: str = "--categories") -> tuple[str, ...]:
        """The class names of a category set: novel, base or all."""
        if which not in CATEGORY_SETS:
            raise ConfigError(f"{flag} {which!r}: unknown category set; use novel, base or all")
        return {"novel": self.novel, "base": self.base, "all": self.class_names}[which]

    def class_ids(self, names: Sequence[str], flag: str) -> list[int]:
        """Ids of class names of this set; a ConfigError naming `flag` for one it lacks."""
        position = {n: i for i, n in enumerate(self.class_names)}
        unknown = [n for n in names if n not in position]
        if unknown:
            raise ConfigError(
                f"{flag}: {unknown[0]!r} is not a class of {self.name} "
                f"({', '.join(self.class_names[:12])}{', ...' if len(self.class_names) > 12 else ''})"
            )
        return [position[n] for n in names]


def open_eval_set(
    predictor: Predictor,
    dataset: str | None = None,
    *,
    data_dir: str | None = None,
    limit: int = -1,
) -> EvalSet:
    """The evaluation set `dataset` (default: the model's) read with the model's test resize.

    Raises:
      ConfigError for an unknown or non-evaluation --dataset, MissingError when its records are
      not on disk (the synthetic world is generated, once, as training does).
    """
    cfg = ml_collections.ConfigDict(predictor.cfg.to_dict())
    name = dataset or cfg.data.eval_source
    eval_sets = [n for n, d in catalog.DATASETS.items() if d.kind == "eval"]
    if name not in catalog.DATASETS or catalog.DATASETS[name].kind != "eval":
        raise ConfigError(
            f"--dataset {name!r}: not an evaluation set; use one of {', '.join(eval_sets)}"
        )
    cfg.data.eval_source = name
    if data_dir:
        if not os.path.isdir(data_dir):
            raise MissingError(f"--data_dir {data_dir!r}: no such folder")
        cfg.data.dir = data_dir
    elif not catalog.get(name).synthetic and not cfg.data.dir:
        raise ConfigError(
            f"--dataset {name}: give --data_dir, the folder holding larvseg_records/ "
            "(data_prep/ writes it)"
        )
    root = experiment.prepare_data(cfg)  # the synthetic world is generated here if missing
    voc = experiment.build_vocabulary(cfg)
    images = pipeline.make_eval_dataset(
        name, data_dir=root, short_side=int(cfg.eval.short_side), max_images=limit
    )
    if not len(images):
        raise ConfigError(f"--limit {limit}: no images of {name} left to analyse")
    return EvalSet(name, tuple(voc.eval_names), voc.base, voc.novel, images)


def pick_images(predictor: Predictor, evalset: EvalSet, entries: Sequence[str]) -> list[dict]:
    """--images entries as examples: an index into the set, an image id of it, or an image file
    (read as `segment` reads it; "label" is None, there is no ground truth).

    Raises:
      ConfigError for an entry that is none of these or a file that is not a readable image.
    """
    picked, ids = [], None
    for entry in entries:
        if os.path.isfile(entry):
            try:
                rgb = read_rgb(entry)
            except ImageError as e:
                raise ConfigError(f"--images {entry}: {e}") from None
            stem = os.path.splitext(os.path.basename(entry))[0]
            # The network input `segment` uses; "label" None: there is no ground truth.
            picked.append(
                {"image": predictor.network_input(rgb), "label": None, "raw": rgb, "id": stem}
            )
        elif entry.isdigit() and int(entry) < len(evalset):
            picked.append(evalset.dataset[int(entry)])
        else:
            if ids is None:
                ids = {ex["id"]: i for i, ex in enumerate(evalset.dataset)}
            if entry not in ids:
                raise ConfigError(
                    f"--images {entry!r}: not an image file, an index into {evalset.name} "
                    f"(0..{len(evalset) - 1}) or an image id of it"
                )
            picked.append(evalset.dataset[ids[entry]])
    return picked
