"""Table 3 baseline, C171 + WA150 (paper: 28.5 / 40.9 / 20.8 mIoU all / base / novel on A150).

Official: configs/baseline_coco171_ade150w/vitb16_320k_wa150_c171_ab0.1.py (λcls = 0.1, 4:4).
    python main.py --config configs/baseline_c171_wa150.py --workdir runs/baseline_c171_wa150
"""

from configs.paper import paper_config


def get_config(arg=None):
    return paper_config(
        arg, sources=("wa150", "c171"), ratio=(1, 1), basic_weights=(0.1, 1.0), eval_source="a150"
    )
