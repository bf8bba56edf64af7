"""Table 5 "Single-Image" CA-classifier, C171 + WA150 (paper: 30.1 / 38.6 / 24.8).

Official: configs/coseg_coco171_ade150w/vitb16_320k_wa150_c171_ab0.1_sco_ac0.1_fg{1,10,20,40}_bg.py
(LarvSegHead, SPEC 2.5: M = 1, no warm-up, enqueue before scoring). Which K was reported is
unknown: `:topk=1|10|20|40`.
    python main.py --config configs/larvseg_single_image_c171_wa150.py --workdir runs/single_image
"""

from configs import base, larvseg_c171_wa150


def get_config(arg=None):
    args = base.parse_args(arg, topk=20)
    cfg = larvseg_c171_wa150.get_config(f"memory_size=1,topk={args.topk}")
    cfg.ca.single_image = True
    cfg.ca.warm_up = 0
    return cfg
