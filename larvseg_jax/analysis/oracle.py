"""Pixel-compactness oracle, the paper's Table 1 (SPEC 9): do a model's pixel embeddings group
the pixels of each class, the novel ones included, well enough that one pixel names the rest?

  python -m larvseg_jax.analysis.oracle --workdir runs/seg_only [--points 1] [--repeats 5] \\
      [--seed 0] [--categories novel|base|all] [--dataset syn_eval] [--limit N] \\
      [--absent_classes_never_win] [--out DIR]

Per evaluation image, in whole-image mode at the test size: the unit pixel embeddings upsampled
to the resized ground truth's size and renormalised (`affinity`); for each ground-truth class
present, N seed pixels drawn uniformly from its mask; the class's response is the cosine of
every pixel to its nearest seed, written into channel c of a zero [n_cls, H, W] tensor; that is
resized bilinearly to the original size and each pixel takes the best-responding class. IoU is
the evaluation's (dataset-level histograms, `evaluate.miou_report`), averaged over the novel,
base or all classes; R repetitions with fresh seeds give the mean and spread.

Faithful quirk (SPEC 9, bug B19): channels of absent classes are zero, not -inf, so where every
present class has a negative cosine the first absent class wins, a certain error.
--absent_classes_never_win gives absent classes -inf instead. The official code draws seeds
unseeded (torch.randperm); here they come from numpy's Generator seeded with (--seed,
repetition, image index), so a run is reproducible and an image's seeds do not depend on
--limit. The official softmax before the argmax is left out: it does not change the argmax.
"""

import argparse
import functools
import json
import os
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import evaluate, interp, logs
from larvseg_jax.analysis import affinity, evalset
from larvseg_jax.data import transforms
from larvseg_jax.errors import ConfigError, UserError
from larvseg_jax.inference import Predictor, load
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress
from larvseg_jax.segment import add_model_flags

DEFAULT_REPEATS = 5  # the official notebook averages 5 runs (notebook/oracle_experiment.ipynb)


def draw_seeds(gt: np.ndarray, points: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    """Seed pixels of every class present in a label map (SPEC 9 step 4).

    Args:
      gt: int [H, W] ground truth at the network's input size, ignore = -1.
      points: N seeds per class, drawn uniformly without replacement (all of a smaller mask).
      rng: the draw's generator.

    Returns:
      classes int32 [K] ascending, seeds int32 [K, N] flat pixel indices; a class with fewer
      than N pixels repeats its seeds (`affinity.seed_responses` takes the maximum over them).
    """
    flat = np.asarray(gt).ravel()
    classes = np.unique(flat[flat >= 0]).astype(np.int32)
    seeds = np.empty((len(classes), points), np.int32)
    for k, c in enumerate(classes):
        pixels = np.flatnonzero(flat == c)
        picked = pixels[rng.choice(pixels.size, size=min(points, pixels.size), replace=False)]
        seeds[k] = np.resize(picked, points)
    return classes, seeds


def channel_order(
    classes: np.ndarray, num_classes: int, absent_never_win: bool
) -> tuple[np.ndarray, np.ndarray]:
    """The channels the argmax needs, in class-id order: the present classes and, unless absent
    classes never win, the first absent class (its channel is all zero).

    The other absent channels are zero too and come later in id order, so an argmax that takes
    the first maximum never picks them: this argmax over K + 1 channels equals the official one
    over all n_cls, ties included.

    Returns:
      source int32 [K'] (index into the K responses; K = the zero channel) and ids int32 [K'].
    """
    ids = [int(c) for c in classes]
    source = list(range(len(ids)))
    if not absent_never_win and len(ids) < num_classes:
        first_absent = next(c for c in range(num_classes) if c not in set(ids))
        at = int(np.searchsorted(ids, first_absent))
        ids.insert(at, first_absent)
        source.insert(at, len(classes))
    return np.asarray(source, np.int32), np.asarray(ids, np.int32)


@functools.partial(jax.jit, static_argnames=("out_hw",))
def assign_labels(
    responses: jax.Array, source: jax.Array, ids: jax.Array, *, out_hw: tuple[int, int]
) -> jax.Array:
    """Responses [H, W, K] -> class ids [H0, W0]: channels picked by `channel_order`, resized
    bilinearly to the original size, best channel per pixel (SPEC 9 step 7)."""
    zero = jnp.zeros(responses.shape[:2] + (1,), responses.dtype)
    channels = jnp.concatenate([responses, zero], axis=-1)[..., source]
    return ids[jnp.argmax(interp.resize_bilinear(channels, out_hw), axis=-1)]


def oracle_labels(
    embed: jax.Array,
    gt: np.ndarray,
    *,
    num_classes: int,
    out_hw: tuple[int, int],
    points: int,
    rng: np.random.Generator,
    absent_never_win: bool = False,
) -> np.ndarray | None:
    """One image's oracle prediction.

    Args:
      embed: [H, W, D] unit embeddings at the input size (`affinity.embedding_fn`).
      gt: int [H, W] ground truth resized (nearest) to the input size.
      out_hw: the original size (H0, W0).

    Returns:
      int32 [H0, W0] class ids, or None when `gt` labels no pixel.
    """
    classes, seeds = draw_seeds(gt, points, rng)
    if not classes.size:
        return None
    responses = affinity.seed_responses(embed, jnp.asarray(seeds))
    source, ids = channel_order(classes, num_classes, absent_never_win)
    return np.asarray(assign_labels(responses, source, ids, out_hw=tuple(out_hw)))


def spread(values: Sequence[float | None]) -> dict:
    """Mean, population std, min, max and the values of the repetitions (None where a set had
    no class in the ground truth)."""
    kept = np.asarray([v for v in values if v is not None], np.float64)
    stats = {"mean": None, "std": None, "min": None, "max": None}
    if kept.size:
        stats = {k: float(f(kept)) for k, f in zip(stats, (np.mean, np.std, np.min, np.max))}
    return {**stats, "per_repeat": list(values)}


def gt_at(gt: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """The ground truth at the network's input size: nearest, as the oracle's test pipeline
    resizes the label with the image (mmcv imrescale, cv2 INTER_NEAREST)."""
    return transforms.resize_nearest(gt, int(hw[0]), int(hw[1]))


def run_oracle(
    predictor: Predictor,
    images: evalset.EvalSet,
    *,
    points: int = 1,
    repeats: int = DEFAULT_REPEATS,
    seed: int = 0,
    absent_never_win: bool = False,
    progress: bool = True,
) -> dict:
    """The Table 1 protocol over an evaluation set (see the module docstring).

    Returns:
      {"num_images", "by_category": {"novel"|"base"|"all": `spread`}, "per_class_iou":
       {name: mean over repetitions or None}, "repeats": [`evaluate.miou_report`, ...]}.
    """
    n = len(images.class_names)
    totals = np.zeros((repeats, 3, n), np.int64)
    embed_fn = affinity.embedding_fn(predictor)
    log = Progress("oracle", len(images), enabled=progress)
    for i, example in enumerate(images.dataset):
        gt = np.asarray(example["label"])
        image = example["image"]
        small = gt_at(gt, image.shape[:2])
        embed = embed_fn(image)
        for r in range(repeats):
            rng = np.random.default_rng((seed, r, i))
            labels = oracle_labels(
                embed,
                small,
                num_classes=n,
                out_hw=gt.shape,
                points=points,
                rng=rng,
                absent_never_win=absent_never_win,
            )
            if labels is not None:
                totals[r] += np.stack(evaluate.class_histograms(labels, gt, n))
        log.advance()
    log.close()
    reports = [
        evaluate.miou_report(
            inter,
            pred + gt_area - inter,
            gt_area,
            class_names=images.class_names,
            base_names=images.base,
            novel_names=images.novel,
        )
        for inter, pred, gt_area in totals
    ]
    keys = {"novel": "miou_novel", "base": "miou_base", "all": "miou"}
    per_class = {}
    for name in images.class_names:
        kept = [r["per_class_iou"][name] for r in reports if r["per_class_iou"][name] is not None]
        per_class[name] = float(np.mean(kept)) if kept else None
    return {
        "num_images": len(images),
        "by_category": {c: spread([r[k] for r in reports]) for c, k in keys.items()},
        "per_class_iou": per_class,
        "repeats": [
            {k: r[k] for k in ("miou", "miou_base", "miou_novel", "per_class_iou")} for r in reports
        ],
    }


def _cell(stats: dict) -> str:
    if stats["mean"] is None:
        return "n/a"
    return f"{stats['mean']:.1f} ± {stats['std']:.1f}"


def markdown(report: dict) -> str:
    """The Table 1 analogue: mIoU per category set, mean ± std over the repetitions."""
    s = report["settings"]
    lines = [
        f"Oracle (SPEC 9) of {report['checkpoint']} on {report['dataset']} "
        f"({report['num_images']} images), {s['points']} seed point(s) per class, "
        f"{s['repeats']} repetition(s) from seed {s['seed']}"
        + (", absent classes never win" if s["absent_classes_never_win"] else "")
        + " (mIoU %, mean ± std over repetitions):",
        "",
        "| categories | classes | oracle mIoU | min | max | trained classifier |",
        "|---|---|---|---|---|---|",
    ]
    order = [report["categories"]] + [c for c in evalset.CATEGORY_SETS if c != report["categories"]]
    model = report.get("model_eval") or {}
    for c in order:
        stats = report["by_category"][c]
        low, high = (f"{stats[k]:.1f}" if stats[k] is not None else "n/a" for k in ("min", "max"))
        own = model.get(c)
        lines.append(
            f"| {c} | {report['num_classes'][c]} | {_cell(stats)} | {low} | {high} | "
            f"{'n/a' if own is None else f'{own:.1f}'} |"
        )
    return "\n".join(lines) + "\n"


def _model_eval(predictor: Predictor, dataset: str, limit: int) -> dict | None:
    """The model's own evaluation mIoU of this checkpoint on the same images, if evaluation
    wrote it (it covers the whole set: none with --limit)."""
    workdir = os.path.dirname(os.path.dirname(predictor.checkpoint))
    path = os.path.join(workdir, "eval", f"step_{predictor.step}.json")
    if dataset != predictor.cfg.data.eval_source or limit >= 0 or not os.path.isfile(path):
        return None
    with open(path) as f:
        report = json.load(f)
    return {"all": report["miou"], "base": report["miou_base"], "novel": report["miou_novel"]}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.analysis.oracle",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  python -m larvseg_jax.analysis.oracle --workdir runs/seg_only\n"
            "  python -m larvseg_jax.analysis.oracle --workdir runs/seg_only --points 5 "
            "--categories all\n"
            "  python -m larvseg_jax.analysis.oracle --workdir runs/c171 --dataset a150 "
            "--data_dir /data --limit 200\n\n"
            + __doc__.split("\n\n", 2)[2]
            + "\n\nWrites oracle_<dataset>_points<N>_repeats<R>_seed<S>[...].json and .md in "
            "--out (default <workdir>/analysis/oracle)."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument("--points", type=int, default=1, help="seed pixels per class (1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=DEFAULT_REPEATS,
        help=f"repetitions with fresh seeds, averaged ({DEFAULT_REPEATS}, as the official notebook)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the seed-pixel draws (0)")
    parser.add_argument(
        "--categories",
        default="novel",
        help="category set of the headline mIoU: novel (default), base or all; all three are written",
    )
    parser.add_argument("--dataset", help="evaluation set (default: the config's)")
    parser.add_argument(
        "--data_dir", help="folder holding larvseg_records/ (default: the config's)"
    )
    parser.add_argument("--limit", type=int, default=-1, help="only the first N images")
    parser.add_argument(
        "--absent_classes_never_win",
        action="store_true",
        help="fix SPEC 9's quirk: absent classes get -inf, not 0 (default: faithful)",
    )
    parser.add_argument("--out", help="output folder (default <workdir>/analysis/oracle)")
    return parser.parse_args(argv)


def output_stem(args: argparse.Namespace, dataset: str) -> str:
    stem = f"oracle_{dataset}_points{args.points}_repeats{args.repeats}_seed{args.seed}"
    stem += "_absent_never_win" if args.absent_classes_never_win else ""
    return stem + (f"_limit{args.limit}" if args.limit >= 0 else "")


def run(argv: list[str]) -> int:
    """The command; returns the exit status (0 done, 1 a user error)."""
    args = parse_args(argv)
    try:
        for flag, value in (("--points", args.points), ("--repeats", args.repeats)):
            if value < 1:
                raise ConfigError(f"{flag} {value}: must be at least 1")
        if args.categories not in evalset.CATEGORY_SETS:
            raise ConfigError(f"--categories {args.categories!r}: unknown; use novel, base or all")
        predictor = load(args.workdir, step=args.step, checkpoint=args.checkpoint)
        images = evalset.open_eval_set(
            predictor, args.dataset, data_dir=args.data_dir, limit=args.limit
        )
        out = args.out or os.path.join(
            os.path.dirname(os.path.dirname(predictor.checkpoint)), "analysis", "oracle"
        )
        os.makedirs(out, exist_ok=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"oracle of {predictor.checkpoint} on {images.name} ({len(images)} images, "
        f"{args.repeats} repetition(s))",
        file=sys.stderr,
    )
    result = run_oracle(
        predictor,
        images,
        points=args.points,
        repeats=args.repeats,
        seed=args.seed,
        absent_never_win=args.absent_classes_never_win,
    )
    report = {
        "checkpoint": predictor.checkpoint,
        "step": predictor.step,
        "model": predictor.cfg.model.variant,
        "dataset": images.name,
        "categories": args.categories,
        "miou": result["by_category"][args.categories],
        "settings": {
            "points": args.points,
            "repeats": args.repeats,
            "seed": args.seed,
            "limit": args.limit,
            "absent_classes_never_win": args.absent_classes_never_win,
            "seeds_drawn_with": "numpy.random.default_rng((seed, repetition, image index))",
            "mode": "whole",
        },
        "num_classes": {c: len(images.categories(c)) for c in evalset.CATEGORY_SETS},
        "classes": {"base": list(images.base), "novel": list(images.novel)},
        "model_eval": _model_eval(predictor, images.name, args.limit),
        **result,
    }
    stem = os.path.join(out, output_stem(args, images.name))
    write_json_atomic(f"{stem}.json", report)
    table = markdown(report)
    tmp = f"{stem}.md.partial"
    with open(tmp, "w") as f:
        f.write(table)
    os.replace(tmp, f"{stem}.md")
    print(table, end="")
    print(f"wrote {stem}.json and {stem}.md", file=sys.stderr)
    return 0


def main() -> None:
    logs.quiet_benign()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
