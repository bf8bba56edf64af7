"""Table 3 "Supervised A150" upper bound: pixel labels for all 150 ADE classes (paper: 48.6).

The official basic segmenter (configs/basic_segmenter/) trained on ADE20K-150 train alone, 8 GPUs
x 2 images, evaluated on A150 val. `:dataset=a847` gives the A847 bound (paper: 18.6).
    python main.py --config configs/supervised_a150.py --workdir runs/supervised_a150
"""

from configs import base
from configs.paper import paper_config, source


def get_config(arg=None):
    args = base.parse_args(arg, dataset="a150")
    if args.dataset not in ("a150", "a847"):
        raise ValueError(f"dataset must be a150 or a847, got {args.dataset!r}")
    cfg = paper_config(
        None,
        eval_source=args.dataset,
        **{f"{args.dataset}_seg": source(0, ratio=1, weight=1.0)},
    )
    cfg.data.base_from = "c171"  # report base/novel with the paper's split
    return cfg
