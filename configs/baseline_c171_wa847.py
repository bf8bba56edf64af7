"""Table 3 baseline, C171 + WA847 (paper: 8.9 / 28.7 / 6.6 on A847, 92 base / 755 novel).

Official: configs/baseline_coco171_ade847w/vitb16_320k_wa847_c171_ab0.2.py (no class sampling).
    python main.py --config configs/baseline_c171_wa847.py --workdir runs/baseline_c171_wa847
"""

from configs.paper import paper_config, source


def get_config(arg=None):
    return paper_config(
        arg,
        eval_source="a847",
        wa847=source(0, ratio=1, weight=0.2),
        c171=source(1, ratio=1, weight=1.0),
    )
