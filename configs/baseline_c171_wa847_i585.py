"""Table 3 baseline, C171 + WA847 + I585 (paper: 11.9 / 28.5 / 9.9 on A847), 3:3:2 groups.

Official: configs/baseline_coco171_ade847w_in585/vitb16_320k_wa847_c171_i585_ib0.2_ab0.2.py
    python main.py --config configs/baseline_c171_wa847_i585.py --workdir runs/baseline_c171_wa847_i585
"""

from configs.paper import paper_config, source


def get_config(arg=None):
    return paper_config(
        arg,
        eval_source="a847",
        wa847=source(0, ratio=3, weight=0.2),
        c171=source(1, ratio=3, weight=1.0),
        i585=source(2, ratio=2, weight=0.2),
    )
