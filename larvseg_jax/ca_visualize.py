"""What the CA-classifier attends to: image | class mask | attention map, per (image, class).

Runs the trained model on evaluation images, scores each ground-truth class against one
virtual device's memory bank exactly as the attentive loss does (SPEC 2.4 steps 1-3, labels from
the full ground truth, pairs in loop order), and draws A = sigmoid(upsampled z-scored S_fg - S_bg) as a heat map.
"""

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import ca_bank, ca_classifier, interp


def heat(att: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> uint8 [H, W, 3], dark blue (ignored) to yellow (attended)."""
    a = np.clip(att, 0.0, 1.0)[..., None]
    low, high = np.array([20, 20, 90]), np.array([255, 230, 40])
    return (low + a * (high - low)).astype(np.uint8)


def attention_fn(
    model: Any,
    params: Any,
    bank: ca_bank.Bank,
    cls_index: np.ndarray,
    ca: ca_classifier.CASettings,
    *,
    max_labels: int,
):
    """Jitted (image [H, W, 3] normalised, present bool [N]) -> (labels [L], A [L, H, W]): the
    attention of each present class (in loop order) at the image's size; see the module doc.

    Args:
      bank: one group's bank (no leading group axis).
      cls_index: [N] union rows of the vocabulary the classes of `present` index.
      max_labels: the train step's bound on pairs per image (classes past it are background only).
    """
    index = jnp.asarray(cls_index)
    bank = jax.tree.map(jnp.asarray, bank._replace(feats=None))  # scores never read feats

    @jax.jit
    def attention(image, present):
        _, aux = model.apply({"params": params}, image[None], index, train=False)
        h, w, n = aux["score"].shape[1:]
        # The training computation on a batch of one image; its writes are discarded.
        _, pairs = ca_classifier.attend(
            bank,
            aux["embed"].reshape(1, h * w, -1),
            aux["score"].reshape(1, h * w, n),
            present[None],
            index,
            ca,
            max_labels=max_labels,
        )
        a = pairs["a"][0].reshape(-1, h, w, 1)  # [L, h, w, 1]
        return pairs["label"][0], jax.nn.sigmoid(interp.resize_bilinear(a, image.shape[:2]))[..., 0]

    return attention


def attention_panels(
    model: Any,
    params: Any,
    bank: ca_bank.Bank,
    dataset: Iterable[dict],
    cls_index: np.ndarray,
    class_names: list[str],
    ca: ca_classifier.CASettings,
    max_panels: int = 4,
    *,
    max_labels: int,
) -> list[tuple[str, np.ndarray]]:
    """(title, uint8 [H, 3W, 3]) panels: resized input | GT mask of the class | attention.

    Args:
      bank: one group's bank (no leading group axis).
      dataset: eval dicts with "image" [H, W, 3] (normalised, resized), "label" [H0, W0], "raw".
      cls_index: [N] union rows of the evaluation vocabulary.
      max_labels: the train step's bound on pairs per image (classes past it are background only).
    """
    attention = attention_fn(model, params, bank, cls_index, ca, max_labels=max_labels)
    panels = []
    for example in dataset:
        label = np.asarray(example["label"])
        image = np.asarray(example["image"], np.float32)
        small = np.asarray(interp.resize_nearest_torch(jnp.asarray(label), image.shape[:2]))
        present = np.zeros(len(class_names), bool)
        present[np.unique(small[small >= 0])] = True
        if not present.any():
            continue
        labels, att = attention(jnp.asarray(image), jnp.asarray(present))
        labels, att = np.asarray(labels), np.asarray(att)
        raw = np.asarray(jax.image.resize(example["raw"], image.shape[:2] + (3,), "linear"))
        for j, c in enumerate(labels[: present.sum()]):
            mask = np.where(small == c, 255, 40).astype(np.uint8)[..., None].repeat(3, -1)
            panel = np.concatenate([raw.astype(np.uint8), mask, heat(att[j])], axis=1)
            panels.append((f"{example['id']}/{class_names[c]}", panel))
            if len(panels) >= max_panels:
                return panels
    return panels
