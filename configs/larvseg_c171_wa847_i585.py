"""Table 3 LarvSeg, C171 + WA847 + I585 (paper: 13.2 / 30.4 / 11.1 on A847).

Official: configs/coseg_coco171_ade847w_in585/
vitb16_320k_wa847_c171_i585_s100_ib0.2_ab0.2_co_ic0.1_ac0.1_mbs20_wu1_fg20_bg5_bgt0.35_mse{2.0,1.0}.py
(both thresholds were launched): `:mse=1.0` selects the other.
    python main.py --config configs/larvseg_c171_wa847_i585.py --workdir runs/larvseg_c171_wa847_i585
"""

from configs import base
from configs.paper import paper_config, source


def get_config(arg=None):
    args = base.parse_args(arg, mse=2.0)
    cfg = paper_config(
        None,
        eval_source="a847",
        wa847=source(0, ratio=3, weight=0.2, ca_weight=0.1),
        c171=source(1, ratio=3, weight=1.0),
        i585=source(2, ratio=2, weight=0.2, ca_weight=0.1),
    )
    cfg.loss.sample_classes = 100
    cfg.ca.bg_thresh = 0.35
    cfg.ca.bg_mse_thresh = args.mse
    return cfg
