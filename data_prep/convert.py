"""Parallel, resumable conversion of a dataset's files into a LarvSeg-JAX source.

A converter (coco_stuff.py, ade20k.py, ...) lists its inputs as `Item`s and names a picklable
`make_example(item) -> record` function; this module does the rest, the same way for every
dataset:
- items are cut into shards written by a pool of worker processes (all cores by default);
- a shard is written to `<file>.partial` and renamed when complete, then a small done-file records
  its counts, so an interrupted conversion resumes where it stopped and re-running a finished one
  does nothing (the plan, a hash of the item list, decides what "the same conversion" is);
- a file that cannot become a record (`images.Reject`: unreadable, wrong size, unknown label
  values, ...) is counted and named in `rejects.tsv`, never a crash, never silently dropped;
- one progress line per source with rate and ETA, and a summary per source at the end.
"""

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging

from data_prep import images
from data_prep.images import Reject
from larvseg_jax.data import catalog, sources
from larvseg_jax.errors import MissingError
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress, format_seconds

STATE_DIR = ".conversion"  # inside the source folder: plan and per-shard done-files
PLAN_VERSION = 1  # bump when a converter's output changes for the same inputs


@dataclasses.dataclass(frozen=True)
class Item:
    """One input record: an image and its label file, or an image and its class id."""

    image_id: str
    image: str
    label: str = ""
    class_id: int = -1


@dataclasses.dataclass
class SourceJob:
    """How to write one source.

    Attributes:
      name: the catalog name (wa150, a847, i124, ...).
      splits: split -> items, in the order they are written.
      make_example: picklable item -> record (the `sources.write_source` format); raises
        `Reject` for an input that cannot become one.
      label_dtype, image_format: the record encoding (see `sources.features_for`).
      listing_rejects: (split, reject) of inputs refused while listing (a non-image file, an
        image without a label file).
      notes: facts the summary repeats (which label encoding was found, missing synsets, ...).
      reports: file name -> text written into the source folder (e.g. the full list of
        missing ImageNet synsets, which the notes only begin).
      aliases: (name, kind) of sources holding the same records under another kind (ADE's
        training images are both weak wa150 and supervised a150_seg); written as hard links.
      kind, class_names: from the catalog.
    """

    name: str
    splits: dict[str, list[Item]]
    make_example: Callable[[Item], dict]
    label_dtype: str = "uint8"
    image_format: str = "jpeg"
    listing_rejects: list[tuple[str, Reject]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    reports: dict[str, str] = dataclasses.field(default_factory=dict)
    aliases: tuple[tuple[str, str], ...] = ()

    @property
    def kind(self) -> str:
        return catalog.get(self.name).kind

    @property
    def class_names(self) -> tuple[str, ...]:
        return catalog.get(self.name).class_names


@dataclasses.dataclass
class Summary:
    """What a conversion wrote: per split the records, and rejected files by reason."""

    name: str
    written: dict[str, int]
    rejects: dict[str, int]
    notes: list[str]
    seconds: float
    skipped: bool  # already complete: nothing was done
    aliases: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        written = ", ".join(f"{n} {split}" for split, n in self.written.items())
        head = f"{self.name}: {written} images"
        if self.aliases:
            head += f" (also as {', '.join(self.aliases)})"
        head += " (already complete)" if self.skipped else f" in {format_seconds(self.seconds)}"
        out = [head]
        if self.rejects:
            reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.rejects.items()))
            out.append(f"  rejected {sum(self.rejects.values())}: {reasons} (see rejects.tsv)")
        out += [f"  {note}" for note in self.notes]
        return out


# ---- worker side -------------------------------------------------------------------------


_COUNTER = None  # multiprocessing.Value: items processed by all workers (progress)


def _init_worker(counter) -> None:
    global _COUNTER
    _COUNTER = counter


def _tick() -> None:
    if _COUNTER is not None:
        with _COUNTER.get_lock():
            _COUNTER.value += 1


@dataclasses.dataclass(frozen=True)
class _ShardTask:
    directory: str
    split: str
    index: int
    count: int
    items: tuple[Item, ...]
    make_example: Callable[[Item], dict]
    kind: str
    num_classes: int
    label_dtype: str
    image_format: str


def _done_path(directory: str, split: str, index: int) -> str:
    return os.path.join(directory, STATE_DIR, f"{split}-{index:05d}.json")


def write_shard(task: _ShardTask) -> dict:
    """Converts the items of one shard; returns (and records on disk) its counts and rejects."""
    features = sources.features_for(task.kind, task.label_dtype, task.image_format)
    writer = sources.ShardWriter(
        sources.shard_path(task.directory, task.split, task.index, task.count),
        features,
        kind=task.kind,
        num_classes=task.num_classes,
        ignore_codes=sources.default_ignore_codes(task.label_dtype),
    )
    rejects, notes = [], collections.Counter()
    try:
        for item in task.items:
            try:
                example = task.make_example(item)
            except Reject as r:
                rejects.append([r.path, r.reason, r.detail])
            else:
                note = example.pop("note", "")
                if note:
                    notes[note] += 1
                writer.write(example)
            _tick()
    except BaseException:
        writer.abort()
        raise
    writer.close()
    done = {
        "num_records": writer.num_records,
        "counts": writer.counts.tolist(),
        "rejects": rejects,
        "conversions": dict(notes),
    }
    write_json_atomic(_done_path(task.directory, task.split, task.index), done)
    return done


# ---- driver side -------------------------------------------------------------------------


def _plan(job: SourceJob, shard_size: int) -> dict:
    digest = hashlib.sha256()
    for split, items in job.splits.items():
        for item in items:
            digest.update(
                f"{split}\t{item.image_id}\t{item.image}\t{item.label}\t{item.class_id}\n".encode()
            )
    return {
        "version": PLAN_VERSION,
        "name": job.name,
        "shard_size": shard_size,
        "items": digest.hexdigest(),
        "num_items": {split: len(items) for split, items in job.splits.items()},
    }


def _read_json(path: str) -> Any:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _prepare_directory(directory: str, plan: dict) -> None:
    """Keeps the finished shards of the same plan; starts over if the inputs changed."""
    plan_path = os.path.join(directory, STATE_DIR, "plan.json")
    previous = _read_json(plan_path)
    if previous != plan and os.path.exists(directory):
        if previous is not None:
            logging.info(
                "%s: the inputs changed since the last conversion; starting over", directory
            )
        shutil.rmtree(directory)
    os.makedirs(os.path.join(directory, STATE_DIR), exist_ok=True)
    for name in os.listdir(directory):  # a shard cut short by an interruption
        if name.endswith(".partial"):
            os.remove(os.path.join(directory, name))
    write_json_atomic(plan_path, plan)


def _shard_tasks(job: SourceJob, directory: str, shard_size: int) -> list[_ShardTask]:
    tasks = []
    for split, items in job.splits.items():
        count = max(1, -(-len(items) // shard_size))
        for index in range(count):
            tasks.append(
                _ShardTask(
                    directory,
                    split,
                    index,
                    count,
                    tuple(items[index * shard_size : (index + 1) * shard_size]),
                    job.make_example,
                    job.kind,
                    len(job.class_names),
                    job.label_dtype,
                    job.image_format,
                )
            )
    return tasks


def _run_tasks(job: SourceJob, tasks: list[_ShardTask], workers: int) -> list[dict]:
    """Runs the shard tasks not done yet (in a pool when workers > 1) with a progress line."""
    results: dict[tuple[str, int], dict] = {}
    todo = []
    for task in tasks:
        done = _read_json(_done_path(task.directory, task.split, task.index))
        shard = sources.shard_path(task.directory, task.split, task.index, task.count)
        if done is not None and os.path.exists(shard):
            results[(task.split, task.index)] = done
        else:
            todo.append(task)
    total = sum(len(t.items) for t in tasks)
    resumed = total - sum(len(t.items) for t in todo)
    if resumed:
        logging.info("%s: resuming, %d of %d images already converted", job.name, resumed, total)
    progress = Progress(f"{job.name}", total)
    progress.update(resumed)
    if workers <= 1:
        for task in todo:
            results[(task.split, task.index)] = write_shard(task)
            progress.advance(len(task.items))
    elif todo:
        # spawn, not fork: the caller may run JAX threads (a fork would copy their locks).
        context = multiprocessing.get_context("spawn")
        counter = context.Value("q", 0)
        with context.Pool(
            min(workers, len(todo)), initializer=_init_worker, initargs=(counter,)
        ) as pool:
            pending = {(t.split, t.index): pool.apply_async(write_shard, (t,)) for t in todo}
            while pending:
                for key in [k for k, r in pending.items() if r.ready()]:
                    results[key] = pending.pop(key).get()  # re-raises a worker's error
                progress.update(resumed + counter.value)
                time.sleep(0.2)
    progress.update(total)
    progress.close()
    return [results[(t.split, t.index)] for t in tasks]


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported
        shutil.copyfile(src, dst)


def _write_alias(job: SourceJob, directory: str, alias: str, kind: str, out: str, meta: dict):
    alias_dir = sources.source_dir(out, alias)
    if _read_json(os.path.join(alias_dir, "metadata.json")) == meta | {"kind": kind}:
        return
    if os.path.exists(alias_dir):
        shutil.rmtree(alias_dir)
    os.makedirs(alias_dir)
    for name in os.listdir(directory):
        if name.startswith(sources.ROOT + "-"):
            _link_or_copy(os.path.join(directory, name), os.path.join(alias_dir, name))
    shutil.copyfile(os.path.join(directory, "rejects.tsv"), os.path.join(alias_dir, "rejects.tsv"))
    sources.finalize_source(
        alias_dir,
        kind=kind,
        class_names=meta["class_names"],
        shard_lengths=meta["shard_lengths"],
        class_image_counts=meta["class_image_counts"],
        label_dtype=job.label_dtype,
        image_format=job.image_format,
        extra_metadata={k: meta[k] for k in ("shard_lengths", "conversion")},
    )


def convert_source(job: SourceJob, out: str, *, workers: int, shard_size: int) -> Summary:
    """Writes (or resumes, or confirms) one source under `out`; returns its summary."""
    start = time.perf_counter()
    directory = sources.source_dir(out, job.name)
    plan = _plan(job, shard_size)
    meta = _read_json(os.path.join(directory, "metadata.json"))
    skipped = meta is not None and meta.get("conversion", {}).get("plan") == plan
    if not skipped:
        _prepare_directory(directory, plan)
        tasks = _shard_tasks(job, directory, shard_size)
        done = _run_tasks(job, tasks, workers)
        lengths: dict[str, list[int]] = collections.defaultdict(list)
        counts: dict[str, list[int]] = {}
        rejects = [[split, r.path, r.reason, r.detail] for split, r in job.listing_rejects]
        conversions: collections.Counter = collections.Counter()
        for task, shard in zip(tasks, done):
            lengths[task.split].append(shard["num_records"])
            prev = counts.get(task.split, [0] * len(job.class_names))
            counts[task.split] = [a + b for a, b in zip(prev, shard["counts"])]
            rejects += [[task.split, *r] for r in shard["rejects"]]
            conversions.update(shard["conversions"])
        for filename, text in job.reports.items():
            with open(os.path.join(directory, filename), "w") as f:
                f.write(text)
        with open(os.path.join(directory, "rejects.tsv"), "w") as f:
            f.write("split\tpath\treason\tdetail\n")
            f.writelines("\t".join(map(str, r)) + "\n" for r in rejects)
        by_reason = collections.Counter(r[2] for r in rejects)
        meta = {
            "kind": job.kind,
            "class_names": list(job.class_names),
            "shard_lengths": dict(lengths),
            "class_image_counts": counts,
            "conversion": {
                "plan": plan,
                "rejects": dict(by_reason),
                "converted": dict(conversions),
                "notes": list(job.notes),
            },
        }
        sources.finalize_source(
            directory,
            kind=job.kind,
            class_names=job.class_names,
            shard_lengths=lengths,
            class_image_counts=counts,
            label_dtype=job.label_dtype,
            image_format=job.image_format,
            extra_metadata={k: meta[k] for k in ("shard_lengths", "conversion")},
        )
        meta = _read_json(os.path.join(directory, "metadata.json"))
    for alias, kind in job.aliases:
        _write_alias(job, directory, alias, kind, out, meta)
    conversion = meta["conversion"]
    notes = list(conversion["notes"])
    if conversion["converted"]:
        converted = ", ".join(f"{n} {what}" for what, n in sorted(conversion["converted"].items()))
        notes.append(f"converted to RGB JPEG: {converted}")
    return Summary(
        name=job.name,
        written={split: sum(n) for split, n in meta["shard_lengths"].items()},
        rejects=dict(conversion["rejects"]),
        notes=notes,
        seconds=time.perf_counter() - start,
        skipped=skipped,
        aliases=tuple(a for a, _ in job.aliases),
    )


def convert_all(
    jobs: Sequence[SourceJob], out: str, *, workers: int | None = None, shard_size: int = 1000
) -> list[Summary]:
    """Converts every job in turn, each over all workers."""
    if workers is None:
        workers = os.cpu_count() or 1
    summaries = []
    for job in jobs:
        summary = convert_source(job, out, workers=workers, shard_size=shard_size)
        logging.info("%s", summary.lines()[0])
        summaries.append(summary)
    return summaries


def require_dir(path: str, what: str) -> str:
    """`path` if it is a directory; else a MissingError saying what --src should point at."""
    if not os.path.isdir(path):
        raise MissingError(f"{path} is not a directory: {what}")
    return path


def mmseg_dirs(root: str, subdir: str, dataset: str) -> tuple[str, str]:
    """root/images/<subdir> and root/annotations/<subdir> (the mmseg layout), both required."""
    return tuple(
        require_dir(
            os.path.join(root, top, subdir), f"{dataset} needs {top}/{subdir}/ under {root}"
        )
        for top in ("images", "annotations")
    )


def list_pairs(
    split: str, image_dir: str, label_dir: str, label_suffix: str
) -> tuple[list[Item], list[tuple[str, Reject]]]:
    """Images of `image_dir` paired with `label_dir/<stem><label_suffix>`, sorted by name.

    A file that is not an image is a listing reject; a missing label file is found (and
    rejected) by the worker that converts the pair.
    """
    items, rejects = [], []
    for name in sorted(os.listdir(image_dir)):
        path = os.path.join(image_dir, name)
        if name.startswith(".") or os.path.isdir(path):
            continue
        if not images.is_image_name(name):
            rejects.append((split, Reject("not an image", path, "not an image file name")))
            continue
        stem = os.path.splitext(name)[0]
        items.append(Item(stem, path, os.path.join(label_dir, stem + label_suffix)))
    return items, rejects
