"""An embedded synthetic world in the real record format (SPEC 2.3, 5; STYLE 5), no downloads.

It poses LarvSeg's problem in miniature: BASE classes have pixel labels, NOVEL classes are known
only from image-level data, and one novel class is confounded with its context.

Classes (each a mean colour plus a class-specific texture, with per-image colour, phase and
frequency jitter and pixel noise, so a tiny ViT tells them apart in a few hundred steps):
  base  (stuff regions):  sky (smooth gradient), grass (fine vertical stripes), water (horizontal
        waves), road (grey speckle), wall (brick checker), sand (diagonal stripes)
  novel (object shapes):  boat (red, diagonal stripes), car (yellow, fine checker), tent (purple,
        vertical stripes), flower (pink, heavy noise)

Images: a distorted Voronoi partition of 1-3 stuff classes, then ellipses/rectangles of objects.
Sizes: short side `image_size`, long side in [1, aspect_max] x that, 30 % portrait.

Sources (written with sources.write_source, read like any real dataset):
  syn_seg     kind "seg",    vocab = base,          stuff only, every pixel labelled (like C171).
  syn_weak    kind "weak",   vocab = base + novel,  stuff + 0-2 novel objects; the full mask is
              stored (like ADE20K train) but the trainer only derives image-level labels from it.
  syn_single  kind "single", vocab = novel,         one object of the class on 1-2 stuff classes
              (like I124); the record stores the class id; the pipeline fills the label map.
  syn_eval    kind "eval",   vocab = base + novel (same order as syn_weak), fully labelled,
              split "validation".
The confound (why the CA-classifier exists): in syn_weak and syn_single a boat sits on water
with probability `confound` (water is in the scene and the boat's centre is on water; otherwise
water is left out), covering a minority of the image. In syn_single no other class's image
contains water, so image-level pooling can learn "water" for "boat". In syn_eval boats sit on
water only when the scene has water (60 %), elsewhere otherwise.

Knobs (cfg.data.synthetic):
  seed        generator seed; same knobs -> byte-identical records.
  image_size  short image side in pixels.
  aspect_max  long side / short side is drawn from U[1, aspect_max].
  num_seg, num_weak, num_single, num_eval  examples per source.
  confound    P(boat on water) in syn_weak and syn_single.
"""

import contextlib
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from larvseg_jax import interrupts, user_cache
from larvseg_jax.data import catalog, sources
from larvseg_jax.errors import ConfigError

BASE = catalog.SYNTHETIC_BASE
NOVEL = catalog.SYNTHETIC_NOVEL
ALL = BASE + NOVEL
NAMES = ("syn_seg", "syn_weak", "syn_single", "syn_eval")  # kinds and vocabularies: catalog
GENERATOR_VERSION = 2  # bump when the generator changes: existing data is then regenerated
FINGERPRINT = "synthetic_world.json"
DEFAULT_KNOBS = {
    "seed": 0,
    "image_size": 64,
    "aspect_max": 1.5,
    "num_seg": 512,
    "num_weak": 512,
    "num_single": 512,
    "num_eval": 64,
    "confound": 1.0,
}

# name: (RGB mean, texture, period in px, texture amplitude, pixel-noise sigma)
STYLES = {
    "sky": ((120, 170, 235), "gradient", 0, 25, 3),
    "grass": ((60, 150, 50), "vstripes", 4, 30, 8),
    "water": ((30, 80, 160), "hstripes", 7, 30, 4),
    "road": ((105, 105, 105), "flat", 0, 0, 16),
    "wall": ((185, 115, 85), "checker", 8, 28, 4),
    "sand": ((220, 200, 140), "diag", 10, 18, 8),
    "boat": ((210, 50, 40), "antidiag", 5, 45, 4),
    "car": ((235, 205, 35), "checker", 3, 40, 4),
    "tent": ((140, 60, 175), "vstripes", 6, 40, 4),
    "flower": ((245, 130, 205), "flat", 0, 0, 30),
}


def _render_class(name: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Texture field of one class over the whole image: float32 [h, w, 3]."""
    mean, texture, period, amp, sigma = STYLES[name]
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    colour = np.asarray(mean, np.float32) + rng.uniform(-15, 15, 3).astype(np.float32)
    freq = 2 * np.pi / max(period, 1) * rng.uniform(0.85, 1.15)
    phase = rng.uniform(0, 2 * np.pi)
    if texture == "gradient":
        pattern = 2 * y / max(h - 1, 1) - 1
    elif texture == "vstripes":
        pattern = np.sin(freq * x + phase)
    elif texture == "hstripes":
        pattern = np.sin(freq * y + phase + 0.8 * np.sin(0.15 * x))
    elif texture == "diag":
        pattern = np.sin(freq * (x + y) / np.sqrt(2) + phase)
    elif texture == "antidiag":
        pattern = np.sin(freq * (x - y) / np.sqrt(2) + phase)
    elif texture == "checker":
        off = rng.integers(0, period)
        pattern = (((x + off) // period + (y + off) // period) % 2) * 2 - 1
    else:
        pattern = np.zeros((h, w), np.float32)
    field = colour + amp * pattern[..., None] + rng.normal(0, sigma, (h, w, 3))
    return field.astype(np.float32)


def _size(knobs: Mapping[str, Any], rng: np.random.Generator) -> tuple[int, int]:
    short = int(knobs["image_size"])
    long = round(short * rng.uniform(1.0, float(knobs["aspect_max"])))
    return (long, short) if rng.random() < 0.3 else (short, long)


def _stuff_layout(
    h: int, w: int, stuff: list[int], rng: np.random.Generator, weights=None
) -> np.ndarray:
    """Distorted Voronoi partition of the image into the `stuff` class ids: int [h, w]."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    seeds = rng.uniform(0, 1, (len(stuff), 2)) * (h, w)
    weights = np.ones(len(stuff)) if weights is None else np.asarray(weights, float)
    wobble = rng.uniform(2, 6) * np.sin(x / rng.uniform(5, 12) + rng.uniform(0, 6))
    dist = np.stack(
        [((y + wobble - sy) ** 2 + (x - sx) ** 2) / wt**2 for (sy, sx), wt in zip(seeds, weights)]
    )
    return np.asarray(stuff)[np.argmin(dist, axis=0)]


def _draw_object(
    label: np.ndarray, cls: int, frac: float, centre, rng: np.random.Generator
) -> np.ndarray:
    """Paints an ellipse or rectangle of ~frac of the image area at centre (y, x), in place."""
    h, w = label.shape
    area = frac * h * w
    aspect = rng.uniform(0.6, 1.6)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    cy, cx = centre
    if rng.random() < 0.5:  # ellipse: pi * a * b = area
        a = np.sqrt(area / np.pi * aspect)
        b = area / np.pi / a
        mask = ((y - cy) / a) ** 2 + ((x - cx) / b) ** 2 <= 1
    else:
        a = np.sqrt(area * aspect) / 2
        b = area / (4 * a)
        mask = (np.abs(y - cy) <= a) & (np.abs(x - cx) <= b)
    label[mask] = cls
    return label


def _centre_on(label: np.ndarray, cls: int | None, rng: np.random.Generator):
    """A random pixel of class `cls` (anywhere if None or absent), kept off the border."""
    h, w = label.shape
    ys, xs = np.nonzero(label == cls) if cls is not None else ((), ())
    if len(ys):
        i = rng.integers(len(ys))
        return float(ys[i]), float(xs[i])
    return rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w


def _compose(label: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Renders the image of a label map over ALL: uint8 [h, w, 3]."""
    h, w = label.shape
    image = np.zeros((h, w, 3), np.float32)
    for cls in np.unique(label):
        image[label == cls] = _render_class(ALL[cls], h, w, rng)[label == cls]
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


WATER, BOAT = ALL.index("water"), ALL.index("boat")
NON_WATER = [i for i in range(len(BASE)) if i != WATER]


def _objects_for(kind: str, rng: np.random.Generator, cls: int) -> list[int]:
    if kind == "single":
        return [cls]
    if kind == "weak":
        n = rng.choice(3, p=(0.15, 0.55, 0.3))
    else:
        n = rng.integers(0, 4)
    return [len(BASE) + int(i) for i in rng.choice(len(NOVEL), n, replace=False)]


def make_example(
    kind: str, rng: np.random.Generator, knobs: Mapping[str, Any], cls: int = -1
) -> tuple[np.ndarray, np.ndarray]:
    """Draws one scene of a source kind.

    Args:
      kind: "seg" | "weak" | "single" | "eval".
      rng: the example's generator.
      knobs: the synthetic knobs (DEFAULT_KNOBS keys).
      cls: for "single", the object's class id in ALL.
    Returns:
      (image uint8 [h, w, 3], label int32 [h, w] ids into ALL).
    """
    h, w = _size(knobs, rng)
    objects = [] if kind == "seg" else _objects_for(kind, rng, cls)
    has_boat = BOAT in objects
    if kind == "seg":
        pool, n_stuff, need_water = list(range(len(BASE))), rng.integers(1, 4), False
    elif kind == "single":
        on_water = has_boat and rng.random() < float(knobs["confound"])
        pool, n_stuff, need_water = NON_WATER, rng.integers(1, 3), on_water
    elif kind == "weak":
        on_water = has_boat and rng.random() < float(knobs["confound"])
        no_water = has_boat and not on_water
        pool = NON_WATER if no_water else list(range(len(BASE)))
        n_stuff, need_water = rng.integers(1, 4), on_water
    else:
        on_water = has_boat and rng.random() < 0.6
        pool, n_stuff, need_water = list(range(len(BASE))), rng.integers(1, 4), on_water
    if need_water:
        others = [c for c in pool if c != WATER]
        stuff = [WATER] + list(rng.choice(others, n_stuff - 1, replace=False))
        weights = [1.6] + [1.0] * (len(stuff) - 1)  # water is the dominant region under boats
    else:
        stuff = list(rng.choice(pool, n_stuff, replace=False))
        weights = None
    label = _stuff_layout(h, w, [int(s) for s in stuff], rng, weights)
    for obj in objects:
        frac = rng.uniform(0.1, 0.3) if kind == "single" else rng.uniform(0.05, 0.18)
        target = WATER if (obj == BOAT and WATER in stuff) else None
        centre = _centre_on(label, target, rng)
        _draw_object(label, obj, frac, centre, rng)
    return _compose(label, rng), label.astype(np.int32)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def generate(name: str, knobs: Mapping[str, Any]) -> Iterator[dict]:
    """Yields the records of one synthetic source (the write_source example format)."""
    kind = catalog.get(name).kind
    vocab = catalog.get(name).class_names
    count = int(knobs[{"seg": "num_seg", "weak": "num_weak"}.get(kind, f"num_{kind}")])
    remap = np.full(len(ALL), 255, np.uint8)
    remap[[ALL.index(c) for c in vocab]] = np.arange(len(vocab), dtype=np.uint8)
    for i in range(count):
        interrupts.check()  # safe point: the world is renamed into place only when complete
        if i == 1:
            interrupts.test_point("generate")
        rng = np.random.default_rng([int(knobs["seed"]), NAMES.index(name), i])
        if kind == "single":
            local = i % len(vocab)
            image, _ = make_example(kind, rng, knobs, cls=ALL.index(vocab[local]))
            yield {"image": _png(image), "class_id": local, "image_id": f"{name}_{i:06d}"}
            continue
        image, label = make_example(kind, rng, knobs)
        local_label = remap[label]
        if (local_label == 255).any():  # a generator bug, never a data property
            raise AssertionError(f"{name} example {i} has classes outside its vocabulary")
        yield {"image": _png(image), "label": _png(local_label), "image_id": f"{name}_{i:06d}"}


def _knobs_dict(knobs: Any) -> dict:
    items = dict(knobs.items()) if hasattr(knobs, "items") else dict(knobs)
    out = dict(DEFAULT_KNOBS)
    unknown = set(items) - set(DEFAULT_KNOBS)
    if unknown:
        raise ConfigError(
            f"unknown synthetic knobs {sorted(unknown)}; known: {sorted(DEFAULT_KNOBS)}"
        )
    out.update(items)
    return out


def fingerprint(knobs: Any) -> dict:
    return {"generator_version": GENERATOR_VERSION, "knobs": _knobs_dict(knobs)}


def default_root() -> str:
    """Where generated worlds are cached: $LARVSEG_CACHE, else $XDG_CACHE_HOME/larvseg_jax."""
    return os.environ.get("LARVSEG_CACHE") or user_cache.root()


def world_dir(root: str, knobs: Any) -> str:
    """The data dir of one world: a name fixed by the generator version and the knobs."""
    want = fingerprint(knobs)
    digest = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:12]
    return os.path.join(root, f"synthetic_v{GENERATOR_VERSION}_{digest}")


def _tmp_prefix() -> str:
    return f".synthetic_tmp_{socket.gethostname()}_"


def _remove_dead_temporaries(root: str) -> None:
    """Deletes what killed generations on this host left (their process is gone); another live
    run's temporary is left alone."""
    prefix = _tmp_prefix()
    for name in os.listdir(root):
        if not name.startswith(prefix):
            continue
        pid = name[len(prefix) :].split("_")[0]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        except (ValueError, PermissionError):
            continue


def ensure_synthetic(root: str, knobs: Any) -> str:
    """The data dir holding the four syn_* sources for `knobs`, generated once under `root`.

    Worlds are cached by generator version and knobs, so every run with the same knobs reads
    the same records. Safe under interruption and concurrency (several runs, several hosts on
    a shared disk): a world is written to a temporary directory and renamed into place whole;
    the first rename wins and later writers discard their copy.

    Args:
      root: the cache root (default_root() or the config's data.dir).
      knobs: cfg.data.synthetic (any mapping with DEFAULT_KNOBS keys; missing keys default).
    Returns:
      The data dir to read the syn_* sources from.
    """
    want = fingerprint(knobs)
    final = world_dir(root, knobs)
    if os.path.exists(os.path.join(final, sources.ROOT, FINGERPRINT)):
        return final
    os.makedirs(root, exist_ok=True)
    count = sum(int(want["knobs"][k]) for k in ("num_seg", "num_weak", "num_single", "num_eval"))
    logging.info(
        "generating the synthetic world (%d images, once for these knobs) in %s", count, final
    )
    _remove_dead_temporaries(root)
    tmp = tempfile.mkdtemp(prefix=f"{_tmp_prefix()}{os.getpid()}_", dir=root)
    try:
        import tensorflow_datasets as tfds

        tfds.disable_progress_bar()
        for name in NAMES:
            dataset = catalog.get(name)
            with contextlib.redirect_stdout(io.StringIO()):  # tfds prints a banner per dataset
                sources.write_source(
                    tmp,
                    name,
                    kind=dataset.kind,
                    class_names=dataset.class_names,
                    split_examples={dataset.split: lambda name=name: generate(name, want["knobs"])},
                )
        with open(os.path.join(tmp, sources.ROOT, FINGERPRINT), "w") as f:
            json.dump(want, f, indent=1, sort_keys=True)
        try:
            os.rename(tmp, final)
        except OSError:  # another run finished the same world first: use theirs
            if not os.path.exists(os.path.join(final, sources.ROOT, FINGERPRINT)):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
