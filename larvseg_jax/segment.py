"""Segment your own images with a trained model.

  python -m larvseg_jax.segment --workdir runs/larvseg --images photo.jpg holiday/ 'scans/*.png' \
      --out segmented/ [--classes "boat,water,sky" | --vocab names.txt | --dataset a150] \
      [--attention boat] [--foreground-only [--background "sky,water" | --background stuff.txt]] \
      [--step N | --checkpoint runs/larvseg/checkpoints/1500]

Per image, in --out: <name>_labels.png (class ids of the vocabulary used; 16-bit above 256
classes), <name>_overlay.png (the image with the prediction blended over it and a legend of the
classes present), <name>_attention_<class>.png with --attention, <name>_foreground.png with
--foreground-only (the paper's Fig. 5: background/stuff pixels greyed out, the other regions
named on the image; `larvseg_jax.foreground` says which classes are background by default),
and <name>.json (classes present with pixel fraction and mean confidence, sizes, checkpoint and
vocabulary) written last: an image whose JSON exists is complete. Files that are not readable images are named and skipped;
the exit status is then 1.
"""

import argparse
import dataclasses
import glob
import os
import sys

import numpy as np

from larvseg_jax import ca_visualize, foreground, visualize
from larvseg_jax.errors import UserError
from larvseg_jax.inference import ImageError, Prediction, Predictor, load, read_rgb
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
OVERLAY_ALPHA = 0.55  # weight of the class colours over the photo


def add_model_flags(parser: argparse.ArgumentParser) -> None:
    """--workdir / --step / --checkpoint (shared with the export)."""
    model = parser.add_argument_group("model (one of)")
    model.add_argument("--workdir", help="training workdir: its latest checkpoint (or --step)")
    model.add_argument("--step", type=int, help="checkpoint step in --workdir")
    model.add_argument("--checkpoint", help="a checkpoint folder, <workdir>/checkpoints/<step>")


def add_vocabulary_flags(parser: argparse.ArgumentParser) -> None:
    """--classes / --vocab / --dataset (default: the config's evaluation set)."""
    vocab = parser.add_mutually_exclusive_group()
    vocab.add_argument("--classes", help='comma-separated class names, e.g. "boat,water,sky"')
    vocab.add_argument("--vocab", help="a text file with one class name per line")
    vocab.add_argument("--dataset", help="a dataset's class list, e.g. a150, a847, c171")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.segment",
        description="Segment images with a trained LarvSeg-JAX model.",
    )
    add_model_flags(parser)
    parser.add_argument(
        "--images", nargs="+", required=True, help="image files, folders and quoted globs"
    )
    parser.add_argument("--out", required=True, help="output folder (created)")
    add_vocabulary_flags(parser)
    parser.add_argument("--attention", help="also write the CA attention map of this class")
    parser.add_argument(
        "--foreground-only",
        action="store_true",
        help="also write <name>_foreground.png: background/stuff greyed out, regions named",
    )
    parser.add_argument(
        "--background",
        help="with --foreground-only: the background classes, comma-separated or a file with one "
        "per line (default: the synthetic world's stuff classes for its models, else COCO-Stuff's "
        "stuff classes)",
    )
    return parser.parse_args(argv)


def list_images(patterns: list[str]) -> tuple[list[str], list[str]]:
    """(files in order, problems): folders give their image files (sorted), globs their
    matches; an explicitly named file is always tried, whatever its suffix."""
    files, problems = [], []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(pattern, n)
                for n in os.listdir(pattern)
                if n.lower().endswith(IMAGE_SUFFIXES)
            )
            problems += [f"{pattern}: no image files in this folder"] if not found else []
            files += found
        elif os.path.isfile(pattern):
            files.append(pattern)
        elif glob.has_magic(pattern):
            found = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
            problems += [f"{pattern}: matches no file"] if not found else []
            files += found
        else:
            problems.append(f"{pattern}: no such file or folder")
    seen, unique = set(), []
    for f in files:
        if os.path.abspath(f) not in seen:
            seen.add(os.path.abspath(f))
            unique.append(f)
    return unique, problems


def choose_vocabulary(predictor: Predictor, args: argparse.Namespace) -> tuple[tuple, str]:
    """(class names, where they came from) per --classes / --vocab / --dataset."""
    from larvseg_jax.data import catalog

    if args.classes:
        names = [n for n in args.classes.split(",") if n.strip()] or [""]
        return predictor.resolve(names, "--classes"), "--classes"
    if args.vocab:
        if not os.path.isfile(args.vocab):
            raise UserError(f"--vocab {args.vocab!r}: no such file")
        with open(args.vocab) as f:
            names = [line.rstrip("\n") for line in f if line.strip()]
        return predictor.resolve(names, f"--vocab {args.vocab}"), f"file {args.vocab}"
    if args.dataset:
        if args.dataset not in catalog.DATASETS:
            known = ", ".join(n for n in catalog.DATASETS if not n.startswith("syn_"))
            raise UserError(f"unknown --dataset {args.dataset!r}; known: {known}, syn_eval")
        names = catalog.get(args.dataset).class_names
        return predictor.resolve(names, f"--dataset {args.dataset}"), f"dataset {args.dataset}"
    return predictor.default_names, f"evaluation set {predictor.cfg.data.eval_source}"


def choose_background(
    predictor: Predictor, args: argparse.Namespace, names: tuple
) -> np.ndarray | None:
    """bool [N] over `names`: the background classes of --foreground-only (None without it).

    --background names must be trained classes (a name outside the vocabulary used is never
    predicted, so it does not matter); the default set (`foreground.default_background`) is
    intersected with the vocabulary silently.
    """
    from larvseg_jax.data import catalog

    if not args.foreground_only:
        if args.background:
            raise UserError("--background needs --foreground-only")
        return None
    if args.background:
        if os.path.isfile(args.background):
            with open(args.background) as f:
                wanted = [line.strip() for line in f if line.strip()]
            where = f"--background {args.background}"
        else:
            wanted = [n.strip() for n in args.background.split(",") if n.strip()]
            where = "--background"
        if not wanted:
            raise UserError(f"{where}: no class names; give names or a file with one per line")
        background = set(predictor.resolve(wanted, where))
    else:
        synthetic = catalog.get(predictor.cfg.data.eval_source).synthetic
        background = set(foreground.default_background(synthetic))
    return np.asarray([n in background for n in names], bool)


def output_stems(files: list[str]) -> list[str]:
    """A distinct output name per input (photo, photo_2, ... when names repeat)."""
    stems, count = [], {}
    for f in files:
        stem = os.path.splitext(os.path.basename(f))[0]
        count[stem] = count.get(stem, 0) + 1
        stems.append(stem if count[stem] == 1 else f"{stem}_{count[stem]}")
    return stems


def overlay(rgb: np.ndarray, labels: np.ndarray, names: tuple, colours: np.ndarray) -> np.ndarray:
    """The photo with the class colours blended over it and a legend of the classes present."""
    coloured = visualize.colorize(labels, colours).astype(np.float32)
    blend = (1 - OVERLAY_ALPHA) * rgb.astype(np.float32) + OVERLAY_ALPHA * coloured
    entries = visualize.legend_entries([labels], names, colours)
    return visualize.with_legend(blend.round().astype(np.uint8), entries, min_height=256)


def summary(labels: np.ndarray, confidence: np.ndarray, names: tuple) -> list[dict]:
    """Classes present, largest first: name, id, pixel fraction, mean confidence."""
    ids, counts = np.unique(labels, return_counts=True)
    sums = np.bincount(labels.ravel(), weights=confidence.ravel(), minlength=len(names))
    rows = [
        {
            "id": int(i),
            "name": names[i],
            "fraction": round(float(c) / labels.size, 6),
            "mean_confidence": round(float(sums[i] / c), 4),
        }
        for i, c in zip(ids, counts)
    ]
    return sorted(rows, key=lambda r: -r["fraction"])


@dataclasses.dataclass
class Job:
    """One readable image and where its outputs go."""

    path: str
    stem: str
    rgb: np.ndarray


@dataclasses.dataclass(frozen=True)
class Outputs:
    """Where and over what vocabulary the outputs of a run go."""

    out: str
    names: tuple
    index: np.ndarray
    colours: np.ndarray
    vocabulary_source: str
    attention: str | None
    background: np.ndarray | None = None  # bool [N] with --foreground-only


def write_outputs(predictor: Predictor, job: Job, pred: Prediction, o: Outputs) -> dict:
    """Writes the image's files (JSON last) and returns its JSON."""
    rgb, stem = job.rgb, job.stem
    dtype = np.uint8 if len(o.names) <= 256 else np.uint16
    files = {"labels": f"{stem}_labels.png", "overlay": f"{stem}_overlay.png"}
    visualize.save_png(pred.labels.astype(dtype), os.path.join(o.out, files["labels"]))
    picture = overlay(rgb, pred.labels, o.names, o.colours)
    visualize.save_png(picture, os.path.join(o.out, files["overlay"]))
    if o.attention is not None:
        att = predictor.attention(rgb, o.index, o.names.index(o.attention))
        heat = ca_visualize.heat(att).astype(np.float32)
        picture = (0.4 * rgb.astype(np.float32) + 0.6 * heat).round().astype(np.uint8)
        files["attention"] = f"{stem}_attention_{_safe(o.attention)}.png"
        visualize.save_png(picture, os.path.join(o.out, files["attention"]))
    named = None
    if o.background is not None:
        picture, named = foreground.render(rgb, pred.labels, o.names, o.background, o.colours)
        files["foreground"] = f"{stem}_foreground.png"
        visualize.save_png(picture, os.path.join(o.out, files["foreground"]))
    report = {
        "image": os.path.abspath(job.path),
        "size": [int(rgb.shape[0]), int(rgb.shape[1])],
        "checkpoint": predictor.checkpoint,
        "step": predictor.step,
        "model": predictor.cfg.model.variant,
        "vocabulary": {"source": o.vocabulary_source, "num_classes": len(o.names)},
        "classes": summary(pred.labels, pred.confidence, o.names),
        "files": files,
    }
    if named is not None:
        report["foreground"] = {
            "background": [n for n, b in zip(o.names, o.background) if b],
            "named": named,
        }
    write_json_atomic(os.path.join(o.out, f"{stem}.json"), report)
    return report


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)


def run(argv: list[str]) -> int:
    """The command; returns the exit status (0 all done, 1 some images failed or a user error)."""
    args = parse_args(argv)
    try:
        files, problems = list_images(args.images)
        if not files:
            raise UserError("no images to segment: " + "; ".join(problems))
        predictor = load(args.workdir, step=args.step, checkpoint=args.checkpoint)
        names, source = choose_vocabulary(predictor, args)
        if args.attention is not None:
            (attention,) = predictor.resolve([args.attention], "--attention")
            if attention not in names:
                raise UserError(f"--attention {attention!r} is not in the vocabulary used")
        else:
            attention = None
        background = choose_background(predictor, args, names)
        os.makedirs(args.out, exist_ok=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    index = predictor.index(names)
    colours = visualize.palette(names)
    outputs = Outputs(args.out, names, index, colours, source, attention, background)
    print(
        f"segmenting {len(files)} image{'s' * (len(files) != 1)} with {predictor.checkpoint} "
        f"over {len(names)} classes ({source})",
        file=sys.stderr,
    )
    progress = Progress("segment", len(files))
    failed = list(problems)

    def readable():
        for path, stem in zip(files, output_stems(files)):
            try:
                rgb = read_rgb(path)
            except ImageError as e:
                failed.append(f"{path}: {e}")
                progress.advance()
                continue
            yield Job(path, stem, rgb), rgb

    # Evaluation's runner: windows of consecutive images share model calls, images go
    # round-robin over the devices, and the next images are decoded while they compute.
    for job, pred in predictor.segment_many(readable(), index):
        write_outputs(predictor, job, pred, outputs)
        progress.advance()
    progress.close()
    for line in failed:
        print(f"skipped {line}", file=sys.stderr)
    done = len(files) - (len(failed) - len(problems))
    print(f"{done} of {len(files)} images segmented into {args.out}", file=sys.stderr)
    return 1 if failed else 0


def main() -> None:
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
