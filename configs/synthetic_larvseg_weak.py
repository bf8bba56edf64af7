"""LarvSeg with multi-label weak data only (the C171+WA150 analogue, 4:4 groups).

python main.py --config configs/synthetic_larvseg_weak.py --workdir runs/larvseg_weak
"""

from configs import synthetic_baseline_weak, synthetic_larvseg


def get_config(arg=None):
    cfg = synthetic_baseline_weak.get_config(arg)
    larv = synthetic_larvseg.get_config()
    cfg.ca = larv.ca
    return cfg
