"""Segmentation only (no image-level data): the lower bound for novel classes on the synthetic world.

python main.py --config configs/synthetic_seg_only.py --workdir runs/seg_only
"""

import ml_collections

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.data.sources = ml_collections.ConfigDict(
        {"syn_seg": base.source(order=0, ratio=1, crop=64, weight=1.0)}
    )
    return cfg
