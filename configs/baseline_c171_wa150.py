"""Table 3 baseline, C171 + WA150 (paper: 28.5 / 40.9 / 20.8 mIoU all / base / novel on A150).

Official: configs/baseline_coco171_ade150w/vitb16_320k_wa150_c171_ab0.1.py (λcls = 0.1, 4:4).
    python main.py --config configs/baseline_c171_wa150.py --workdir runs/baseline_c171_wa150
"""

from configs.paper import paper_config, source


def get_config(arg=None):
    return paper_config(
        arg,
        eval_source="a150",
        wa150=source(0, ratio=1, weight=0.1),
        c171=source(1, ratio=1, weight=1.0),
    )
