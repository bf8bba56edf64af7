"""LarvSeg (baseline + CA-classifier) on the synthetic world: seg + multi-label + single-label.

python main.py --config configs/synthetic_larvseg.py --workdir runs/larvseg
"""

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.ca.enabled = True
    cfg.ca.memory_size = 4  # M: the synthetic world has ~100x fewer images per class than ADE
    cfg.ca.topk = 8  # K of the 64 feature-grid pixels
    cfg.ca.bg_thresh = 0.35
    cfg.ca.bg_mse_thresh = 2.0
    return cfg
