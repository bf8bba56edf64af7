"""The one reader of the ml_collections config: checks it whole, then builds plain objects.

Every other module takes plain arguments (STYLE 2). `validate` runs before any data is read or
generated, so a typo in a value fails at once with the key's name; `build_setup` then turns the
config into the vocabulary, model, optimizer, step settings and input pipelines of a run.
"""

import dataclasses
import functools
import json
import os
import socket
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from larvseg_jax import checkpoint, groups, sharding, vocab
from larvseg_jax.ca_classifier import CASettings
from larvseg_jax.data import catalog, pipeline, synthetic
from larvseg_jax.errors import ConfigError, MissingError, WorkdirError
from larvseg_jax.models import matmul, segmenter, vit
from larvseg_jax.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLS
from larvseg_jax.optim import make_optimizer
from larvseg_jax.train_step import (
    SourceSpec,
    StepSettings,
    create_train_state,
    state_shardings,
)

SEG_NORMALIZE = ("all_pixels", "valid_pixels")
EVAL_MODES = ("slide", "whole")


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """What the training loop and its evaluations need from the config."""

    seed: int
    total_steps: int
    log_every_steps: int
    checkpoint_every_steps: int
    eval_every_steps: int
    max_checkpoints: int
    keep_checkpoints_every_steps: int  # 0 = only the max_checkpoints most recent are kept
    nonfinite: str  # "stop" | "skip": what a step with a NaN/inf loss or gradient does
    max_labels: int  # named in the warning about labels the CA pair lists could not hold
    pretrained: str  # AugReg .npz for the backbone, "" = random init
    pos_grid: tuple[int, int]
    eval_source: str
    eval_step: int  # checkpoint --mode eval restores; -1 = latest
    eval_mode: str  # "slide" | "whole"
    eval_short_side: int
    eval_crop: int
    eval_stride: int
    eval_max_images: int
    eval_batch_windows: int  # windows per model call and device
    eval_class_chunk: int  # classes accumulated at a time for large vocabularies; 0 = all
    eval_frequency_buckets: tuple[int, int]  # (rare_max, common_max) training images
    num_panels: int


@dataclasses.dataclass
class Setup:
    """Everything a run builds from its config, shared by training and evaluation."""

    workdir: str
    data_dir: str
    mesh: Any
    voc: vocab.Vocabulary
    settings: StepSettings
    loop: LoopSettings
    streams: tuple[pipeline.StreamSpec, ...]
    data_options: dict  # the pipeline's plain keyword options (images_per_group, workers, ...)
    config_json: dict  # the whole config, stored with every checkpoint
    model: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    init_fn: Any  # rng -> TrainState
    state_shardings: Any
    abstract_state: Any


def ordered_sources(cfg: ml_collections.ConfigDict) -> list[tuple[str, Any]]:
    """(name, entry) of data.sources in their `order` (the official rank % n order)."""
    return sorted(cfg.data.sources.items(), key=lambda item: item[1].order)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(f"config {message}")


def _int(value: Any, key: str) -> None:
    """A whole number (a config file may hold 1e4 or "8" where an int is meant)."""
    _check(
        isinstance(value, int) and not isinstance(value, bool),
        f"{key}={value!r} must be a whole number (it is a {type(value).__name__})",
    )


def _one_of(value: Any, allowed: tuple, key: str) -> None:
    _check(value in allowed, f"{key}={value!r} is unknown; use one of {', '.join(allowed)}")


def _validate_sources(cfg: ml_collections.ConfigDict) -> None:
    for name, entry in cfg.data.sources.items():
        for field in ("order", "ratio", "crop"):
            _int(entry[field], f"data.sources.{name}.{field}")
    entries = ordered_sources(cfg)
    _check(bool(entries), "data.sources is empty: name at least one training source")
    for name, entry in entries:
        key = f"data.sources.{name}"
        dataset = catalog.get(name, key)
        _check(
            dataset.kind in catalog.TRAIN_KINDS,
            f"{key}: {name!r} is an evaluation set (kind {dataset.kind!r}); train on one of "
            + ", ".join(n for n, d in catalog.DATASETS.items() if d.kind in catalog.TRAIN_KINDS),
        )
        _check(entry.ratio >= 1, f"{key}.ratio={entry.ratio} must be >= 1")
        _check(entry.crop >= 1, f"{key}.crop={entry.crop} must be >= 1")
        lo, hi = entry.scale_range
        _check(0 < lo <= hi, f"{key}.scale_range={tuple(entry.scale_range)} must be 0 < lo <= hi")
        # The short side is rescaled to crop * r, r ~ U[lo, hi) (pipeline.train_transforms).
        _check(
            hi >= 1.0,
            f"{key}.scale_range={tuple(entry.scale_range)} never makes an image as large as its "
            f"{entry.crop}-px crop (short side rescaled to at most {hi:g} x {entry.crop} px): "
            "every crop would be part padding; raise the upper bound to at least 1.0",
        )
        _check(entry.weight >= 0 and entry.ca_weight >= 0, f"{key}: weights must be >= 0")
    orders = sorted(entry.order for _, entry in entries)
    _check(
        orders == list(range(len(entries))),
        f"data.sources.*.order are {orders}; give each source one of 0..{len(entries) - 1}",
    )
    groups.group_sources(
        [n for n, _ in entries], [e.ratio for _, e in entries], cfg.data.num_groups
    )
    eval_set = catalog.get(cfg.data.eval_source, "data.eval_source")
    _check(
        eval_set.kind == "eval",
        f"data.eval_source={cfg.data.eval_source!r} is a training set; use one of "
        + ", ".join(n for n, d in catalog.DATASETS.items() if d.kind == "eval"),
    )
    if cfg.data.base_from:
        catalog.get(cfg.data.base_from, "data.base_from")
    names = [n for n, _ in entries] + [cfg.data.eval_source]
    kinds = {catalog.get(n).synthetic for n in names}
    _check(
        len(kinds) == 1,
        f"data.sources and data.eval_source mix synthetic and real datasets ({', '.join(names)})",
    )


NONFINITE_POLICIES = ("stop", "skip")


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks every value the run depends on; a ConfigError names the first bad key."""
    _one_of(cfg.model.variant, tuple(vit.VARIANTS), "model.variant")
    _one_of(cfg.model.pos_resize_rule, vit.POS_RESIZE_RULES, "model.pos_resize_rule")
    _one_of(cfg.model.attention, ATTENTION_IMPLS, "model.attention")
    _one_of(cfg.model.get("gemm", "auto"), matmul.GEMM_IMPLEMENTATIONS, "model.gemm")
    _one_of(cfg.model.dtype, ("float32", "bfloat16", "float16"), "model.dtype")
    if cfg.model.pretrained and not os.path.exists(cfg.model.pretrained):
        raise MissingError(
            f"config model.pretrained={cfg.model.pretrained!r}: no such file; give the path of "
            "the AugReg ViT-B/16 .npz"
        )
    _validate_sources(cfg)
    for key in ("num_groups", "images_per_group", "max_labels", "num_workers", "prefetch"):
        _int(cfg.data[key], f"data.{key}")
    for key in ("total_steps", "log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        _int(cfg.train[key], f"train.{key}")
    for key in ("max_checkpoints", "keep_checkpoints_every_steps"):
        _int(cfg.train[key], f"train.{key}")
    for key in ("memory_size", "topk", "warm_up"):
        _int(cfg.ca[key], f"ca.{key}")
    _int(cfg.seed, "seed")
    _check(cfg.data.images_per_group >= 1, "data.images_per_group must be >= 1")
    _check(cfg.data.max_labels >= 1, "data.max_labels must be >= 1")
    _one_of(cfg.loss.seg_normalize, SEG_NORMALIZE, "loss.seg_normalize")
    _check(cfg.loss.downsample_rate >= 1, "loss.downsample_rate must be >= 1")
    _check(cfg.loss.sample_classes >= 0, "loss.sample_classes must be >= 0 (0 = all classes)")
    _check(cfg.ca.memory_size >= 1 and cfg.ca.topk >= 1, "ca.memory_size and ca.topk must be >= 1")
    _check(
        not cfg.ca.single_image or (cfg.ca.memory_size == 1 and cfg.ca.warm_up == 0),
        "ca.single_image needs ca.memory_size=1 and ca.warm_up=0 (SPEC 2.5)",
    )
    if cfg.ca.enabled:  # each CA pair enqueues its top-K feature pixels (SPEC 2.4 step 5)
        patch = vit.VARIANTS[cfg.model.variant]["patch_size"]
        for name, entry in cfg.data.sources.items():
            pixels = (entry.crop // patch) ** 2
            _check(
                entry.ca_weight == 0 or cfg.ca.topk <= pixels,
                f"ca.topk={cfg.ca.topk} exceeds the {pixels} feature pixels of a "
                f"{entry.crop}-px crop of data.sources.{name} (patch {patch}): lower ca.topk "
                "or raise the crop",
            )
    _check(cfg.train.total_steps >= 1, "train.total_steps must be >= 1")
    _one_of(cfg.train.nonfinite, NONFINITE_POLICIES, "train.nonfinite")
    for key in ("log_every_steps", "checkpoint_every_steps", "eval_every_steps"):
        _check(cfg.train[key] >= 1, f"train.{key} must be >= 1")
    _check(cfg.train.max_checkpoints >= 1, "train.max_checkpoints must be >= 1")
    keep, every = cfg.train.keep_checkpoints_every_steps, cfg.train.checkpoint_every_steps
    _check(
        keep >= 0 and keep % every == 0,
        f"train.keep_checkpoints_every_steps={keep} must be 0 or a multiple of "
        f"train.checkpoint_every_steps={every} (only saved steps can be kept)",
    )
    _one_of(cfg.eval.mode, EVAL_MODES, "eval.mode")
    for key in ("short_side", "crop_size", "stride", "batch_windows"):
        _int(cfg.eval[key], f"eval.{key}")
        _check(cfg.eval[key] >= 1, f"eval.{key} must be >= 1")
    _int(cfg.eval.class_chunk, "eval.class_chunk")
    _check(cfg.eval.class_chunk >= 0, "eval.class_chunk must be >= 0 (0 = never chunk)")
    buckets = tuple(cfg.eval.frequency_buckets)
    _check(
        len(buckets) == 2
        and all(isinstance(t, int) and not isinstance(t, bool) for t in buckets)
        and 0 <= buckets[0] < buckets[1],
        f"eval.frequency_buckets={buckets} must be two ints 0 <= rare_max < common_max, "
        "e.g. (10, 100)",
    )
    synthetic.fingerprint(cfg.data.synthetic)  # unknown knobs


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        # One probe per process: processes of a multi-process run share the workdir.
        probe = os.path.join(workdir, f".write_test_{socket.gethostname()}_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise WorkdirError(
            f"workdir {workdir!r} is not writable ({e.strerror}): pick another --workdir"
        ) from e


def prepare_data(cfg: ml_collections.ConfigDict) -> str:
    """The data dir of the run; the synthetic world is generated (once, cached) if named."""
    if catalog.get(cfg.data.eval_source).synthetic:
        return synthetic.ensure_synthetic(
            cfg.data.dir or synthetic.default_root(), cfg.data.synthetic
        )
    if not cfg.data.dir:
        raise ConfigError(
            "config data.dir is empty: point it at the folder that holds larvseg_records/ "
            "(written by data_prep/)"
        )
    if not os.path.isdir(cfg.data.dir):
        raise MissingError(
            f"config data.dir={cfg.data.dir!r} does not exist: point it at the folder that "
            "holds larvseg_records/ (python -m data_prep.prepare --out DIR writes it)"
        )
    return cfg.data.dir


def build_vocabulary(cfg: ml_collections.ConfigDict) -> vocab.Vocabulary:
    """Union of the training and evaluation vocabularies plus the base/novel split (SPEC 5.3)."""
    datasets = [catalog.get(name) for name, _ in ordered_sources(cfg)]
    eval_set = catalog.get(cfg.data.eval_source)
    union = vocab.build_union([d.class_names for d in datasets] + [eval_set.class_names])
    if cfg.data.base_from:  # e.g. the supervised upper bound reports the paper's C171 split
        supervised = list(catalog.get(cfg.data.base_from).class_names)
    else:
        supervised = [
            n for d in datasets if d.kind in catalog.SUPERVISED_KINDS for n in d.class_names
        ]
    base, novel = vocab.base_novel_split(eval_set.class_names, supervised)
    return vocab.Vocabulary(
        union=union,
        eval_names=eval_set.class_names,
        eval_index=vocab.class_index(union, eval_set.class_names),
        base=tuple(base),
        novel=tuple(novel),
    )


def ca_settings(cfg: ml_collections.ConfigDict) -> CASettings | None:
    if not cfg.ca.enabled:
        return None
    fields = {f.name for f in dataclasses.fields(CASettings)}
    values = {k: v for k, v in cfg.ca.items() if k in fields}
    # A config saved before ca.keep_features existed belongs to a checkpoint holding them.
    values.setdefault("keep_features", True)
    return CASettings(**values)


def build_step_settings(cfg: ml_collections.ConfigDict, voc: vocab.Vocabulary) -> StepSettings:
    entries = ordered_sources(cfg)
    specs = []
    for name, entry in entries:
        dataset = catalog.get(name)
        index = tuple(int(i) for i in vocab.class_index(voc.union, dataset.class_names))
        ca_weight = entry.ca_weight if cfg.ca.enabled and dataset.kind != "seg" else 0.0
        specs.append(
            SourceSpec(name, dataset.kind, index, entry.weight, entry.crop, float(ca_weight))
        )
    names = [name for name, _ in entries]
    plan = groups.group_sources(names, [e.ratio for _, e in entries], cfg.data.num_groups)
    return StepSettings(
        sources=tuple(specs),
        group_source_ids=tuple(names.index(name) for name in plan),
        images_per_group=cfg.data.images_per_group,
        seg_normalize=cfg.loss.seg_normalize,
        downsample_rate=cfg.loss.downsample_rate,
        ca=ca_settings(cfg),
        sample_classes=cfg.loss.sample_classes,
        max_labels=cfg.data.max_labels,
        accumulate_gradients=bool(cfg.train.get("accumulate_gradients", True)),
    )


def build_model(cfg: ml_collections.ConfigDict, num_classes: int) -> segmenter.Segmenter:
    dtype = jnp.dtype(cfg.model.dtype)
    backbone = vit.vit_from_variant(
        cfg.model.variant,
        pos_grid=tuple(cfg.model.pos_grid),
        drop_path_rate=cfg.model.drop_path_rate,
        pos_resize_rule=cfg.model.pos_resize_rule,
        attention=cfg.model.attention,
        dtype=dtype,
        remat=bool(cfg.model.get("remat", False)),
        gemm=cfg.model.get("gemm", "auto"),
    )
    return segmenter.Segmenter(backbone=backbone, num_classes=num_classes, dtype=dtype)


def build_optimizer(cfg: ml_collections.ConfigDict):
    """SGD + poly schedule from cfg.optim over cfg.train.total_steps (SPEC 4)."""
    return make_optimizer(
        lr=cfg.optim.lr,
        end_lr=cfg.optim.end_lr,
        power=cfg.optim.power,
        momentum=cfg.optim.momentum,
        weight_decay=cfg.optim.weight_decay,
        total_steps=cfg.train.total_steps,
    )


def loop_settings(cfg: ml_collections.ConfigDict) -> LoopSettings:
    return LoopSettings(
        seed=cfg.seed,
        total_steps=cfg.train.total_steps,
        log_every_steps=cfg.train.log_every_steps,
        checkpoint_every_steps=cfg.train.checkpoint_every_steps,
        eval_every_steps=cfg.train.eval_every_steps,
        max_checkpoints=cfg.train.max_checkpoints,
        keep_checkpoints_every_steps=cfg.train.keep_checkpoints_every_steps,
        nonfinite=cfg.train.nonfinite,
        max_labels=cfg.data.max_labels,
        pretrained=cfg.model.pretrained,
        pos_grid=tuple(cfg.model.pos_grid),
        eval_source=cfg.data.eval_source,
        eval_step=cfg.eval.step,
        eval_mode=cfg.eval.mode,
        eval_short_side=cfg.eval.short_side,
        eval_crop=cfg.eval.crop_size,
        eval_stride=cfg.eval.stride,
        eval_max_images=cfg.eval.max_images,
        eval_batch_windows=cfg.eval.batch_windows,
        eval_class_chunk=cfg.eval.class_chunk,
        eval_frequency_buckets=tuple(int(t) for t in cfg.eval.frequency_buckets),
        num_panels=cfg.eval.num_panels,
    )


def data_options(cfg: ml_collections.ConfigDict) -> dict:
    """The input pipeline's plain options (see pipeline.make_train_iterator)."""
    return {
        "images_per_group": cfg.data.images_per_group,
        "cat_max_ratio": cfg.data.cat_max_ratio,
        "photometric": cfg.data.photometric,
        "num_workers": cfg.data.num_workers,
        "prefetch": cfg.data.prefetch,
    }


@dataclasses.dataclass
class Template:
    """What a config defines without data or devices: vocabulary, model, optimizer, and the
    train state's init function and shapes (training builds on it; so does inference)."""

    voc: vocab.Vocabulary
    settings: StepSettings
    model: Any
    tx: Any
    schedule: Any
    init_fn: Any
    abstract_state: Any  # ShapeDtypeStructs, no shardings


def build_template(cfg: ml_collections.ConfigDict) -> Template:
    voc = build_vocabulary(cfg)
    settings = build_step_settings(cfg, voc)
    model = build_model(cfg, len(voc.union))
    tx, schedule = build_optimizer(cfg)
    init = functools.partial(
        create_train_state,
        model=model,
        tx=tx,
        image_size=settings.sources[0].crop,
        settings=settings,
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
    return Template(voc, settings, model, tx, schedule, init, abstract)


def build_setup(cfg: ml_collections.ConfigDict, workdir: str) -> Setup:
    """Validates the config, prepares the data dir and builds a run's objects."""
    validate(cfg)
    check_workdir(workdir)
    mesh = sharding.make_mesh()
    groups.groups_per_device(cfg.data.num_groups, mesh.devices.size)
    data_dir = prepare_data(cfg)
    t = build_template(cfg)
    shardings = state_shardings(t.abstract_state, mesh)
    return Setup(
        workdir=workdir,
        data_dir=data_dir,
        mesh=mesh,
        voc=t.voc,
        settings=t.settings,
        loop=loop_settings(cfg),
        streams=tuple(
            pipeline.StreamSpec(name, entry.crop, tuple(entry.scale_range))
            for name, entry in ordered_sources(cfg)
        ),
        data_options=data_options(cfg),
        config_json=json.loads(cfg.to_json_best_effort()),
        model=t.model,
        tx=t.tx,
        schedule=t.schedule,
        init_fn=t.init_fn,
        state_shardings=shardings,
        abstract_state=checkpoint.abstract_with_shardings(t.abstract_state, shardings),
    )
