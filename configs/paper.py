"""Shared settings of the paper's runs (SPEC 0, 4, 7, 13): ViT-B/16, SGD 1e-3 poly, 320k steps.

Experiment files call `paper_config(...)` with their sources and weights and change only what
differs. The AugReg weights are not downloaded: pass their path with
`--config.model.pretrained=/path/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz`.
"""

import ml_collections

from configs import base
from larvseg_jax.data import catalog

CROP = {"seg": 512, "weak": 512, "single": 320}  # SPEC 4: 512 crops, ImageNet 320


def source(order: int, *, ratio: int, weight: float, ca_weight: float = 0.0):
    """A paper source: crop by its kind (catalog), rescale (0.5, 2.0); see base.source."""
    return {"order": order, "ratio": ratio, "weight": weight, "ca_weight": ca_weight}


def paper_config(arg: str | None, *, eval_source: str, **sources) -> ml_collections.ConfigDict:
    """ViT-B/16 + the official schedule; a source with a ca_weight turns the CA-classifier on.

    Args:
      arg: the config argument (the base takes none).
      eval_source: the evaluation set (a150, a847, a585).
      **sources: dataset code -> `source(order, ratio=..., weight=..., ca_weight=...)`.
    """
    cfg = base.get_config(arg)
    cfg.model.variant = "B/16"
    cfg.model.pos_grid = (32, 32)  # the 384-px AugReg table resized to 512 / 16 at load
    cfg.model.drop_path_rate = 0.1
    cfg.data.dir = "data"
    cfg.data.sources = ml_collections.ConfigDict(
        {
            name: base.source(crop=CROP[catalog.get(name).kind], **fields)
            for name, fields in sources.items()
        }
    )
    cfg.data.num_groups = 8  # the paper's 8 GPUs
    cfg.data.images_per_group = 2
    cfg.data.max_labels = 48
    cfg.data.num_workers = 4
    cfg.data.eval_source = eval_source
    cfg.ca.enabled = any(fields.get("ca_weight") for fields in sources.values())
    cfg.optim.lr = 1e-3
    cfg.train.total_steps = 320_000
    cfg.train.log_every_steps = 50
    cfg.train.checkpoint_every_steps = 8000
    cfg.train.eval_every_steps = 8000
    cfg.eval.short_side = 512
    cfg.eval.crop_size = 512
    cfg.eval.stride = 512
    cfg.eval.mode = "slide"
    return cfg
