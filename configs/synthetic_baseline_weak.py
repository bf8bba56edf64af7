"""Baseline with multi-label weak data only (the C171+WA150 analogue, 4:4 groups).

python main.py --config configs/synthetic_baseline_weak.py --workdir runs/baseline_weak
"""

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.data.sources = ("syn_weak", "syn_seg")
    cfg.data.ratio = (1, 1)
    cfg.data.crop_sizes = (64, 64)
    cfg.data.scale_ranges = ((0.5, 2.0), (0.5, 2.0))
    cfg.loss.basic_weights = (0.1, 1.0)
    cfg.loss.ca_weights = (0.1, 0.0)
    return cfg
