"""Tables 3/4 baseline, C171 + WA150 + I124 (paper: 31.3 / 40.7 / 25.3), 3:3:2 groups.

Official: configs/baseline_coco171_ade150w_in124/vitb16_320k_wa150_c171_i124_ib0.2_ab0.2.py
(λcls = 0.2 on both weak sources, not the paper's 0.1).
    python main.py --config configs/baseline_c171_wa150_i124.py --workdir runs/baseline_c171_wa150_i124
"""

from configs.paper import paper_config


def get_config(arg=None):
    return paper_config(
        arg,
        sources=("wa150", "c171", "i124"),
        ratio=(3, 3, 2),
        basic_weights=(0.2, 1.0, 0.2),
        eval_source="a150",
    )
