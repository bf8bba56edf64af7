"""Table 3 LarvSeg, C171 + WA847 + I585 (paper: 13.2 / 30.4 / 11.1 on A847).

Official: configs/coseg_coco171_ade847w_in585/
vitb16_320k_wa847_c171_i585_s100_ib0.2_ab0.2_co_ic0.1_ac0.1_mbs20_wu1_fg20_bg5_bgt0.35_mse{2.0,1.0}.py
(both thresholds were launched): `:mse=1.0` selects the other.
    python main.py --config configs/larvseg_c171_wa847_i585.py --workdir runs/larvseg_c171_wa847_i585
"""

from configs import base
from configs.paper import paper_config


def get_config(arg=None):
    args = base.parse_args(arg, mse=2.0)
    cfg = paper_config(
        None,
        sources=("wa847", "c171", "i585"),
        ratio=(3, 3, 2),
        basic_weights=(0.2, 1.0, 0.2),
        ca_weights=(0.1, 0.0, 0.1),
        eval_source="a847",
    )
    cfg.loss.sample_classes = 100
    cfg.ca.bg_thresh = 0.35
    cfg.ca.bg_mse_thresh = args.mse
    return cfg
