"""Segmentation only (no image-level data): the lower bound for novel classes on the synthetic world.

python main.py --config configs/synthetic_seg_only.py --workdir runs/seg_only
"""

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.data.sources = ("syn_seg",)
    cfg.data.ratio = (1,)
    cfg.data.crop_sizes = (64,)
    cfg.data.scale_ranges = ((0.5, 2.0),)
    cfg.loss.basic_weights = (1.0,)
    cfg.loss.ca_weights = (0.0,)
    return cfg
