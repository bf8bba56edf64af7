"""Turns a config into the plain objects the trainer needs: vocabularies, model, step settings.

Modules never read the config; this is the one place that does (besides the loop's own fields).
"""

import dataclasses
import os

import jax.numpy as jnp
import ml_collections

from larvseg_jax import groups, vocab
from larvseg_jax.ca_classifier import CASettings
from larvseg_jax.data import catalog
from larvseg_jax.data import sources as data_sources
from larvseg_jax.models import segmenter, vit
from larvseg_jax.optim import make_optimizer
from larvseg_jax.train_step import SourceSpec, StepSettings
from larvseg_jax.vocab import Vocabulary

SUPERVISED_KINDS = ("seg",)
IMAGE_LEVEL_KINDS = ("weak", "single")


@dataclasses.dataclass(frozen=True)
class SourceMeta:
    name: str
    kind: str  # "seg" | "weak" | "single" | "eval"
    class_names: tuple[str, ...]


def source_meta(name: str, ddir: str) -> SourceMeta:
    """Kind and vocabulary of a source: the catalog for the paper's datasets (no data needed),
    the records' own metadata otherwise (the synthetic world)."""
    if name in catalog.CARDS:
        return SourceMeta(name, catalog.CARDS[name].kind, catalog.class_names(name))
    info = data_sources.source_info(name, ddir)
    return SourceMeta(info.name, info.kind, tuple(info.class_names))


def data_dir(cfg: ml_collections.ConfigDict, workdir: str) -> str:
    return cfg.data.dir or os.path.join(workdir, "data")


def _per_source(values, key: str, cfg: ml_collections.ConfigDict) -> tuple:
    values = tuple(values)
    if len(values) != len(cfg.data.sources):
        raise ValueError(
            f"config {key} has {len(values)} entries but data.sources has "
            f"{len(cfg.data.sources)}: give one per source"
        )
    return values


def build_vocabulary(cfg: ml_collections.ConfigDict, ddir: str) -> tuple[Vocabulary, list]:
    """Union of the training and evaluation vocabularies plus the base/novel split (SPEC 5.3)."""
    infos = [source_meta(name, ddir) for name in cfg.data.sources]
    eval_info = source_meta(cfg.data.eval_source, ddir)
    union = vocab.build_union([i.class_names for i in infos] + [eval_info.class_names])
    if cfg.data.base_from:  # e.g. the supervised upper bound reports the paper's C171 split
        supervised = list(source_meta(cfg.data.base_from, ddir).class_names)
    else:
        supervised = [n for i in infos if i.kind in SUPERVISED_KINDS for n in i.class_names]
    base, novel = vocab.base_novel_split(eval_info.class_names, supervised)
    voc = Vocabulary(
        union=union,
        eval_names=tuple(eval_info.class_names),
        eval_index=vocab.class_index(union, eval_info.class_names),
        base=tuple(base),
        novel=tuple(novel),
    )
    return voc, infos


def build_step_settings(
    cfg: ml_collections.ConfigDict, voc: Vocabulary, infos: list
) -> StepSettings:
    weights = _per_source(cfg.loss.basic_weights, "loss.basic_weights", cfg)
    ca_weights = _per_source(cfg.loss.ca_weights, "loss.ca_weights", cfg)
    crops = _per_source(cfg.data.crop_sizes, "data.crop_sizes", cfg)
    specs = []
    for info, weight, ca_weight, crop in zip(infos, weights, ca_weights, crops):
        if info.kind not in SUPERVISED_KINDS + IMAGE_LEVEL_KINDS:
            raise ValueError(f"source {info.name!r} is an evaluation set (kind {info.kind!r})")
        index = tuple(int(i) for i in vocab.class_index(voc.union, info.class_names))
        ca_weight = float(ca_weight) if cfg.ca.enabled and info.kind != "seg" else 0.0
        specs.append(SourceSpec(info.name, info.kind, index, float(weight), int(crop), ca_weight))
    plan = groups.group_sources(cfg.data.sources, cfg.data.ratio, cfg.data.num_groups)
    ids = tuple(list(cfg.data.sources).index(name) for name in plan)
    return StepSettings(
        sources=tuple(specs),
        group_source_ids=ids,
        images_per_group=cfg.data.images_per_group,
        seg_normalize=cfg.loss.seg_normalize,
        downsample_rate=cfg.loss.downsample_rate,
        ca=ca_settings(cfg),
        sample_classes=cfg.loss.sample_classes,
        max_labels=cfg.data.max_labels,
    )


def ca_settings(cfg: ml_collections.ConfigDict) -> CASettings | None:
    if not cfg.ca.enabled:
        return None
    fields = {f.name for f in dataclasses.fields(CASettings)}
    ca = CASettings(
        **{k: v for k, v in cfg.ca.items() if k in fields}, max_labels=cfg.data.max_labels
    )
    if ca.single_image and (ca.memory_size != 1 or ca.warm_up != 0):
        raise ValueError("ca.single_image needs ca.memory_size=1 and ca.warm_up=0 (SPEC 2.5)")
    return ca


def build_model(cfg: ml_collections.ConfigDict, num_classes: int) -> segmenter.Segmenter:
    if cfg.model.variant not in vit.VARIANTS:
        raise ValueError(
            f"config model.variant={cfg.model.variant!r} is unknown; known: {sorted(vit.VARIANTS)}"
        )
    dtype = jnp.dtype(cfg.model.dtype)
    backbone = vit.vit_from_variant(
        cfg.model.variant,
        pos_grid=tuple(cfg.model.pos_grid),
        drop_path_rate=cfg.model.drop_path_rate,
        pos_resize_rule=cfg.model.pos_resize_rule,
        attention=cfg.model.attention,
        dtype=dtype,
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
