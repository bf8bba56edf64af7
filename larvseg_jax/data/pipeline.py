"""Training and evaluation input pipelines: sources mixed into the fixed group layout (SPEC 3, 4).

A step has G groups (virtual devices) of B images; group g holds the one source
`group_sources[g]`. Each source is read as an endless stream of per-epoch seeded permutations
(uniform sampling without replacement, like mmseg's DistributedSampler with drop_last): step t
takes the next n_s = (#groups of s) * B positions of the epoch t // (N_s // n_s), and the groups
of s split them in order, so groups sharing a source get disjoint samples. A process builds only
the rows of its `local_groups`; the others are never decoded.

Multiprocessing (cfg.data.num_workers > 0) uses grain's mp_prefetch: workers are spawned, so the
caller must run under `if __name__ == "__main__":`, and absl flags must be parsed (run under
`absl.app.run`, or call `absl.flags.FLAGS.mark_as_parsed()` first).
"""

import dataclasses
from collections.abc import Sequence

import grain
import numpy as np

from larvseg_jax.data import sources, transforms
from larvseg_jax.data.transforms import MEAN, STD
from larvseg_jax.errors import ConfigError, DataError
from larvseg_jax.vocab import IGNORE

__all__ = [
    "IGNORE",
    "MEAN",
    "STD",
    "StreamSpec",
    "make_eval_dataset",
    "make_train_iterator",
]

_STEPS = 2**62  # the step stream is endless; training stops by step count


def _source_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _example_stream(
    records: sources.Records,
    *,
    crop: int,
    scale_range: tuple[float, float],
    cat_max_ratio: float,
    photometric: bool,
    seed: int,
) -> grain.MapDataset:
    """Endless augmented examples of one source; element p is position p of the epoch stream."""
    # SPEC 4: (2048, 512) for 512 crops; ImageNet-like sources use (320, 320) for 320 crops.
    dataset = records.dataset
    img_scale = (crop, crop) if dataset.kind == "single" else (4 * crop, crop)
    return (
        grain.MapDataset.source(records.source)
        .seed(seed)
        .shuffle()
        .repeat()  # re-shuffled every epoch
        .map(_decode(records))
        .random_map(transforms.RandomRescale(img_scale, scale_range))
        .random_map(transforms.RandomCrop(crop, cat_max_ratio))
        .random_map(transforms.RandomFlip(0.5))
        .random_map(transforms.PhotoMetricDistortion(photometric))
        .map(transforms.Normalize())
        .map(transforms.Pad(crop))
        .map(transforms.FillSingleLabel())
        .map(transforms.TrainOutput())
    )


def stream_position(step: int, per_step: int, size: int) -> int:
    """First stream position a step reads from a source of `size` examples taking `per_step`.

    Epoch e covers positions [e * size, (e + 1) * size) (one permutation of the source); a step
    never straddles two epochs (the last size % per_step of each epoch are dropped).
    """
    epoch, within = divmod(step, size // per_step)
    return epoch * size + within * per_step


class AssembleStep(grain.transforms.Map):
    """Step index -> {source: {"image": [G_local, B, c, c, 3], "label": [G_local, B, c, c]}}."""

    def __init__(
        self,
        streams: dict[str, grain.MapDataset],
        sizes: dict[str, int],
        crops: dict[str, int],
        rows: list[tuple[str, int]],
        per_step: dict[str, int],
        images_per_group: int,
    ):
        self.streams = streams  # source -> endless example stream
        self.sizes = sizes  # source -> N_s examples per epoch
        self.crops = crops
        self.rows = rows  # per local group: (source, first row of the step's n_s positions)
        self.per_step = per_step  # source -> n_s
        self.images_per_group = images_per_group

    def map(self, step: int) -> dict:
        step = int(step)
        b_size, g_local = self.images_per_group, len(self.rows)
        batch = {}
        for name, crop in self.crops.items():
            batch[name] = {
                "image": np.zeros((g_local, b_size, crop, crop, 3), np.float32),
                "label": np.full((g_local, b_size, crop, crop), IGNORE, np.int32),
            }
        for j, (name, first) in enumerate(self.rows):
            start = stream_position(step, self.per_step[name], self.sizes[name]) + first
            for b in range(b_size):
                ex = self.streams[name][start + b]
                batch[name]["image"][j, b] = ex["image"]
                batch[name]["label"][j, b] = ex["label"]
        return batch


@dataclasses.dataclass(frozen=True)
class StreamSpec:
    """How one training source is read: its crop and random rescale range (SPEC 4)."""

    name: str
    crop: int
    scale_range: tuple[float, float] = (0.5, 2.0)


def _decode(records: sources.Records) -> transforms.Decode:
    dataset = records.dataset
    return transforms.Decode(dataset.name, len(dataset.class_names), records.ignore_codes)


def make_train_iterator(
    streams: Sequence[StreamSpec],
    *,
    data_dir: str,
    group_sources: Sequence[str],
    local_groups: Sequence[int],
    images_per_group: int,
    seed: int,
    cat_max_ratio: float = 0.75,
    photometric: bool = True,
    num_workers: int = 0,
    prefetch: int = 2,
) -> grain.DatasetIterator:
    """Endless, checkpointable iterator of this process's host batches.

    Args:
      streams: every training source, in config order (its index seeds its stream).
      data_dir: the data root.
      group_sources: [G] source of every global group (larvseg_jax.groups.group_sources).
      local_groups: global indices of the groups this process feeds, in row order.
      images_per_group: B.
      seed: data seed (order and augmentation); the stream is a pure function of it.
      cat_max_ratio, photometric: RandomCrop's re-draw rule and PhotoMetricDistortion on/off.
      num_workers: grain worker processes (0 = in-process); prefetch: host batches read ahead.
    Returns:
      A grain DatasetIterator (get_state/set_state) yielding, for every stream,
      {"image": float32 [G_local, B, c_s, c_s, 3], "label": int32 [G_local, B, c_s, c_s]};
      rows of groups that hold another source are 0 (image) and IGNORE (label).
    """
    names = [s.name for s in streams]
    unknown = sorted(set(group_sources) - set(names))
    if unknown:
        raise ValueError(f"group_sources name {unknown} not among the streams {names}")
    b_size = int(images_per_group)
    examples, sizes, per_step = {}, {}, {}
    crops = {s.name: int(s.crop) for s in streams}
    for i, spec in enumerate(streams):
        groups_of = [g for g, s in enumerate(group_sources) if s == spec.name]
        if not groups_of:
            continue
        records = sources.open_source(spec.name, data_dir, "train")
        if records.dataset.kind == "eval":
            raise ConfigError(f"source {spec.name!r} is an evaluation set and cannot be trained on")
        per_step[spec.name] = len(groups_of) * b_size
        if len(records) < per_step[spec.name]:
            raise DataError(
                f"source {spec.name!r} has {len(records)} examples but a step takes "
                f"{per_step[spec.name]} ({len(groups_of)} groups x {b_size})"
            )
        sizes[spec.name] = len(records)
        examples[spec.name] = _example_stream(
            records,
            crop=crops[spec.name],
            scale_range=tuple(spec.scale_range),
            cat_max_ratio=float(cat_max_ratio),
            photometric=bool(photometric),
            seed=_source_seed(seed, i),
        )
    rows = []
    for g in local_groups:
        name = group_sources[g]
        rank = [h for h, s in enumerate(group_sources) if s == name].index(g)
        rows.append((name, rank * b_size))
    assemble = AssembleStep(examples, sizes, crops, rows, per_step, b_size)
    # grain's default read-ahead (16 threads x 500 elements) would assemble hundreds of steps.
    read = grain.ReadOptions(num_threads=2, prefetch_buffer_size=max(int(prefetch), 1))
    ds = grain.MapDataset.range(_STEPS).map(assemble).to_iter_dataset(read)
    if int(num_workers) > 0:
        ds = ds.mp_prefetch(
            grain.MultiprocessingOptions(
                num_workers=int(num_workers), per_worker_buffer_size=max(int(prefetch), 1)
            )
        )
    return iter(ds)


def make_eval_dataset(
    source: str, *, data_dir: str, short_side: int, max_images: int = -1
) -> grain.MapDataset:
    """The evaluation split of `source`, lazily decoded (SPEC 7.1).

    Args:
      source: e.g. "syn_eval" or "a150"; its catalog split ("validation"), else its first.
      data_dir: the data root.
      short_side: test resize (long side capped at 4 * short_side).
      max_images: keep the first max_images records (-1 = all).
    Returns:
      A grain MapDataset (len() and iteration) of {"image": float32 [H, W, 3] normalised,
      "label": int32 [H0, W0] original-size ground truth with IGNORE, "raw": uint8 [H0, W0, 3],
      "id": str}.
    """
    records = sources.open_source(source, data_dir)
    ds = grain.MapDataset.source(records.source)
    if max_images >= 0:
        ds = ds[:max_images]
    return ds.map(_decode(records)).map(transforms.EvalResize(short_side))
