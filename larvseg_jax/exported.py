"""Runs a model written by `python -m larvseg_jax.export` with nothing but jax and numpy.

  from larvseg_jax import exported
  model = exported.load("model_dir")
  labels, confidence = model(images)  # uint8 [B, H, W, 3] at model.image_size
  model.classes[labels[0, 0, 0]]

This module must not import flax, orbax or the training code: an exported model is meant to
run where only jax is installed (tests/test_export.py checks it).
"""

import json
import os

import jax
import numpy as np

FORMAT = 1  # bumped when the directory layout changes


class ExportedModel:
    """A deserialized inference function with its weights and class list."""

    def __init__(self, directory: str):
        with open(os.path.join(directory, "export.json")) as f:
            self.info = json.load(f)
        if self.info.get("format") != FORMAT:
            raise ValueError(
                f"{directory} was exported in format {self.info.get('format')}; this loader "
                f"reads format {FORMAT}: export it again with this version"
            )
        with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
            self._exported = jax.export.deserialize(bytearray(f.read()))
        with np.load(os.path.join(directory, "params.npz")) as weights:
            self._params = [weights[f"p{i}"] for i in range(len(weights.files))]
        with open(os.path.join(directory, "classes.txt")) as f:
            self.classes = tuple(line.rstrip("\n") for line in f)
        self.image_size = tuple(self.info["image_size"])

    def __call__(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [B, H, W, 3] RGB at `image_size` -> (int32 labels [B, H, W] indexing
        `classes`, float32 confidence [B, H, W]: softmax probability of the predicted class)."""
        images = np.asarray(images)
        if images.ndim == 3:
            raise ValueError(
                f"images must be [B, H, W, 3]; got one image {images.shape}: add a batch axis"
            )
        if images.dtype != np.uint8 or images.shape[1:] != (*self.image_size, 3):
            raise ValueError(
                f"images must be uint8 [B, {self.image_size[0]}, {self.image_size[1]}, 3]; got "
                f"{images.dtype} {images.shape}"
            )
        labels, confidence = self._exported.call(self._params, images)
        return np.asarray(labels), np.asarray(confidence)


def load(directory: str) -> ExportedModel:
    """The model in `directory` (written by `python -m larvseg_jax.export`)."""
    if not os.path.exists(os.path.join(directory, "export.json")):
        raise FileNotFoundError(
            f"{directory} holds no exported model (export.json is written last by "
            "`python -m larvseg_jax.export`)"
        )
    return ExportedModel(directory)
