"""A trained model ready for people's own images.

`load` restores a checkpoint together with the config stored in it (no config file, no data
needed), and `Predictor.segment` runs the evaluation path on any RGB image (SPEC 7.1-7.2: short
side resized as in evaluation, slide windows, logits resized back to the original size, argmax),
so a prediction here is the prediction evaluation scores. `segment`, the export and the demo all
go through this module.
"""

import dataclasses
import difflib
import functools
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from larvseg_jax import ca_visualize, experiment, interp, slide
from larvseg_jax.ca_classifier import CASettings
from larvseg_jax.data import catalog, transforms
from larvseg_jax.errors import ConfigError, MissingError

WNID = re.compile(r"^n\d{8}$")


@dataclasses.dataclass(frozen=True)
class Prediction:
    """One image's result at its original size.

    Attributes:
      labels: int32 [H0, W0], ids into the vocabulary the prediction was made over.
      confidence: float32 [H0, W0], softmax probability of the predicted class (computed at the
        network's input size, resized bilinearly).
    """

    labels: np.ndarray
    confidence: np.ndarray


@dataclasses.dataclass
class Predictor:
    """A restored model and what it needs to predict like evaluation does."""

    cfg: ml_collections.ConfigDict  # the config the checkpoint was trained with
    checkpoint: str  # <workdir>/checkpoints/<step>
    step: int
    model: Any
    params: Any
    union: tuple[str, ...]  # the trained vocabulary (rows of the class table)
    default_names: tuple[str, ...]  # the config's evaluation vocabulary
    bank: Any  # one CA group's memory bank (no group axis), or None without the CA-classifier
    ca: CASettings
    max_labels: int
    device: Any  # holds the restored state; attention maps run here
    devices: list  # images go round-robin over these

    def __post_init__(self):
        self._rows = {name: i for i, name in enumerate(self.union)}

        @jax.jit
        def predict(params, index, images):
            return self.model.apply({"params": params}, images, index, train=False)[0]

        self._predict = predict
        self._replicas = {self.device: self.params}
        self._attention = None

    # ---- vocabulary ----

    def resolve(self, names: Sequence[str], where: str) -> tuple[str, ...]:
        """Checks and canonicalises requested class names: each must be a trained class;
        an ImageNet wnid (n02084071) or any WordNet lemma of a synset ("domestic dog", spaces
        or underscores) stands for its class.

        Raises:
          ConfigError naming `where`, the unknown names and the closest known ones.
        """
        resolved = [_alias(n.strip(), self._rows) for n in names]
        catalog.check_names(resolved, where)
        unknown = [n for n in resolved if n not in self._rows]
        if unknown:
            name = unknown[0]
            close = difflib.get_close_matches(name, self.union, n=5, cutoff=0.6)
            hint = f"; closest: {', '.join(close)}" if close else ""
            more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
            raise ConfigError(
                f"{where}: {name!r}{more} is not one of the {len(self.union)} classes this model "
                f"was trained on{hint}"
            )
        return tuple(resolved)

    def index(self, names: Sequence[str]) -> np.ndarray:
        """[N] int32 rows of the class table for `names` (already resolved)."""
        return np.asarray([self._rows[n] for n in names], np.int32)

    # ---- prediction ----

    def network_input(self, rgb: np.ndarray) -> np.ndarray:
        """uint8 [H0, W0, 3] -> normalised float32 at the evaluation size (EvalResize)."""
        short = int(self.cfg.eval.short_side)
        h, w = rgb.shape[:2]
        new_h, new_w = transforms.rescale_size(h, w, (4 * short, short))
        return transforms.normalize(transforms.resize_bilinear(rgb, new_h, new_w))

    def _params_on(self, device) -> Any:
        if device not in self._replicas:
            self._replicas[device] = jax.device_put(self.params, device)
        return self._replicas[device]

    def runner(self, index: np.ndarray, full_batches: bool = True) -> slide.SlideRunner:
        """Evaluation's sliding-window runner over the classes of `index`, on `devices` (see
        `slide.SlideRunner` for `full_batches`)."""
        index = np.asarray(index, np.int32)
        on_device = {d: (self._params_on(d), jax.device_put(index, d)) for d in self.devices}

        def predict_fn(images):
            return self._predict(*on_device[images.device], images)

        return slide.SlideRunner(
            predict_fn,
            num_classes=len(index),
            crop=int(self.cfg.eval.crop_size),
            stride=int(self.cfg.eval.stride),
            mode=self.cfg.eval.mode,
            batch=int(self.cfg.eval.get("batch_windows", 8)),
            devices=self.devices,
            confidence=True,
            full_batches=full_batches,
            class_chunk=self.class_chunk,
        )

    @property
    def class_chunk(self) -> int:
        """eval.class_chunk; checkpoints from before the key get configs/base.py's default."""
        return int(self.cfg.eval.get("class_chunk", 1024))

    def segment_many(
        self, images: Iterable[tuple[Any, np.ndarray]], index: np.ndarray
    ) -> Iterator[tuple[Any, Prediction]]:
        """(tag, uint8 RGB [H0, W0, 3]) -> (tag, Prediction), in order: the predictions
        evaluation scores. Windows of consecutive images share model calls and images go
        round-robin over `devices`."""
        yield from self._segment(images, index, full_batches=True)

    def segment(self, rgb: np.ndarray, index: np.ndarray) -> Prediction:
        """Segments one uint8 RGB [H0, W0, 3] over the classes of `index` (see `index`) with
        as few model calls as its windows need (interactive use; see `segment_many`)."""
        ((_, prediction),) = self._segment([(None, rgb)], index, full_batches=False)
        return prediction

    def _segment(self, images, index, full_batches):
        items = ((tag, self.network_input(rgb), rgb.shape[:2]) for tag, rgb in images)
        for tag, labels, confidence in self.runner(index, full_batches).run(items):
            yield tag, Prediction(labels, confidence)

    def attention(self, rgb: np.ndarray, index: np.ndarray, class_id: int) -> np.ndarray:
        """The CA-classifier's attention map (SPEC 2.4) of class `class_id` (an id into `index`)
        on the image, [H0, W0] in [0, 1]; needs a model trained with the CA-classifier."""
        if self.bank is None:
            raise ConfigError(
                f"{self.checkpoint} has no memory bank (trained with ca.enabled=False): "
                "attention maps need a LarvSeg (CA-classifier) model"
            )
        if self._attention is None or self._attention[0] is not index:
            fn = ca_visualize.attention_fn(
                self.model, self.params, self.bank, index, self.ca, max_labels=self.max_labels
            )
            self._attention = (index, fn)
        image = self.network_input(rgb)
        present = np.zeros(len(index), bool)
        present[class_id] = True
        _, att = self._attention[1](jnp.asarray(image), jnp.asarray(present))
        att = interp.resize_bilinear(att[0][..., None], tuple(rgb.shape[:2]))[..., 0]
        return np.clip(np.asarray(att), 0.0, 1.0)


class ImageError(ValueError):
    """A file that is not a readable image (the message says why)."""


def read_rgb(source: str | bytes, max_pixels: int = 4096 * 4096 * 4) -> np.ndarray:
    """uint8 [H, W, 3] of an image file or its bytes, as a viewer shows it: EXIF orientation
    applied; grayscale, CMYK, RGBA and palette images converted to RGB.

    Raises:
      ImageError: not an image, truncated, or more than `max_pixels` (a decompression bomb).
    """
    import io

    from PIL import Image, ImageOps

    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            if image.mode in ("RGBA", "LA", "PA") or (
                image.mode == "P" and "transparency" in image.info
            ):
                image = image.convert("RGBA")
                white = Image.new("RGBA", image.size, (255, 255, 255, 255))
                image = Image.alpha_composite(white, image)  # transparent = white, as viewers do
            return np.asarray(image.convert("RGB"))
    except Image.DecompressionBombError as e:
        raise ImageError(f"too large ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"not a readable image ({e})") from None


def _key(name: str) -> str:
    """Spaces and underscores alike (ImageNet lists differ: "chest of drawers", "rock_climbing")."""
    return name.strip().replace(" ", "_")


@functools.cache
def _imagenet_aliases() -> tuple[dict[str, str], dict[str, list[str]]]:
    """(wnid -> class-name key, lemma key -> wnids) over the catalog's ImageNet synsets.

    Class names are each synset's first WordNet lemma; classes/imagenet_lemmas.txt holds all of
    a synset's lemmas (classes/README.md).
    """
    names = {
        w: _key(n) for w, n in zip(catalog.read_keys("i11k.txt"), catalog.read_names("i11k.txt"))
    }
    lemmas: dict[str, list[str]] = {}
    for wnid, text in catalog.read_columns("imagenet_lemmas.txt"):
        for lemma in text.split(","):
            lemmas.setdefault(_key(lemma), []).append(wnid)
    return names, lemmas


def _alias(name: str, union: dict) -> str:
    """A requested name as a trained class name: itself, or the class of an ImageNet wnid or
    WordNet lemma (unchanged when none applies; the caller reports it)."""
    if name in union:
        return name
    trained = {_key(n): n for n in union}
    wnid_names, lemmas = _imagenet_aliases()
    wnids = [name] if WNID.match(name) else lemmas.get(_key(name), [])
    found = {w: trained[wnid_names[w]] for w in wnids if wnid_names.get(w) in trained}
    if len(set(found.values())) > 1:
        options = ", ".join(f"{w} ({n})" for w, n in sorted(found.items())[:6])
        raise ConfigError(f"{name!r} is a lemma of several classes: {options}; give the wnid")
    return next(iter(found.values()), trained.get(_key(name), name))


def checkpoint_location(
    workdir: str | None = None, step: int | None = None, checkpoint: str | None = None
) -> tuple[str, int]:
    """(checkpoints directory, step) from --workdir [--step] or --checkpoint DIR/<step>."""
    if checkpoint:
        path = os.path.abspath(checkpoint.rstrip("/"))
        name = os.path.basename(path)
        if not name.isdigit() or not os.path.isdir(path):
            raise MissingError(
                f"--checkpoint {checkpoint!r} is not a checkpoint folder (<workdir>/checkpoints/"
                "<step>); or pass --workdir"
            )
        return os.path.dirname(path), int(name)
    if not workdir:
        raise ConfigError("give --workdir DIR (its latest checkpoint) or --checkpoint DIR/<step>")
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    steps = (
        sorted(int(n) for n in os.listdir(directory) if n.isdigit())
        if (os.path.isdir(directory))
        else []
    )
    if not steps:
        raise MissingError(f"no checkpoint in {directory}: train first or fix --workdir")
    if step is None:
        return directory, steps[-1]
    if step not in steps:
        raise MissingError(f"no checkpoint of step {step} in {directory}; available: {steps}")
    return directory, step


def load(
    workdir: str | None = None,
    *,
    step: int | None = None,
    checkpoint: str | None = None,
    devices: Sequence[Any] | None = None,
) -> Predictor:
    """Restores a checkpoint and its config onto the first of `devices` (default: the local
    ones); predictions go round-robin over all of them."""
    directory, step = checkpoint_location(workdir, step, checkpoint)
    devices = list(jax.local_devices() if devices is None else devices)
    device = devices[0]
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(create=False))
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        cfg = ml_collections.ConfigDict(meta["meta"]["config"])
        template = experiment.build_template(cfg)
        place = jax.sharding.SingleDeviceSharding(device)
        target = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=place),
            template.abstract_state,
        )
        state = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
        )["state"]
    finally:
        manager.close()
    settings = template.settings
    bank = None
    if state.bank is not None:  # the first group whose source trains the CA-classifier
        ca_groups = [
            g for g, s in enumerate(settings.group_source_ids) if settings.sources[s].ca_weight
        ]
        if ca_groups:
            bank = jax.tree.map(lambda x: x[ca_groups[0]], state.bank._replace(feats=None))
    return Predictor(
        cfg=cfg,
        checkpoint=os.path.join(directory, str(step)),
        step=step,
        model=template.model,
        params=state.params,
        union=tuple(template.voc.union),
        default_names=tuple(template.voc.eval_names),
        bank=bank,
        ca=settings.ca,
        max_labels=settings.max_labels,
        device=device,
        devices=devices,
    )
