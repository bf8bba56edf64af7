"""Per-class response maps, the paper's Fig. 2 (SPEC 9, `tools/visualize_pixel_affinity.py`):
where a model's pixel embeddings resemble one seed pixel of each class.

  python -m larvseg_jax.analysis.response_maps --workdir runs/seg_only [--images 0 5 photo.jpg] \\
      [--categories all|base|novel | --classes "boat,car"] [--points 1] [--seed 0] \\
      [--scale minmax|cosine] [--dataset syn_eval] [--out DIR]

Per image, one row: the input with every seed marked | the ground truth | one heat map per
class present, the cosine of each pixel to the class's seed(s) over the input (bright = alike),
seeds circled. Everything is at the network's input size, where the oracle draws its seeds;
an evaluation image's seeds are those of the oracle's first repetition with the same --seed.
An image file given by path has no ground truth: its seeds are drawn from the model's own
prediction (the evaluation set's classes), which the second panel then shows.

--scale minmax (default) stretches each map to its own minimum and maximum, as the official
tool does; --scale cosine maps cosine -1..1 to the colour ramp, so maps compare across classes.
Writes <id>_response_maps.png per image, response_maps.png (all rows under a colour-bar
header), response_maps.json (seeds, the response at them, mean response inside and outside
each class's mask) and TensorBoard images (`analysis/response_maps/<id>`) under --out/tensorboard.
"""

import argparse
import os
import sys

import jax.numpy as jnp
import numpy as np
from PIL import Image, ImageDraw

from larvseg_jax import ca_visualize, logs, visualize
from larvseg_jax.analysis import affinity, evalset, oracle
from larvseg_jax.data import transforms
from larvseg_jax.errors import ConfigError, UserError
from larvseg_jax.inference import Predictor, load
from larvseg_jax.jsonfile import write_json_atomic
from larvseg_jax.progress import Progress
from larvseg_jax.segment import add_model_flags
from larvseg_jax.tb_writer import TensorBoardWriter

TILE_SIDE = 160  # tiles are enlarged (nearest, integer factor) to at least this short side
HEAT_WEIGHT = 0.6  # heat colour over the photo (as segment's attention maps)
FILE_STREAM = 2**31  # seed-stream offset for image files (evaluation images use their index)


def scaled(response: np.ndarray, scale: str) -> np.ndarray:
    """[H, W] cosines -> [0, 1]: stretched to the map's own range ("minmax", the official
    tool's choice) or (cos + 1) / 2 ("cosine")."""
    if scale == "cosine":
        return (response + 1.0) / 2.0
    low, high = float(response.min()), float(response.max())
    return (response - low) / (high - low) if high > low else np.zeros_like(response)


def heat_overlay(rgb: np.ndarray, value: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3]: the photo under the heat colours of value [H, W] in [0, 1]."""
    heat = ca_visualize.heat(value).astype(np.float32)
    blend = (1 - HEAT_WEIGHT) * rgb.astype(np.float32) + HEAT_WEIGHT * heat
    return blend.round().astype(np.uint8)


def mark_seeds(tile: np.ndarray, seeds_yx: list, scale: int, fills: list) -> np.ndarray:
    """Circles (black rim, white ring, `fills` inside) at seed pixels of a tile enlarged by
    `scale`; seeds_yx are coordinates before the enlargement."""
    image = Image.fromarray(tile)
    draw = ImageDraw.Draw(image)
    radius = max(4, scale + 2)
    for (y, x), fill in zip(seeds_yx, fills):
        cy, cx = (y + 0.5) * scale, (x + 0.5) * scale
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=(0, 0, 0))
        r = radius - 1
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=(255, 255, 255), width=2)
    return np.asarray(image)


def image_maps(
    embed: np.ndarray,
    mask_labels: np.ndarray,
    class_ids: list[int] | None,
    *,
    points: int,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Response maps of one image's classes.

    Args:
      embed: [H, W, D] unit embeddings at the input size.
      mask_labels: int [H, W] the labels seeds are drawn from (ground truth, or a prediction).
      class_ids: the classes wanted, or None for all present; absent ones are skipped.
      points, rng: as `oracle.draw_seeds` (all present classes are drawn, then the wanted
        ones kept, so an image's seeds are the oracle's).

    Returns:
      classes int32 [K], seeds int32 [K, points] flat indices, responses float32 [H, W, K].
    """
    classes, seeds = oracle.draw_seeds(mask_labels, points, rng)
    keep = np.ones(len(classes), bool) if class_ids is None else np.isin(classes, class_ids)
    classes, seeds = classes[keep], seeds[keep]
    if not classes.size:
        return classes, seeds, np.zeros(mask_labels.shape + (0,), np.float32)
    responses = np.asarray(affinity.seed_responses(jnp.asarray(embed), jnp.asarray(seeds)))
    return classes, seeds, responses


def render_row(
    rgb: np.ndarray,
    mask_labels: np.ndarray,
    classes: np.ndarray,
    seeds: np.ndarray,
    responses: np.ndarray,
    *,
    names: tuple,
    novel: set,
    colours: np.ndarray,
    scale: str,
    mask_title: str,
) -> np.ndarray:
    """input with seeds | mask | one heat map per class, each captioned, at TILE_SIDE."""
    s = max(1, -(-TILE_SIDE // min(rgb.shape[:2])))
    width = rgb.shape[1]
    seeds_yx = [[divmod(int(p), width) for p in dict.fromkeys(row)] for row in seeds]
    all_seeds = [yx for row in seeds_yx for yx in row]
    fills = [tuple(int(v) for v in colours[c]) for c, row in zip(classes, seeds_yx) for _ in row]
    big = rgb.repeat(s, 0).repeat(s, 1)
    tiles = [
        visualize.captioned(mark_seeds(big, all_seeds, s, fills), [("input", (255, 255, 255))])
    ]
    mask = visualize.colorize(mask_labels, colours).repeat(s, 0).repeat(s, 1)
    entries = visualize.legend_entries([mask_labels], names, colours)
    tiles.append(visualize.captioned(mask, [(mask_title, (255, 255, 255))] + entries))
    for k, c in enumerate(classes):
        heat = heat_overlay(rgb, scaled(responses[..., k], scale)).repeat(s, 0).repeat(s, 1)
        colour = tuple(int(v) for v in colours[c])
        heat = mark_seeds(heat, seeds_yx[k], s, [colour] * len(seeds_yx[k]))
        tag = " (novel)" if names[c] in novel else ""
        tiles.append(visualize.captioned(heat, [(f"{names[c]}{tag}", colour)]))
    return visualize.side_by_side(tiles)


def class_stats(
    classes: np.ndarray, seeds: np.ndarray, responses: np.ndarray, mask_labels: np.ndarray, names
) -> list[dict]:
    """Per class: seeds (y, x), response at them, mean response inside and outside its mask."""
    width = mask_labels.shape[1]
    flat = responses.reshape(-1, responses.shape[-1])
    rows = []
    for k, c in enumerate(classes):
        inside = mask_labels == c
        outside = (mask_labels != c) & (mask_labels >= 0)
        unique = list(dict.fromkeys(int(p) for p in seeds[k]))
        rows.append(
            {
                "class": names[c],
                "seeds_yx": [list(divmod(p, width)) for p in unique],
                "response_at_seeds": [round(float(flat[p, k]), 6) for p in unique],
                "mean_inside": round(float(responses[..., k][inside].mean()), 6),
                "mean_outside": (
                    round(float(responses[..., k][outside].mean()), 6) if outside.any() else None
                ),
            }
        )
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m larvseg_jax.analysis.response_maps",
        description=__doc__.split("\n\n")[0],
        epilog=(
            "examples:\n"
            "  python -m larvseg_jax.analysis.response_maps --workdir runs/seg_only\n"
            "  python -m larvseg_jax.analysis.response_maps --workdir runs/seg_only "
            "--images 0 7 syn_eval_000012 --categories novel\n"
            "  python -m larvseg_jax.analysis.response_maps --workdir runs/seg_only "
            "--images photo.jpg --classes boat,water\n\n" + __doc__.split("\n\n", 2)[2]
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_flags(parser)
    parser.add_argument(
        "--images",
        nargs="+",
        default=["0", "1"],
        help="indices or ids of evaluation images, or image files (default: 0 1)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--categories", default="all", help="all (default), base or novel")
    which.add_argument("--classes", help='comma-separated class names, e.g. "boat,car"')
    parser.add_argument("--points", type=int, default=1, help="seed pixels per class (1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the seed-pixel draws (0)")
    parser.add_argument("--scale", choices=("minmax", "cosine"), default="minmax")
    parser.add_argument("--dataset", help="evaluation set (default: the config's)")
    parser.add_argument(
        "--data_dir", help="folder holding larvseg_records/ (default: the config's)"
    )
    parser.add_argument("--out", help="output folder (default <workdir>/analysis/response_maps)")
    return parser.parse_args(argv)


def _mask_labels(predictor: Predictor, images: evalset.EvalSet, example: dict, hw) -> tuple:
    """(labels [H, W] seeds are drawn from, the panel's title)."""
    if example["label"] is not None:
        return oracle.gt_at(np.asarray(example["label"]), hw), "ground truth"
    names = predictor.resolve(images.class_names, f"--dataset {images.name}")
    predicted = predictor.segment(example["raw"], predictor.index(names)).labels
    return oracle.gt_at(predicted, hw), "prediction (no ground truth)"


def _save_sheet(rows: list[np.ndarray], title: str, scale: str, path: str) -> None:
    """The image rows stacked under a header with the title and the heat ramp's scale."""
    sheet = visualize.stacked(rows)
    ramp = ca_visualize.heat(np.linspace(0.0, 1.0, 64))
    ends = ("min", "max") if scale == "minmax" else ("cosine -1", "1")
    top = visualize.header(sheet.shape[1], 16, ramp, title=title, scale=ends)
    visualize.save_png(np.concatenate([top, sheet]), path)


def _open(args: argparse.Namespace) -> tuple:
    """(predictor, evaluation set, class ids, examples, workdir, output folder) of the
    arguments; a UserError for any that is wrong."""
    if args.points < 1:
        raise ConfigError(f"--points {args.points}: must be at least 1")
    predictor = load(args.workdir, step=args.step, checkpoint=args.checkpoint)
    images = evalset.open_eval_set(predictor, args.dataset, data_dir=args.data_dir)
    if args.classes:
        wanted = [n.strip() for n in args.classes.split(",") if n.strip()]
        class_ids = images.class_ids(wanted, "--classes")
    else:
        class_ids = images.class_ids(images.categories(args.categories), "--categories")
    examples = evalset.pick_images(predictor, images, args.images)
    workdir = os.path.dirname(os.path.dirname(predictor.checkpoint))
    out = args.out or os.path.join(workdir, "analysis", "response_maps")
    os.makedirs(out, exist_ok=True)
    return predictor, images, class_ids, examples, workdir, out


def run(argv: list[str]) -> int:
    """The command; returns the exit status (0 done, 1 a user error)."""
    args = parse_args(argv)
    try:
        predictor, images, class_ids, examples, workdir, out = _open(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    names, novel = images.class_names, set(images.novel)
    colours = visualize.palette(names)
    embed_fn = affinity.embedding_fn(predictor)
    writer = TensorBoardWriter(os.path.join(out, "tensorboard"))
    progress = Progress("response maps", len(examples))
    rows, report = [], []
    for position, (entry, example) in enumerate(zip(args.images, examples)):
        image = np.asarray(example["image"])
        hw = image.shape[:2]
        rgb = transforms.resize_bilinear(np.asarray(example["raw"]), *hw)  # what the network saw
        mask_labels, mask_title = _mask_labels(predictor, images, example, hw)
        stream = int(entry) if entry.isdigit() and example["label"] is not None else None
        rng = np.random.default_rng(
            (args.seed, 0, FILE_STREAM + position if stream is None else stream)
        )
        classes, seeds, responses = image_maps(
            np.asarray(embed_fn(image)), mask_labels, class_ids, points=args.points, rng=rng
        )
        row = render_row(
            rgb,
            mask_labels,
            classes,
            seeds,
            responses,
            names=names,
            novel=novel,
            colours=colours,
            scale=args.scale,
            mask_title=mask_title,
        )
        visualize.save_png(row, os.path.join(out, f"{example['id']}_response_maps.png"))
        writer.write_images(predictor.step, {f"analysis/response_maps/{example['id']}": row})
        rows.append(row)
        report.append(
            {
                "image": example["id"],
                "size": [int(hw[0]), int(hw[1])],
                "seeds_from": mask_title,
                "classes": class_stats(classes, seeds, responses, mask_labels, names),
            }
        )
        progress.advance()
    progress.close()
    writer.close()
    title = (
        f"{os.path.basename(workdir)} step {predictor.step}: input with seeds | labels the seeds "
        "are drawn from | cosine to the class's seed(s)"
    )
    _save_sheet(rows, title, args.scale, os.path.join(out, "response_maps.png"))
    write_json_atomic(
        os.path.join(out, "response_maps.json"),
        {
            "checkpoint": predictor.checkpoint,
            "step": predictor.step,
            "dataset": images.name,
            "points": args.points,
            "seed": args.seed,
            "scale": args.scale,
            "images": report,
        },
    )
    print(f"wrote {len(rows)} image(s) of response maps to {out}", file=sys.stderr)
    return 0


def main() -> None:
    logs.quiet_benign()
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    main()
