"""Tables 3/4 baseline, C171 + WA150 + I124 (paper: 31.3 / 40.7 / 25.3), 3:3:2 groups.

Official: configs/baseline_coco171_ade150w_in124/vitb16_320k_wa150_c171_i124_ib0.2_ab0.2.py
(λcls = 0.2 on both weak sources, not the paper's 0.1).
    python main.py --config configs/baseline_c171_wa150_i124.py --workdir runs/baseline_c171_wa150_i124
"""

from configs.paper import paper_config, source


def get_config(arg=None):
    return paper_config(
        arg,
        eval_source="a150",
        wa150=source(0, ratio=3, weight=0.2),
        c171=source(1, ratio=3, weight=1.0),
        i124=source(2, ratio=2, weight=0.2),
    )
