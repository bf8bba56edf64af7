"""Several trained models side by side on the same images, the paper's Fig. 4.

  python -m larvseg_jax.analysis.compare --workdirs runs/seg_only runs/baseline runs/larvseg \\
      [--titles "seg-only,baseline,LarvSeg"] [--images 0 1 2 3 photo.jpg] \\
      [--highlight novel|base|all|none|"boat,car"] [--dataset syn_eval] [--out DIR]

One row per image: input | ground truth | each model's prediction, each tile captioned with
the image's mIoU under that model and its mean over the highlighted classes. Pixels of the
highlighted classes (default: novel) keep their colours; the others are faded, so what a method
does for the classes it learnt without pixel labels stands out. Every model predicts through
the evaluation path (`inference.Predictor.segment_many`: its own test resize, slide windows,
logits resized to the original size) over the evaluation set's classes, and a tile's mIoU is
evaluation's metric (`evaluate.class_histograms` + `miou_report`) on that one image. An image
file given by path has no ground truth and gets no numbers.

Writes compare.png and compare.json (per image and model: mIoU, the highlighted mean, IoU per
class; and the same over all the chosen images together) in --out (default
<first workdir>/analysis/compare).
"""

import argparse
import os
import sys

import numpy as np

from larvseg_jax import evaluate, logs, visualize
from larvseg_jax.analysis import evalset
from larvseg_jax.errors import ConfigError, UserError
from larvseg_jax.inference import load
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress

TILE_SIDE = 160  # tiles are enlarged (nearest, integer factor) to at least this short side
FADE = 0.7  # how far colours of classes outside the highlighted set move towards white
NO_GT_GREY = 200


def image_scores(pred: np.ndarray, gt: np.ndarray, class_names, highlight) -> dict:
    """Evaluation's metric on one image: {"miou", "miou_highlight", "per_class_iou"}."""
    n = len(class_names)
    inter, pred_area, gt_area = evaluate.class_histograms(pred, gt, n)
    report = evaluate.miou_report(
        inter,
        pred_area + gt_area - inter,
        gt_area,
        class_names=class_names,
        novel_names=highlight,
    )
    return {
        "miou": report["miou"],
        "miou_highlight": report["miou_novel"] if highlight else None,
        "per_class_iou": report["per_class_iou"],
        "histograms": np.stack([inter, pred_area, gt_area]),
    }


def highlighted_colours(colours: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """uint8 [N, 3]: the palette, with classes not in `keep` (bool [N]) faded towards white."""
    faded = colours.astype(np.float32) + FADE * (255.0 - colours.astype(np.float32))
    return np.where(keep[:, None], colours, faded.round()).astype(np.uint8)


def caption(scores: dict | None, title: str, set_name: str) -> tuple[str, ...]:
    """A prediction tile's caption lines: the model, then its mIoU on the image."""
    if scores is None or scores["miou"] is None:
        return (title,)
    text = f"mIoU {scores['miou']:.1f}"
    if scores["miou_highlight"] is not None:
        text += f", {set_name} {scores['miou_highlight']:.1f}"
    return title, text


def render_row(
    rgb: np.ndarray,
    gt: np.ndarray | None,
    preds: list[np.ndarray],
    captions: list[tuple[str, ...]],
    *,
    names: tuple,
    colours: np.ndarray,
    keep: np.ndarray,
    set_name: str,
) -> np.ndarray:
    """input | ground truth | predictions, enlarged to TILE_SIDE, captioned (`caption`
    lines), a legend under the row (swatches as the tiles show them)."""
    s = max(1, -(-TILE_SIDE // min(rgb.shape[:2])))
    shown = highlighted_colours(colours, keep)
    size = visualize.font_size(rgb.shape[0] * s, rgb.shape[1] * s)

    def tile(image, lines):
        big = image.repeat(s, 0).repeat(s, 1)
        text = [visualize.header(big.shape[1], size, None, title=line) for line in lines]
        return np.concatenate([big, *text])

    if gt is None:
        truth = np.full(rgb.shape, NO_GT_GREY, np.uint8)
        tiles = [tile(rgb, ("input",)), tile(truth, ("no ground truth",))]
    else:
        tiles = [tile(rgb, ("input",)), tile(visualize.colorize(gt, shown), ("ground truth",))]
    tiles += [tile(visualize.colorize(p, shown), c) for p, c in zip(preds, captions)]
    row = visualize.side_by_side(tiles)
    present = [gt] if gt is not None else []
    entries = visualize.legend_entries(present + preds, names, shown)  # swatches as in tiles
    tag = {n for n, k in zip(names, keep) if k}
    entries = [(f"{n} ({set_name})" if n in tag and set_name else n, c) for n, c in entries]
    return np.concatenate([row, visualize.legend(entries, row.shape[1], size)])


def highlight_names(images: evalset.EvalSet, value: str) -> tuple[tuple[str, ...], str]:
    """(class names, label) of --highlight: a category set, none, or comma-separated names."""
    if value == "none":
        return (), ""
    if value in evalset.CATEGORY_SETS:
        return images.categories(value, "--highlight"), value
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    images.class_ids(names, "--highlight")
    return names, "highlighted"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.analysis.compare",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "example:\n"
            "  python -m larvseg_jax.analysis.compare --workdirs runs/seg_only runs/baseline "
            'runs/larvseg --titles "seg-only,baseline,LarvSeg" --images 0 1 2 3\n\n'
            + __doc__.split("\n\n", 2)[2]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdirs", nargs="+", required=True, help="training workdirs")
    parser.add_argument("--titles", help="comma-separated tile titles (default: workdir names)")
    parser.add_argument(
        "--images",
        nargs="+",
        default=["0", "1", "2", "3"],
        help="indices or ids of evaluation images, or image files (default: 0 1 2 3)",
    )
    parser.add_argument(
        "--highlight", default="novel", help='novel (default), base, all, none or "boat,car"'
    )
    parser.add_argument("--dataset", help="evaluation set (default: the first model's)")
    parser.add_argument(
        "--data_dir", help="folder holding larvseg_records/ (default: the config's)"
    )
    parser.add_argument("--out", help="output folder (default <first workdir>/analysis/compare)")
    return parser.parse_args(argv)


def _load_models(args: argparse.Namespace) -> tuple[list, list[str]]:
    titles = [os.path.basename(os.path.normpath(w)) for w in args.workdirs]
    if args.titles:
        titles = [t.strip() for t in args.titles.split(",")]
        if len(titles) != len(args.workdirs):
            raise ConfigError(
                f"--titles has {len(titles)} names for {len(args.workdirs)} --workdirs"
            )
    return [load(w) for w in args.workdirs], titles


def _predictions(predictors: list, indices: list, examples: list[dict]) -> list[list]:
    """Per model, the labels [H0, W0] of every example, through the evaluation path."""
    predictions = []
    progress = Progress("compare", len(examples) * len(predictors))
    for predictor, index in zip(predictors, indices):
        labels = []
        raws = ((i, np.asarray(ex["raw"])) for i, ex in enumerate(examples))
        for _, pred in predictor.segment_many(raws, index):
            labels.append(pred.labels)
            progress.advance()
        predictions.append(labels)
    progress.close()
    return predictions


def _miou_over_images(histograms: np.ndarray, names, highlight) -> dict:
    """mIoU and the highlighted classes' mean from summed [3, N] (intersection, predicted,
    ground-truth) pixel counts, as evaluation reports them."""
    inter, pred_area, gt_area = histograms
    report = evaluate.miou_report(
        inter, pred_area + gt_area - inter, gt_area, class_names=names, novel_names=highlight
    )
    return {"miou": report["miou"], "miou_highlight": report["miou_novel"]}


def run(argv: list[str]) -> int:
    """The command; returns the exit status (0 done, 1 a user error)."""
    args = parse_args(argv)
    try:
        predictors, titles = _load_models(args)
        images = evalset.open_eval_set(predictors[0], args.dataset, data_dir=args.data_dir)
        highlight, set_name = highlight_names(images, args.highlight)
        names = images.class_names
        where = f"--dataset {images.name}"
        indices = [
            p.index(p.resolve(names, f"{where} for {w}")) for p, w in zip(predictors, args.workdirs)
        ]
        examples = evalset.pick_images(predictors[0], images, args.images)
        out = args.out or os.path.join(args.workdirs[0], "analysis", "compare")
        os.makedirs(out, exist_ok=True)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    colours = visualize.palette(names)
    keep = np.isin(np.arange(len(names)), images.class_ids(highlight, "--highlight"))
    predictions = _predictions(predictors, indices, examples)
    rows, per_image = [], []
    totals = np.zeros((len(predictors), 3, len(names)), np.int64)
    for i, example in enumerate(examples):
        gt = None if example["label"] is None else np.asarray(example["label"])
        preds = [labels[i] for labels in predictions]
        scores = [None if gt is None else image_scores(p, gt, names, highlight) for p in preds]
        for m, sc in enumerate(scores):
            if sc is not None:
                totals[m] += sc.pop("histograms")
        captions = [caption(sc, t, set_name) for sc, t in zip(scores, titles)]
        rows.append(
            render_row(
                np.asarray(example["raw"]),
                gt,
                preds,
                captions,
                names=names,
                colours=colours,
                keep=keep,
                set_name=set_name,
            )
        )
        per_image.append({"image": example["id"], "models": dict(zip(titles, scores))})
    sheet = visualize.stacked(rows)
    title = f"input | ground truth | {' | '.join(titles)} on {images.name}" + (
        f"; {set_name} classes in full colour" if set_name else ""
    )
    top = visualize.header(sheet.shape[1], 16, None, title=title)
    path = os.path.join(out, "compare.png")
    visualize.save_png(np.concatenate([top, sheet]), path)
    overall = {
        title: _miou_over_images(histograms, names, highlight)
        for title, histograms in zip(titles, totals)
    }
    write_json_atomic(
        os.path.join(out, "compare.json"),
        {
            "dataset": images.name,
            "models": [
                {"title": t, "checkpoint": p.checkpoint, "step": p.step}
                for t, p in zip(titles, predictors)
            ],
            "highlight": {"set": set_name or "none", "classes": list(highlight)},
            "images": per_image,
            "over_these_images": overall,
        },
    )
    print(f"wrote {path} ({len(rows)} images x {len(predictors)} models)", file=sys.stderr)
    return 0


def main() -> None:
    logs.quiet_benign()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
