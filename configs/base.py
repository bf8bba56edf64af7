"""Every config field with its default and meaning; experiment files change only what differs.

Defaults reproduce the official optimisation settings (SPEC 4) on the embedded synthetic world
with a tiny ViT, so `python main.py --config configs/base.py` runs on a laptop CPU.
"""

import ml_collections


def parse_args(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses a config argument "k=v,k2=v2" into typed fields (big_vision's parse_arg).

    Each key must be one of `defaults`, whose type converts the value, so a typo in a sweep
    argument fails at once.
    """
    args = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not defaults:
            raise ValueError(f"this config takes no argument (got {item!r})")
        if not sep or key not in defaults:
            raise ValueError(
                f"config argument {item!r} is not one of {', '.join(defaults)} (form: key=value,...)"
            )
        kind = type(defaults[key])
        try:
            args[key] = value.lower() in ("1", "true", "yes") if kind is bool else kind(value)
        except ValueError:
            raise ValueError(f"config argument {key}={value!r} must be a {kind.__name__}") from None
    return args


def source(
    *,
    order: int,
    ratio: int,
    crop: int,
    weight: float,
    ca_weight: float = 0.0,
    scale_range: tuple[float, float] = (0.5, 2.0),
) -> ml_collections.ConfigDict:
    """One training source, as a row of the paper's tables reads.

    Args:
      order: its place in the official `rank % n` pattern (GPU r holds the source of order
        r % n); orders are 0..n-1.
      ratio: virtual devices (groups) it holds per repeat of the pattern (4:4 or 3:3:2 in the
        paper).
      crop: training crop size (512; 320 for ImageNet in the paper).
      weight: weight of its seg CE or image-level CE (λcls).
      ca_weight: weight of its CA-classifier attentive loss (λaux); used when ca.enabled.
      scale_range: random rescale ratio range.
    """
    return ml_collections.ConfigDict(
        {
            "order": order,
            "ratio": ratio,
            "crop": crop,
            "weight": float(weight),
            "ca_weight": float(ca_weight),
            "scale_range": tuple(float(x) for x in scale_range),
        }
    )


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parse_args(arg)  # the base takes no arguments; reject any
    cfg = ml_collections.ConfigDict()
    cfg.seed = 0  # params, bank, drop-path and data order all derive from it

    # ---- model (SPEC 1.1, 1.3) ----
    cfg.model = ml_collections.ConfigDict()
    cfg.model.variant = "tiny"  # "B/16" (the paper's ViT-B/16) | "tiny" | "micro" (tests)
    cfg.model.drop_path_rate = 0.1  # stochastic depth, linspace(0, rate, depth) per block
    cfg.model.pos_grid = (8, 8)  # grid of the stored position table (32x32 for ViT-B/16 at 512)
    # "shape" resizes the position table whenever the grid differs (fixed by default);
    # "token_count" only when the token count differs (the official rule, SPEC D1).
    cfg.model.pos_resize_rule = "shape"
    # "auto" (the fused C++ kernel on CPU in float32, else "custom_vjp") | "cpu_kernel" |
    # "custom_vjp" (pure XLA, portable) | "xla" | "cudnn" (GPU, bf16); models/attention.py
    cfg.model.attention = "auto"
    # The projections' GEMMs: "auto" (on CPU, the C++ kernel for float32 products of at least
    # 1 GFLOP where the CPU has AVX-512, e.g. ViT-B/16; XLA's dot for the tiny models and
    # elsewhere) | "cpu_kernel" | "xla"; models/matmul.py
    cfg.model.gemm = "auto"
    cfg.model.pretrained = ""  # AugReg .npz to initialise the ViT from; "" = random init
    cfg.model.dtype = "float32"  # compute dtype; params stay float32
    # Recompute each transformer block's activations in the backward pass: the step keeps one
    # [B, N, D] tensor per block instead of all of them, for about a third more compute.
    cfg.model.remat = False

    # ---- data (SPEC 3, 4, 5) ----
    cfg.data = ml_collections.ConfigDict()
    # Where the ArrayRecord sources live (data_prep/ writes them). "" = the synthetic world's
    # cache ($LARVSEG_CACHE or ~/.cache/larvseg_jax), where it is generated once per knobs.
    cfg.data.dir = ""
    # Training sources keyed by dataset code; the catalog (larvseg_jax/data/catalog.py) gives
    # each its kind (seg | weak | single) and vocabulary. Fields of each: see `source` above.
    cfg.data.sources = ml_collections.ConfigDict(
        {
            "syn_weak": source(order=0, ratio=3, crop=64, weight=0.2, ca_weight=0.1),
            "syn_seg": source(order=1, ratio=3, crop=64, weight=1.0),
            "syn_single": source(order=2, ratio=2, crop=48, weight=0.2, ca_weight=0.1),
        }
    )
    cfg.data.num_groups = 8  # virtual devices per step (the paper's 8 GPUs); each holds one source
    cfg.data.images_per_group = 2  # B, images per virtual device (samples_per_gpu)
    cfg.data.cat_max_ratio = 0.75  # RandomCrop re-draw rule (SPEC 4 step 3)
    cfg.data.photometric = True  # mmseg PhotoMetricDistortion
    cfg.data.num_workers = 0  # grain worker processes (0 = in-process)
    cfg.data.prefetch = 2  # host batches prepared ahead of the device
    cfg.data.eval_source = "syn_eval"  # evaluation set (full masks over base + novel)
    cfg.data.base_from = ""  # source whose classes are "base" in eval; "" = the seg sources
    cfg.data.max_labels = 16  # static bound on classes per crop (CA pair lists, sampling)

    # Synthetic world knobs (larvseg_jax/data/synthetic.py documents each).
    cfg.data.synthetic = ml_collections.ConfigDict()
    cfg.data.synthetic.seed = 0
    cfg.data.synthetic.image_size = 64
    cfg.data.synthetic.aspect_max = 1.5  # long/short image side drawn from U[1, aspect_max]
    cfg.data.synthetic.num_seg = 512  # pixel-labelled images over the base classes
    cfg.data.synthetic.num_weak = 512  # multi-label images (labels only)
    cfg.data.synthetic.num_single = 512  # single-label images (ImageNet-like)
    cfg.data.synthetic.num_eval = 64  # fully labelled evaluation images over base + novel
    cfg.data.synthetic.confound = 1.0  # P(novel "boat" sits on "water") in weak/single data

    # ---- losses (SPEC 2) ----
    cfg.loss = ml_collections.ConfigDict()
    cfg.loss.sample_classes = 0  # SPEC 2.6 "s100": softmax over 100 random + present classes
    cfg.loss.seg_normalize = "all_pixels"  # "all_pixels" (faithful, SPEC B10) | "valid_pixels"
    cfg.loss.downsample_rate = 2  # loss grid = input / 2 (SPEC 2.1)

    # ---- CA-classifier (SPEC 2.4, 2.5) ----
    cfg.ca = ml_collections.ConfigDict()
    cfg.ca.enabled = False  # False = the paper's baseline (no memory bank, no attentive loss)
    cfg.ca.memory_size = 20  # M, FIFO slots per class
    cfg.ca.topk = 20  # K, top-scoring pixel features enqueued per (image, label)
    cfg.ca.warm_up = 1  # full bank wraps before a class's attentive loss counts
    cfg.ca.background = True  # background suppression (False reproduces bug B1: A == 0.5)
    cfg.ca.bg_topk = 5  # single-label background candidates: mean of the top-5 pixel scores
    cfg.ca.bg_thresh = 0.2  # ... above this
    cfg.ca.bg_mse_thresh = 1.0  # decorrelation filter threshold
    cfg.ca.single_image = False  # Table 5 single-image variant (needs memory_size 1, warm_up 0)
    cfg.ca.mask_cold_background = False  # fix B2: skip never-written background classes
    cfg.ca.nan_safe_mse = False  # fix B4: epsilon in the decorrelation z-scores
    # The bank's per-slot features [C, M, K, D] are never read by the step (scores use the slot
    # and class means): kept only for parity tests (0.31 GB per group at A150, 25 GB at 21K).
    cfg.ca.keep_features = False

    # ---- optimiser (SPEC 4) ----
    cfg.optim = ml_collections.ConfigDict()
    # SGD base lr (paper: 1e-3 from AugReg weights; the tiny ViT starts from scratch).
    cfg.optim.lr = 0.02
    cfg.optim.end_lr = 1e-5  # poly schedule floor
    cfg.optim.power = 0.9  # poly exponent
    cfg.optim.momentum = 0.9  # PyTorch-style heavy ball
    cfg.optim.weight_decay = 0.0

    # ---- loop ----
    cfg.train = ml_collections.ConfigDict()
    cfg.train.total_steps = 1500  # 320_000 in the paper
    cfg.train.log_every_steps = 100  # progress line + TensorBoard scalars
    cfg.train.checkpoint_every_steps = 500
    cfg.train.eval_every_steps = 1500  # also evaluates at the end
    cfg.train.max_checkpoints = 2  # the most recent ones kept
    cfg.train.keep_checkpoints_every_steps = 0  # also keep these for good (0 = none)
    # A step whose loss or gradients are NaN/inf leaves params, optimizer and bank unchanged;
    # "stop" then ends the run at the next log line naming the step, source and loss term,
    # "skip" goes on and counts such steps (train/skipped_steps in TensorBoard).
    cfg.train.nonfinite = "stop"
    # The global batch is always data.num_groups x data.images_per_group (16 in the paper): on
    # fewer devices each device runs more groups one after another, so the learning rate needs
    # no rescaling. True computes each group's gradient in its own backward pass and sums them,
    # as the official code does (one backward per GPU, summed by DDP): one group's activations
    # live at a time. False differentiates the device's summed loss in one backward pass over all
    # its groups: the same gradients to float rounding, more memory, slower (README "Speed").
    cfg.train.accumulate_gradients = True

    # ---- evaluation (SPEC 7) ----
    cfg.eval = ml_collections.ConfigDict()
    cfg.eval.step = -1  # checkpoint step for --mode eval; -1 = latest
    cfg.eval.mode = "slide"  # "slide" | "whole"
    cfg.eval.short_side = 64  # test resize: short side (512 in the paper)
    cfg.eval.crop_size = 64  # sliding window (512)
    cfg.eval.stride = 64  # sliding stride (512)
    cfg.eval.max_images = -1  # -1 = the whole split
    # Windows per model call and device: the windows of consecutive images share one batch, so
    # evaluation compiles one model program whatever the image sizes (see larvseg_jax/slide.py).
    cfg.eval.batch_windows = 8
    # Vocabularies larger than this are accumulated and resized this many classes at a time
    # (the 11K-21K ImageNet vocabularies: an unchunked 512 x 768 accumulator at 11K classes
    # needs 17 GB); the labels are the same. 0 = never chunk.
    cfg.eval.class_chunk = 1024
    # mIoU per frequency bucket of the training images that carry each class (counted by the
    # converter for the eval set's frequency source, e.g. wa150 for a150): rare = at most 10
    # images, common = 11..100, frequent = more than 100 (the LVIS convention).
    cfg.eval.frequency_buckets = (10, 100)
    cfg.eval.num_panels = 4  # input | GT | prediction panels written to TensorBoard
    return cfg
