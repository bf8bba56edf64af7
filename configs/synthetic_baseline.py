"""Baseline (seg CE + image-level CE) on the synthetic world: seg + multi-label + single-label.

    python main.py --config configs/synthetic_baseline.py --workdir runs/baseline

The embedded default: base.py already describes this setting; this file names it.
"""

from configs import base


def get_config(arg=None):
    return base.get_config(arg)
