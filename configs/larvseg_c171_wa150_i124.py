"""Tables 3/4 LarvSeg, C171 + WA150 + I124 (paper: 33.7 / 41.3 / 28.8), and the Table 4 ablation.

Official: configs/coseg_coco171_ade150w_in124/
vitb16_320k_wa150_c171_i124_ib0.2_ab0.2_co_ic0.1_ac0.1_mbs20_wu1_fg40_bg5_bgt0.35_mse2.0.py
    python main.py --config configs/larvseg_c171_wa150_i124.py --workdir runs/larvseg_c171_wa150_i124
Table 4 (CA-classifier on one source only):
    --config configs/larvseg_c171_wa150_i124.py:ca_on=i124    (paper: 32.1 / 40.8 / 26.6)
    --config configs/larvseg_c171_wa150_i124.py:ca_on=wa150   (paper: 33.1 / 41.0 / 28.2)
"""

from configs import base
from configs.paper import paper_config, source

CA_ON = {"both": ("wa150", "i124"), "i124": ("i124",), "wa150": ("wa150",)}  # λaux 0.1 on these


def get_config(arg=None):
    args = base.parse_args(arg, ca_on="both", topk=40)
    if args.ca_on not in CA_ON:
        raise ValueError(f"ca_on must be one of {sorted(CA_ON)}, got {args.ca_on!r}")
    ca = {name: 0.1 if name in CA_ON[args.ca_on] else 0.0 for name in ("wa150", "i124")}
    cfg = paper_config(
        None,
        eval_source="a150",
        wa150=source(0, ratio=3, weight=0.2, ca_weight=ca["wa150"]),
        c171=source(1, ratio=3, weight=1.0),
        i124=source(2, ratio=2, weight=0.2, ca_weight=ca["i124"]),
    )
    cfg.ca.topk = args.topk
    cfg.ca.bg_thresh = 0.35
    cfg.ca.bg_mse_thresh = 2.0
    return cfg
