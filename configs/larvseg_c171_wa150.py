"""Table 3 LarvSeg, C171 + WA150 (paper: 32.4 / 41.3 / 26.8); = Table 5 "Cross-Image" and Table 6.

Official: configs/coseg_coco171_ade150w/vitb16_320k_wa150_c171_ab0.1_co_ac0.1_mbs20_wu1_fg20_bg.py
    python main.py --config configs/larvseg_c171_wa150.py --workdir runs/larvseg_c171_wa150
Table 6 sweeps (K = 40 for the M sweep, M = 20 for the K sweep):
    --config configs/larvseg_c171_wa150.py:memory_size=10,topk=40   (M in 10|20|40|80)
    --config configs/larvseg_c171_wa150.py:topk=10                   (K in 10|20|40|80)
"""

from configs import base
from configs.paper import paper_config, source


def get_config(arg=None):
    args = base.parse_args(arg, memory_size=20, topk=20)
    cfg = paper_config(
        None,
        eval_source="a150",
        wa150=source(0, ratio=1, weight=0.1, ca_weight=0.1),
        c171=source(1, ratio=1, weight=1.0),
    )
    cfg.ca.memory_size = args.memory_size
    cfg.ca.topk = args.topk
    return cfg
