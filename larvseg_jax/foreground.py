"""Foreground-only rendering for huge vocabularies, the paper's Fig. 5 (`segment --foreground-only`).

Over thousands of classes (the 21K model) a colour legend says nothing: Fig. 5 instead greys out
the pixels predicted as background or stuff and writes each remaining region's name on it.

The default background set (`default_background`):
- a model of the synthetic world: its stuff classes, `catalog.SYNTHETIC_BASE` (sky, grass,
  water, road, wall, sand);
- any other model: COCO-Stuff's stuff classes, the 91 entries of `classes/c171.txt` whose COCO
  category id is above 91 (ids 1-90 are the 80 things), by raw name and by the paper-time V1 name
  cut at "-" ("wall-brick" -> "wall"), so they also match the A150 / A847 / ImageNet names that
  C171 shares. COCO-Stuff counts a few countable objects as stuff (tent, flower, pillow, table,
  cabinet...): give --background to choose another set.
"""

import functools

import numpy as np
from PIL import Image, ImageDraw

from larvseg_jax import visualize
from larvseg_jax.data import catalog
from larvseg_jax.inference import WNID

COCO_FIRST_STUFF_ID = 92  # COCO-Stuff ids 92..182 are stuff, 1..90 things
OVERLAY_ALPHA = 0.55  # class colour over the photo on foreground pixels (segment's overlay)
MIN_REGION_FRACTION = 0.002  # regions smaller than this share of the image go unnamed
NAMES_PER_CLASS = 3  # a class's largest regions that get its name


@functools.cache
def coco_stuff_names() -> tuple[str, ...]:
    """The stuff classes of classes/c171.txt, raw names and V1 names (cut at "-")."""
    rows = catalog.read_columns("c171.txt")
    raw = [name for coco_id, name in rows if int(coco_id) >= COCO_FIRST_STUFF_ID]
    return tuple(dict.fromkeys(raw + [n.split("-")[0] for n in raw]))


def default_background(synthetic: bool) -> tuple[str, ...]:
    """The background set `segment --foreground-only` uses without --background (see above)."""
    return catalog.SYNTHETIC_BASE if synthetic else coco_stuff_names()


@functools.cache
def _wnid_lemmas() -> dict[str, str]:
    """wnid -> its synset's first WordNet lemma (classes/imagenet_lemmas.txt)."""
    return {
        w: text.split(",")[0].strip() for w, text in catalog.read_columns("imagenet_lemmas.txt")
    }


def display_name(name: str) -> str:
    """The text written on a region: the class name with "_" as spaces; an ImageNet wnid
    (n02084071) becomes its synset's first WordNet lemma (the 21K classes are named by it
    already, so their names are lemmas)."""
    if WNID.match(name):
        name = _wnid_lemmas().get(name, name)
    return name.replace("_", " ")


def grey_out(
    rgb: np.ndarray, labels: np.ndarray, background: np.ndarray, colours: np.ndarray
) -> np.ndarray:
    """Background pixels as the photo in dimmed grey; the others in segment's colour overlay.

    Args:
      rgb: uint8 [H, W, 3] photo.
      labels: int [H, W] predicted ids.
      background: bool [N], True for the background classes.
      colours: uint8 [N, 3] class colours.

    Returns:
      uint8 [H, W, 3]: R = G = B = 64 + luma / 2 where labels is background, else
      (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * colour.
    """
    photo = rgb.astype(np.float32)
    luma = photo @ np.array([0.299, 0.587, 0.114], np.float32)
    grey = np.repeat((64.0 + luma / 2.0)[..., None], 3, axis=-1)
    blend = (1 - OVERLAY_ALPHA) * photo + OVERLAY_ALPHA * colours[labels].astype(np.float32)
    is_background = np.asarray(background, bool)[labels]
    return np.where(is_background[..., None], grey, blend).round().astype(np.uint8)


def name_places(labels: np.ndarray, background: np.ndarray) -> list[tuple[int, int, int]]:
    """(class id, y, x) where names go: per foreground class its NAMES_PER_CLASS largest
    connected regions of at least MIN_REGION_FRACTION of the image, each at its pixel farthest
    from the region's border (inside even a ring or a crescent). Largest regions first."""
    from scipy import ndimage

    places = []
    for c in np.unique(labels):
        if background[c]:
            continue
        regions, count = ndimage.label(labels == c)
        sizes = np.bincount(regions.ravel(), minlength=count + 1)[1:]
        for r in np.argsort(-sizes, kind="stable")[:NAMES_PER_CLASS]:
            if sizes[r] < MIN_REGION_FRACTION * labels.size:
                break
            depth = ndimage.distance_transform_edt(np.pad(regions == r + 1, 1))[1:-1, 1:-1]
            y, x = np.unravel_index(np.argmax(depth), depth.shape)
            places.append((int(sizes[r]), int(c), int(y), int(x)))
    return [(c, y, x) for _, c, y, x in sorted(places, key=lambda p: -p[0])]


def _overlap(a: tuple, b: tuple) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def render(
    rgb: np.ndarray,
    labels: np.ndarray,
    names: tuple,
    background: np.ndarray,
    colours: np.ndarray,
    min_height: int = visualize.MIN_HEIGHT,
) -> tuple[np.ndarray, list[str]]:
    """Fig. 5: `grey_out`, enlarged like segment's overlay, with names written on the regions.

    Returns:
      uint8 [s * H, s * W, 3] (s the integer enlargement of `visualize.enlarge`), and the names
      written, in order of region size (a name that would cover one already written is left
      out).
    """
    base = grey_out(rgb, labels, background, colours)
    big = visualize.enlarge(base, min_height)
    s = big.shape[0] // base.shape[0]
    image = Image.fromarray(big)
    draw = ImageDraw.Draw(image)
    size = visualize.font_size(*big.shape[:2])
    font = visualize.font(size)
    written, boxes = [], []
    for c, y, x in name_places(labels, background):
        text = display_name(names[c])
        width = draw.textlength(text, font=font)
        cx = min(max((x + 0.5) * s, width / 2 + 2), big.shape[1] - width / 2 - 2)
        cy = min(max((y + 0.5) * s, size), big.shape[0] - size)
        box = (cx - width / 2 - 2, cy - size / 2 - 2, cx + width / 2 + 2, cy + size / 2 + 2)
        if any(_overlap(box, other) for other in boxes):
            continue  # a larger region's name is already there
        boxes.append(box)
        draw.text(
            (cx, cy),
            text,
            fill=(255, 255, 255),
            font=font,
            anchor="mm",
            stroke_width=2,
            stroke_fill=(0, 0, 0),
        )
        written.append(names[c])
    return np.asarray(image), list(dict.fromkeys(written))
