"""The tiny ViT that golden g was computed with (its g_vit_npz.json), for the ViT tests."""

import json
import pathlib

_GOLDEN = pathlib.Path(__file__).resolve().parents[1] / "goldens" / "g_vit_npz.json"
_VIT = json.loads(_GOLDEN.read_text())["vit"]

TINY = {
    "width": _VIT["embed_dims"],
    "depth": _VIT["num_layers"],
    "num_heads": _VIT["num_heads"],
    "mlp_dim": _VIT["mlp"],
    "patch_size": _VIT["patch_size"],
    "pos_grid": tuple(s // _VIT["patch_size"] for s in _VIT["img_size"]),
}
