"""Baseline with multi-label weak data only (the C171+WA150 analogue, 4:4 groups).

python main.py --config configs/synthetic_baseline_weak.py --workdir runs/baseline_weak
"""

import ml_collections

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.data.sources = ml_collections.ConfigDict(
        {
            "syn_weak": base.source(order=0, ratio=1, crop=64, weight=0.1, ca_weight=0.1),
            "syn_seg": base.source(order=1, ratio=1, crop=64, weight=1.0),
        }
    )
    return cfg
