"""Class colours keyed by name, legends and side-by-side panels for masks (eval images, SPEC 7).

Host-side numpy + PIL only: these run on a handful of images per evaluation, after the metrics.
Colours come from mmsegmentation's ADE20K-150 palette (`data/classes/ade150_palette.tsv`), so a
class looks the same in every panel, step, vocabulary and model; other names get a hash colour.
"""

import colorsys
import functools
import hashlib
import itertools
import math
import os
import pathlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

PALETTE_FILE = pathlib.Path(__file__).parent / "data" / "classes" / "ade150_palette.tsv"
IGNORE_COLOUR = (0, 0, 0)  # label -1
# Where the ADE colour misleads, mostly in the synthetic world (data/synthetic.py): ADE draws
# water light cyan [61, 230, 250], next to sky's [6, 230, 230]; water should read as water and
# differ from sky. Its blue stays clear of ADE's car [0, 102, 200] and sea [9, 7, 230].
OVERRIDES = {"water": (20, 45, 160)}
MIN_HEIGHT = 256  # panels smaller than this are enlarged (nearest) so the legend text is readable
MAX_WIDTH = 4096  # but never past this width (a wide strip of tiny images)

Colour = tuple[int, int, int]


@functools.cache
def _table() -> dict[str, Colour]:
    """Name -> colour, in ADE order then new override names: the order that wins collisions."""
    table = {}
    for line in PALETTE_FILE.read_text().splitlines():
        *rgb, name = line.split("\t")
        table[name] = tuple(int(v) for v in rgb)
    return table | OVERRIDES


def _hash_colour(key: str) -> Colour:
    """A stable, fairly saturated colour from a string; value >= 0.7 keeps it far from black."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    hue, sat, val = digest[0] / 256 + digest[1] / 65536, digest[2] / 255, digest[3] / 255
    rgb = colorsys.hsv_to_rgb(hue, 0.45 + 0.5 * sat, 0.7 + 0.3 * val)
    return tuple(round(255 * c) for c in rgb)


def name_colour(name: str) -> Colour:
    """The colour of a class name before de-duplication in a vocabulary (names are stripped)."""
    name = name.strip()
    return _table().get(name) or _hash_colour(name)


def _nudges(name: str):
    """Deterministic alternatives for a colour already taken: blend towards the name's hash."""
    base, target = np.array(name_colour(name)), np.array(_hash_colour(name))
    for k in range(1, 4):
        yield tuple(int(v) for v in np.round(base + k / 4 * (target - base)))
    for k in itertools.count(1):
        yield _hash_colour(f"{name}#{k}")


def palette(class_names: Sequence[str]) -> np.ndarray:
    """Colours of a vocabulary: `name_colour` per name, pairwise distinct, never black.

    A name keeps its colour whatever the vocabulary's order: collisions (mmseg gives road and
    skyscraper both [140, 140, 140]) are settled in a fixed order, table rank then name, and the
    loser is nudged. Equal names share a colour.

    Args:
      class_names: N names, e.g. `vocab.eval_names`.

    Returns:
      uint8 [N, 3].
    """
    names = [n.strip() for n in class_names]
    rank = {n: i for i, n in enumerate(_table())}
    taken, chosen = {IGNORE_COLOUR}, {}
    for name in sorted(set(names), key=lambda n: (rank.get(n, len(rank)), n)):
        colour = name_colour(name)
        if colour in taken:
            colour = next(c for c in _nudges(name) if c not in taken)
        taken.add(colour)
        chosen[name] = colour
    return np.array([chosen[n] for n in names], np.uint8).reshape(-1, 3)


def colorize(label: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Maps class ids to colours.

    Args:
      label: int [H, W] class ids; negative ids (ignore) become black.
      colours: uint8 [N, 3] from `palette`.

    Returns:
      uint8 [H, W, 3].
    """
    label = np.asarray(label)
    if label.size and label.max() >= len(colours):
        raise ValueError(f"label id {label.max()} >= palette size {len(colours)}")
    out = colours[np.clip(label, 0, None)]
    out[label < 0] = IGNORE_COLOUR
    return out


def legend_entries(
    labels: Sequence[np.ndarray], class_names: Sequence[str], colours: np.ndarray
) -> list[tuple[str, Colour]]:
    """(name, colour) of every class present in any of `labels`, by id; "ignore" last if any -1."""
    ids = np.unique(np.concatenate([np.asarray(x).ravel() for x in labels]))
    entries = [(class_names[i].strip(), tuple(int(v) for v in colours[i])) for i in ids if i >= 0]
    if ids.size and ids[0] < 0:
        entries.append(("ignore", IGNORE_COLOUR))
    return entries


@functools.cache
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    # Pillow >= 10.1 embeds a scalable default font (no file, no network); without FreeType it
    # falls back to the fixed 11 px bitmap font, which is small but still works.
    return ImageFont.load_default(size=size)


def font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """The font legends use, `size` pixels high (for text drawn on images elsewhere)."""
    return _font(size)


def font_size(height: int, width: int) -> int:
    """Legend text size for a panel of [height, width]: 16 px at 256 px, at most 48."""
    return int(np.clip(min(height, width) // 16, 14, 48))


def legend(entries: Sequence[tuple[str, Colour]], width: int, size: int = 16) -> np.ndarray:
    """A white strip of swatches and names, wrapped to `width`.

    Args:
      entries: (name, RGB colour) pairs, drawn in order.
      width: strip width in pixels.
      size: text height and swatch side in pixels.

    Returns:
      uint8 [rows * 1.5 size + ..., width, 3]; [0, width, 3] when there are no entries.
    """
    if not entries:
        return np.zeros((0, width, 3), np.uint8)
    font, pad = _font(size), max(2, size // 2)
    probe = Image.new("RGB", (1, 1))
    measure = ImageDraw.Draw(probe)
    places, x, y = [], pad, pad
    for name, colour in entries:
        w = size + pad // 2 + math.ceil(measure.textlength(name, font=font))
        if x > pad and x + w > width - pad:
            x, y = pad, y + size + pad
        places.append((x, y, name, colour))
        x += w + size
    image = Image.new("RGB", (width, y + size + pad), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top, bottom = font.getbbox("Hg")[1::2]
    for x, y, name, colour in places:
        draw.rectangle([x, y, x + size - 1, y + size - 1], fill=colour, outline=(90, 90, 90))
        text_y = y + (size - (bottom - top)) / 2 - top
        draw.text((x + size + pad // 2, text_y), name, fill=(0, 0, 0), font=font)
    return np.asarray(image)


def enlarge(image: np.ndarray, min_height: int = MIN_HEIGHT) -> np.ndarray:
    """Integer nearest-neighbour upscaling to at least `min_height` rows (width <= MAX_WIDTH)."""
    h, w = image.shape[:2]
    scale = max(1, min(math.ceil(min_height / h), MAX_WIDTH // w))
    return image.repeat(scale, 0).repeat(scale, 1)


def with_legend(
    image: np.ndarray, entries: Sequence[tuple[str, Colour]], min_height: int = MIN_HEIGHT
) -> np.ndarray:
    """`enlarge(image)` with `legend(entries)` below it: uint8 [H' + legend rows, W', 3]."""
    big = enlarge(np.asarray(image, np.uint8), min_height)
    h, w = big.shape[:2]
    return np.concatenate([big, legend(entries, w, font_size(h, w // 3))])


def captioned(tile: np.ndarray, entries: Sequence[tuple[str, Colour]]) -> np.ndarray:
    """A tile with the legend strip of `entries` under it, text sized to the tile."""
    h, w = tile.shape[:2]
    return np.concatenate([tile, legend(entries, w, font_size(h, w))])


def side_by_side(tiles: Sequence[np.ndarray], gap: int = 4) -> np.ndarray:
    """uint8 [H, W, 3] tiles in a row, shorter ones padded white below, `gap` white columns
    between them."""
    height = max(t.shape[0] for t in tiles)
    padded = [
        np.pad(t, ((0, height - t.shape[0]), (0, gap), (0, 0)), constant_values=255) for t in tiles
    ]
    return np.concatenate(padded, axis=1)[:, :-gap]


def stacked(rows: Sequence[np.ndarray], gap: int = 6) -> np.ndarray:
    """uint8 [H, W, 3] rows one under the other, narrower ones padded white on the right,
    `gap` white rows between them."""
    width = max(r.shape[1] for r in rows)
    padded = [
        np.pad(r, ((0, gap), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows
    ]
    return np.concatenate(padded)[:-gap]


def panel(
    raw: np.ndarray,
    gt: np.ndarray,
    pred: np.ndarray,
    colours: np.ndarray,
    class_names: Sequence[str],
    min_height: int = MIN_HEIGHT,
) -> np.ndarray:
    """Input | ground truth | prediction side by side, enlarged, with a legend strip below.

    Args:
      raw: uint8 [H, W, 3] original image.
      gt: int [H, W] ground truth, ignore = -1 (shown black).
      pred: int [H, W] predicted ids.
      colours: uint8 [N, 3] from `palette(class_names)`.
      class_names: N names; the legend lists those present in `gt` or `pred`.
      min_height: small panels are enlarged by an integer factor s (nearest) to this height.

    Returns:
      uint8 [s * H + L, 3 * s * W, 3]: the top s * H rows are the panel, then L legend rows.
    """
    raw = np.asarray(raw, np.uint8)
    if raw.shape[:2] != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: raw {raw.shape}, gt {gt.shape}, pred {pred.shape}")
    strip = np.concatenate([raw, colorize(gt, colours), colorize(pred, colours)], axis=1)
    return with_legend(strip, legend_entries([gt, pred], class_names, colours), min_height)


def _class_of(title: str, names: Sequence[str]) -> int:
    """Index of the longest name that ends the title "<image id>/<class name>"."""
    hits = [i for i, n in enumerate(names) if title.endswith("/" + n)]
    return max(hits, key=lambda i: len(names[i]))


def header(
    width: int,
    size: int,
    heat_ramp: np.ndarray | None,
    title: str = "input | class mask | CA attention",
    scale: tuple[str, str] = ("attention 0", "1"),
) -> np.ndarray:
    """White strip with a title line; below it "<scale[0]> [colour bar] <scale[1]>" given a ramp.

    Args:
      width: strip width in pixels.
      size: text height in pixels.
      heat_ramp: uint8 [K, 3] colours from low to high, or None (title only).
      title: the first line, e.g. what the columns are.
      scale: the texts left and right of the colour bar.

    Returns:
      uint8 [rows, width, 3].
    """
    font, pad = _font(size), max(2, size // 2)
    lines = 1 if heat_ramp is None else 2
    image = Image.new("RGB", (width, lines * (size + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    top = font.getbbox("Hg")[1]
    draw.text((pad, pad - top), title, (0, 0, 0), font)
    if heat_ramp is not None:
        y = size + 2 * pad
        draw.text((pad, y - top), scale[0], (0, 0, 0), font)
        x = 2 * pad + math.ceil(draw.textlength(scale[0], font=font))
        length = max(1, min(8 * size, width - x - 2 * size))  # narrow sheets: a shorter bar
        bar = Image.fromarray(np.asarray(heat_ramp, np.uint8)[None])
        image.paste(bar.resize((length, size), Image.Resampling.NEAREST), (x, y))
        draw.text((x + length + pad // 2, y - top), scale[1], (0, 0, 0), font)
    return np.asarray(image)


def attention_sheet(
    panels: Sequence[tuple[str, np.ndarray]],
    class_names: Sequence[str],
    heat_ramp: np.ndarray | None = None,
    min_height: int = 192,
) -> np.ndarray:
    """CA attention panels (`ca_visualize.attention_panels`) stacked, each with a caption.

    Each row is enlarged and captioned with its class's colour swatch and "<image id>/<class>".
    A header names the columns and, given `heat_ramp`, draws the attention scale from 0 to 1.

    Args:
      panels: (title "<image id>/<class name>", uint8 [H, 3W, 3]) pairs, at least one.
      class_names: the evaluation vocabulary, so swatches match the eval panels' colours.
      heat_ramp: uint8 [K, 3] attention colours from 0 to 1 (optional).
      min_height: each row is enlarged to at least this height.

    Returns:
      uint8 [header + rows, max row width, 3].
    """
    colours = palette(class_names)
    rows = []
    for title, image in panels:
        colour = tuple(int(v) for v in colours[_class_of(title, class_names)])
        rows.append(with_legend(image, [(title, colour)], min_height))
    width = max(r.shape[1] for r in rows)
    size = font_size(min_height, width // 3)
    rows = [np.pad(r, ((0, 2), (0, width - r.shape[1]), (0, 0))) for r in rows]
    return np.concatenate([header(width, size, heat_ramp), *rows])


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """PNG written under a temporary name, then renamed (never half-written)."""
    tmp = f"{os.fspath(path)}.partial"
    Image.fromarray(array).save(tmp, format="PNG")
    os.replace(tmp, path)
