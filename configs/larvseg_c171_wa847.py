"""Table 3 LarvSeg, C171 + WA847 (paper: 10.9 / 29.0 / 8.7 on A847).

Official: configs/coseg_coco171_ade847w/vitb16_320k_wa847_c171_s100_ab0.2_co_ac0.1_mbs20_wu1_fg20_bg.py
(class sampling s100 on every device).
    python main.py --config configs/larvseg_c171_wa847.py --workdir runs/larvseg_c171_wa847
"""

from configs.paper import paper_config, source


def get_config(arg=None):
    cfg = paper_config(
        arg,
        eval_source="a847",
        wa847=source(0, ratio=1, weight=0.2, ca_weight=0.1),
        c171=source(1, ratio=1, weight=1.0),
    )
    cfg.loss.sample_classes = 100
    return cfg
