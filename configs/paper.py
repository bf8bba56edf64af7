"""Shared settings of the paper's runs (SPEC 0, 4, 7, 13): ViT-B/16, SGD 1e-3 poly, 320k steps.

Experiment files call `paper_config(...)` with their sources and weights and change only what
differs. The AugReg weights are not downloaded: pass their path with
`--config.model.pretrained=/path/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz`.
"""

from collections.abc import Sequence

from configs import base

CROP = {"seg": 512, "weak": 512, "single": 320}  # SPEC 4: 512 crops, ImageNet 320
KINDS = {
    "c171": "seg",
    "a150_seg": "seg",
    "a847_seg": "seg",
    "wa150": "weak",
    "wa847": "weak",
    "i124": "single",
    "i585": "single",
    "i11k": "single",
}


def paper_config(
    arg: str | None,
    *,
    sources: Sequence[str],
    ratio: Sequence[int],
    basic_weights: Sequence[float],
    eval_source: str,
    ca_weights: Sequence[float] | None = None,
):
    """ViT-B/16 + the official schedule; `ca_weights` turns the CA-classifier on."""
    cfg = base.get_config(arg)
    cfg.model.variant = "B/16"
    cfg.model.pos_grid = (32, 32)  # the 384-px AugReg table resized to 512 / 16 at load
    cfg.model.drop_path_rate = 0.1
    cfg.data.dir = "data"
    cfg.data.sources = tuple(sources)
    cfg.data.ratio = tuple(ratio)
    cfg.data.num_groups = 8  # the paper's 8 GPUs
    cfg.data.images_per_group = 2
    cfg.data.crop_sizes = tuple(CROP[KINDS[s]] for s in sources)
    cfg.data.scale_ranges = tuple((0.5, 2.0) for _ in sources)
    cfg.data.max_labels = 48
    cfg.data.num_workers = 4
    cfg.data.eval_source = eval_source
    cfg.loss.basic_weights = tuple(basic_weights)
    cfg.loss.ca_weights = tuple(ca_weights) if ca_weights else tuple(0.0 for _ in sources)
    cfg.ca.enabled = ca_weights is not None
    cfg.optim.lr = 1e-3
    cfg.train.total_steps = 320_000
    cfg.train.log_every_steps = 50
    cfg.train.checkpoint_every_steps = 8000
    cfg.train.eval_every_steps = 8000
    cfg.eval.short_side = 512
    cfg.eval.crop_size = 512
    cfg.eval.stride = 512
    cfg.eval.mode = "slide"
    return cfg
