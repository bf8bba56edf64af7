"""AugReg .npz import into the ViT params tree, with the position-table resize (SPEC 1.2).

The ViT keeps AugReg's parameter names, so the import is a tree map: each leaf path
`a/b/c` of the params tree reads the npz key `a/b/c` (optionally under `opt/target/`).
"""

import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from larvseg_jax import interp
from larvseg_jax.errors import DataError, MissingError

_PREFIX = "opt/target/"
_POS_KEY = "Transformer/posembed_input/pos_embedding"


def _square_grid(rows: int, path: str, key: str) -> tuple[int, int]:
    side = round(np.sqrt(rows))
    if side * side != rows:
        raise DataError(f"{path}: {key} has {rows} grid rows, not a square grid")
    return side, side


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, key + "/"))
        else:
            flat[key] = value
    return flat


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for name in parents:
            node = node.setdefault(name, {})
        node[leaf] = value
    return tree


def load_augreg_npz(
    path: str | os.PathLike,
    params: Mapping[str, Any],
    *,
    pos_grid: tuple[int, int],
    dtype: Any = np.float32,
) -> dict[str, Any]:
    """Reads an AugReg ViT checkpoint into a params tree of the same structure (SPEC 1.2).

    `head/*` and `pre_logits/*` are ignored (the official loader is non-strict about them); every
    params leaf must be present with the same shape. The stored (square) position grid, e.g.
    24x24 for the 384-px checkpoint, is resized to `pos_grid` with PyTorch's bicubic kernel.

    Args:
      path: the .npz file; keys may carry an `opt/target/` prefix.
      params: the ViT's params (e.g. `variables["params"]` or `params["backbone"]`); only its
        structure and shapes are read.
      pos_grid: (h, w) grid of the model's position table.
      dtype: of the returned arrays; float64 (with x64 on) only for parity tests.

    Returns:
      A new params tree (nested dicts) of numpy arrays in `dtype`.

    Raises:
      FileNotFoundError: the file does not exist.
      DataError: a key is missing or a shape does not match (names the file and the key).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise MissingError(f"AugReg checkpoint not found: {path}: fix --config.model.pretrained")
    with np.load(path) as npz:
        stored = {k.removeprefix(_PREFIX): npz[k] for k in npz.files}

    loaded = {}
    for key, leaf in _flatten(params).items():
        if key not in stored:
            raise DataError(f"{path}: missing key {key!r} (also tried {_PREFIX + key!r})")
        value = np.asarray(stored[key], np.float64)
        if key == _POS_KEY and value.ndim == 3:
            grid = _square_grid(value.shape[1] - 1, path, key)
            if grid != tuple(pos_grid):
                # AugReg grids are square (24x24 at 384 px); the model's may not be.
                value = np.asarray(interp.resize_pos_embed(value, grid, tuple(pos_grid)))
        if value.shape != tuple(np.shape(leaf)):
            raise DataError(
                f"{path}: key {key!r} has shape {value.shape}, the model expects {np.shape(leaf)}"
            )
        loaded[key] = value.astype(dtype)
    return _unflatten(loaded)
