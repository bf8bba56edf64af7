"""Colour palettes and side-by-side panels for segmentation masks (eval images, SPEC 7).

Host-side numpy only: these run on a handful of images per evaluation, after the metrics.
"""

import numpy as np


def palette(num_classes: int, seed: int = 0) -> np.ndarray:
    """Deterministic, pairwise-distinct colours, none of them black (black marks ignore).

    Args:
      num_classes: N.
      seed: colours are a fixed function of (N, seed), so panels stay comparable across steps.

    Returns:
      uint8 [N, 3].
    """
    rng = np.random.default_rng(seed)
    colours = np.zeros((0, 3), np.uint8)
    seen = set()
    # Rejection sampling keeps colours unique; channels start at 32 so no class looks like ignore.
    while len(colours) < num_classes:
        draw = rng.integers(32, 256, size=(num_classes, 3), dtype=np.uint8)
        fresh = []
        for c in draw:
            key = c.tobytes()
            if key not in seen:
                seen.add(key)
                fresh.append(c)
        colours = np.concatenate([colours, np.asarray(fresh, np.uint8).reshape(-1, 3)])
    return colours[:num_classes]


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
    out[label < 0] = 0
    return out


def panel(raw: np.ndarray, gt: np.ndarray, pred: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """Input | ground truth | prediction, side by side.

    Args:
      raw: uint8 [H, W, 3] original image.
      gt: int [H, W] ground truth, ignore = -1 (shown black).
      pred: int [H, W] predicted ids.
      colours: uint8 [N, 3].

    Returns:
      uint8 [H, 3 * W, 3].
    """
    raw = np.asarray(raw, np.uint8)
    if raw.shape[:2] != gt.shape or gt.shape != pred.shape:
        raise ValueError(f"shape mismatch: raw {raw.shape}, gt {gt.shape}, pred {pred.shape}")
    return np.concatenate([raw, colorize(gt, colours), colorize(pred, colours)], axis=1)
