"""Evaluation of a train state: the model as a predict function on every local device, the
mIoU report with its TensorBoard scalars and panels, and the CA-classifier attention panels."""

import json
import os
from typing import Any

import jax
import numpy as np
from PIL import Image

from larvseg_jax import ca_visualize, evaluate, slide_image, visualize
from larvseg_jax.data import catalog, pipeline, sources
from larvseg_jax.experiment import Setup
from larvseg_jax.train_step import TrainState


def _local_value(x: Any) -> Any:
    """A replicated global array's copy on one of this process's devices (device_put of a
    multi-process array to one device is not allowed); anything else as it is."""
    if isinstance(x, jax.Array) and x.is_fully_replicated:
        return x.addressable_shards[0].data
    return x


def make_predict_fn(setup: Setup, params: Any, devices: Any = None) -> slide_image.PredictFn:
    """Jitted images [B, h, w, 3] -> eval-vocabulary logits [B, h', w', N], computed on the
    device that holds the images.

    Params and the class index are copied once to each of `devices` (default: the local ones),
    so the round-robin of `slide.SlideRunner` moves only windows. One jitted function: its
    programs are per window batch shape and device, never per image.
    """
    devices = jax.local_devices() if devices is None else list(devices)
    params = jax.tree.map(_local_value, params)
    index = np.asarray(setup.voc.eval_index)
    replicas = {d: (jax.device_put(params, d), jax.device_put(index, d)) for d in devices}

    @jax.jit
    def predict(p, eval_index, images):
        return setup.model.apply({"params": p}, images, eval_index, train=False)[0]

    def predict_on_images_device(images: jax.Array) -> jax.Array:
        if images.device not in replicas:
            raise ValueError(f"images on {images.device}; params are on {list(replicas)}")
        return predict(*replicas[images.device], images)

    return predict_on_images_device


def frequency_counts(data_dir: str, eval_source: str) -> tuple[str, dict | None, str]:
    """Training images per class name from the eval set's frequency source (catalog).

    Returns:
      (source name or "", counts or None, why there are none or "").
    """
    source = catalog.get(eval_source).frequency_source
    if not source:
        return "", None, f"the catalog names no frequency source for {eval_source!r}"
    counts = sources.class_image_counts(data_dir, source, split=catalog.get(source).split)
    if counts is not None:
        return source, counts, ""
    where = sources.source_dir(data_dir, source)
    if not os.path.exists(os.path.join(where, "metadata.json")):
        return source, None, f"training source {source!r} is not on disk ({where})"
    why = "has no per-class image counts (written before they were counted: re-run its converter)"
    return source, None, f"{where}/metadata.json {why}"


def run_eval(setup: Setup, state: TrainState, step: int, writer: Any) -> dict:
    """mIoU JSON + TensorBoard scalars and panels; CA attention panels when there is a bank."""
    loop = setup.loop
    dataset = pipeline.make_eval_dataset(
        loop.eval_source,
        data_dir=setup.data_dir,
        short_side=loop.eval_short_side,
        max_images=loop.eval_max_images,
    )
    frequency_source, counts, note = frequency_counts(setup.data_dir, loop.eval_source)
    report = evaluate.run_evaluation(
        make_predict_fn(setup, state.params),
        dataset,
        class_names=list(setup.voc.eval_names),
        base_names=list(setup.voc.base),
        novel_names=list(setup.voc.novel),
        crop=loop.eval_crop,
        stride=loop.eval_stride,
        mode=loop.eval_mode,
        step=step,
        out_dir=os.path.join(setup.workdir, "eval"),
        num_panels=loop.num_panels,
        class_counts=counts,
        frequency_source=frequency_source,
        frequency_note=note,
        bucket_thresholds=loop.eval_frequency_buckets,
        batch_windows=loop.eval_batch_windows,
        class_chunk=loop.eval_class_chunk,
    )
    panels = report.pop("panels", [])
    scalars = {k: report[k] for k in ("miou", "miou_base", "miou_novel", "hiou", "pixel_acc")}
    if report["frequency"] is not None:
        scalars.update({f"miou_{b}": report["frequency"][f"miou_{b}"] for b in evaluate.BUCKETS})
    writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items() if v is not None})
    if panels:
        # Panels keep each image's own size, so they are written one tag each.
        writer.write_images(
            step, {f"eval/input_gt_prediction/{i}": p for i, p in enumerate(panels)}
        )
    if state.bank is not None and loop.num_panels:
        write_attention_panels(setup, state, step, writer, dataset)
    writer.flush()
    return report


def write_attention_panels(setup: Setup, state: TrainState, step: int, writer, dataset) -> None:
    """Image | class mask | CA attention, from the bank of the first CA group (PNG + TB)."""
    settings = setup.settings
    groups_with_ca = [
        g for g, s in enumerate(settings.group_source_ids) if settings.sources[s].ca_weight
    ]
    if not groups_with_ca:
        return
    view = state.bank._replace(feats=None)  # scores read only the slot means
    bank = jax.tree.map(lambda x: np.asarray(x[groups_with_ca[0]]), view)
    panels = ca_visualize.attention_panels(
        setup.model,
        jax.device_get(state.params),
        bank,
        dataset,
        setup.voc.eval_index,
        list(setup.voc.eval_names),
        settings.ca,
        max_labels=settings.max_labels,
        max_panels=setup.loop.num_panels,
    )
    if not panels:
        return
    writer.write_images(step, {f"eval/ca_attention/{t}": p for t, p in panels})
    path = os.path.join(setup.workdir, "eval", f"ca_attention_step_{step}.png")
    ramp = ca_visualize.heat(np.linspace(0.0, 1.0, 64))  # [64, 3] the colour bar
    sheet = visualize.attention_sheet(panels, list(setup.voc.eval_names), heat_ramp=ramp)
    Image.fromarray(sheet).save(path)


def last_report(workdir: str, step: int) -> dict:
    """The eval JSON of `step` if it was written, else {}."""
    path = os.path.join(workdir, "eval", f"step_{step}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)
