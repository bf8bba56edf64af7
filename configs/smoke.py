"""Seconds-long run for tests and a first look: micro ViT, a handful of synthetic images.

python main.py --config configs/smoke.py --workdir /tmp/smoke
"""

from configs import base


def get_config(arg=None):
    cfg = base.get_config(arg)
    cfg.model.variant = "micro"
    cfg.data.synthetic.num_seg = 16
    cfg.data.synthetic.num_weak = 16
    cfg.data.synthetic.num_single = 16
    cfg.data.synthetic.num_eval = 4
    cfg.data.images_per_group = 1
    cfg.train.total_steps = 6
    cfg.train.log_every_steps = 2
    cfg.train.checkpoint_every_steps = 3
    cfg.train.eval_every_steps = 6
    cfg.eval.num_panels = 2
    return cfg
