"""The 21K-category model (paper Fig. 5, "I21K"): C171 + 11,276 ImageNet-21K synsets.

Official: configs/baseline_coco171_in11k/vitb16_{320k,640k,1280k}_i11k_c171_s100_ib0.2.py, a
*baseline* (no CA-classifier) with class sampling s100, tested on A847 val restricted to the 585
ImageNet classes (SPEC 8). `:steps=1280000` for the paper's schedule.
    python main.py --config configs/baseline_c171_i11k.py --workdir runs/i11k
"""

from configs import base
from configs.paper import paper_config, source


def get_config(arg=None):
    args = base.parse_args(arg, steps=320_000)
    cfg = paper_config(
        None,
        eval_source="a585",
        i11k=source(0, ratio=1, weight=0.2),
        c171=source(1, ratio=1, weight=1.0),
    )
    cfg.loss.sample_classes = 100
    cfg.train.total_steps = args.steps
    return cfg
