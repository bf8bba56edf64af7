"""The training loop and checkpoint evaluation: the one trainer every experiment goes through."""

import dataclasses
import functools
import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from PIL import Image

from larvseg_jax import (
    ca_visualize,
    checkpoint,
    evaluate,
    experiment,
    groups,
    sharding,
    tb_writer,
)
from larvseg_jax.data import pipeline, synthetic
from larvseg_jax.models import pretrained
from larvseg_jax.train_step import TrainState, create_train_state, state_shardings, train_step


class TrainingError(RuntimeError):
    """A problem the user must fix (bad values, divergence); main.py prints it as one line."""


@dataclasses.dataclass
class Setup:
    """Everything built from the config, shared by training and evaluation."""

    cfg: ml_collections.ConfigDict
    workdir: str
    data_dir: str
    mesh: Any
    voc: experiment.Vocabulary
    settings: experiment.StepSettings
    model: Any
    tx: Any
    schedule: Any
    init_fn: Any  # rng -> TrainState
    state_shardings: Any
    abstract_state: Any


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise PermissionError(
            f"workdir {workdir!r} is not writable ({e.strerror}): pick another --workdir"
        ) from e


def build_setup(cfg: ml_collections.ConfigDict, workdir: str) -> Setup:
    check_workdir(workdir)
    data_dir = experiment.data_dir(cfg, workdir)
    names = list(cfg.data.sources) + [cfg.data.eval_source]
    if any(n.startswith("syn_") for n in names):
        if jax.process_index() == 0:
            synthetic.ensure_synthetic(data_dir, cfg.data.synthetic)
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("synthetic data written")
    voc, infos = experiment.build_vocabulary(cfg, data_dir)
    settings = experiment.build_step_settings(cfg, voc, infos)
    mesh = sharding.make_mesh()
    groups.groups_per_device(settings.num_groups, mesh.devices.size)  # validates
    model = experiment.build_model(cfg, len(voc.union))
    tx, schedule = experiment.build_optimizer(cfg)
    init = functools.partial(
        create_train_state,
        model=model,
        tx=tx,
        image_size=settings.sources[0].crop,
        settings=settings,
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(cfg.seed))
    shardings = state_shardings(abstract, mesh)
    return Setup(
        cfg,
        workdir,
        data_dir,
        mesh,
        voc,
        settings,
        model,
        tx,
        schedule,
        init,
        shardings,
        checkpoint.abstract_with_shardings(abstract, shardings),
    )


def initial_state(setup: Setup) -> TrainState:
    """Random init, then the pretrained backbone if the config names one."""
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(
        jax.random.PRNGKey(setup.cfg.seed)
    )
    if setup.cfg.model.pretrained:
        params = jax.device_get(state.params)
        params["backbone"] = pretrained.load_augreg_npz(
            setup.cfg.model.pretrained, params["backbone"], pos_grid=tuple(setup.cfg.model.pos_grid)
        )
        state = state.replace(params=params, opt_state=setup.tx.init(params))
        state = jax.device_put(state, setup.state_shardings)
    return state


def make_predict_fn(setup: Setup, params: Any):
    """Jitted images [1, h, w, 3] -> eval-vocabulary logits [1, h', w', N] on the first device."""
    device = jax.local_devices()[0]
    params = jax.device_put(params, device)
    index = jnp.asarray(setup.voc.eval_index)

    @jax.jit
    def predict(p, images):
        return setup.model.apply({"params": p}, images, index, train=False)[0]

    return lambda images: predict(params, jax.device_put(images, device))


def run_eval(setup: Setup, state: TrainState, step: int, writer: Any) -> dict:
    """mIoU JSON + TensorBoard scalars and panels; CA attention panels when there is a bank."""
    cfg = setup.cfg
    params = state.params
    dataset = pipeline.make_eval_dataset(
        cfg.data,
        data_dir=setup.data_dir,
        source=cfg.data.eval_source,
        short_side=cfg.eval.short_side,
        max_images=cfg.eval.max_images,
    )
    report = evaluate.run_evaluation(
        make_predict_fn(setup, params),
        dataset,
        class_names=list(setup.voc.eval_names),
        base_names=list(setup.voc.base),
        novel_names=list(setup.voc.novel),
        crop=cfg.eval.crop_size,
        stride=cfg.eval.stride,
        mode=cfg.eval.mode,
        step=step,
        out_dir=os.path.join(setup.workdir, "eval"),
        num_panels=cfg.eval.num_panels,
    )
    panels = report.pop("panels", [])
    logging.info(
        "eval step %d: mIoU %.2f (base %.2f, novel %.2f) over %d images",
        step,
        report["miou"],
        report["miou_base"],
        report["miou_novel"],
        report["num_images"],
    )
    writer.write_scalars(
        step, {f"eval/{k}": report[k] for k in ("miou", "miou_base", "miou_novel", "pixel_acc")}
    )
    if panels:
        # Panels keep each image's own size, so they are written one tag each.
        writer.write_images(
            step, {f"eval/input_gt_prediction/{i}": p for i, p in enumerate(panels)}
        )
    if state.bank is not None and cfg.eval.num_panels:
        write_attention_panels(setup, state, step, writer, dataset)
    writer.flush()
    return report


def write_attention_panels(setup: Setup, state: TrainState, step: int, writer, dataset) -> None:
    """Image | class mask | CA attention, from the bank of the first CA group (PNG + TB)."""
    groups_with_ca = [
        g
        for g, s in enumerate(setup.settings.group_source_ids)
        if setup.settings.sources[s].ca_weight
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
        setup.settings.ca,
        max_panels=setup.cfg.eval.num_panels,
    )
    if not panels:
        return
    writer.write_images(step, {f"eval/ca_attention/{t}": p for t, p in panels})
    width = max(p.shape[1] for _, p in panels)
    sheet = np.concatenate(
        [np.pad(p, ((0, 2), (0, width - p.shape[1]), (0, 0))) for _, p in panels]
    )
    scale = max(1, 192 // max(p.shape[0] for _, p in panels))  # tiny synthetic images: enlarge
    sheet = sheet.repeat(scale, 0).repeat(scale, 1)
    path = os.path.join(setup.workdir, "eval", f"ca_attention_step_{step}.png")
    Image.fromarray(sheet).save(path)


def _check_finite(metrics: dict, first: int, last: int) -> None:
    bad = [k for k, v in metrics.items() if not np.isfinite(v)]
    if bad:
        raise TrainingError(
            f"non-finite {', '.join(bad)} between steps {first} and {last}: lower optim.lr or "
            "check the data"
        )


def train_and_evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    do_eval: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Trains to cfg.train.total_steps (resuming from the latest checkpoint) and evaluates.

    `stop_at` ends this run early with a checkpoint, as a preemption would (tests use it).
    """
    setup = build_setup(cfg, workdir)
    settings = setup.settings
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=cfg.train.max_checkpoints,
        save_every_steps=cfg.train.checkpoint_every_steps,
    )
    local_groups = groups.local_group_indices(settings.num_groups, setup.mesh)
    plan = [settings.sources[i].name for i in settings.group_source_ids]
    data_iter = pipeline.make_train_iterator(
        cfg.data,
        data_dir=setup.data_dir,
        group_sources=plan,
        local_groups=local_groups,
        seed=cfg.seed,
    )
    latest = ckpt.latest_step()
    if latest is not None:
        logging.info("resuming from %s/%d", ckpt.directory, latest)
        state = ckpt.restore(latest, setup.abstract_state, data_iter)
    else:
        state = initial_state(setup)
    step_fn = jax.jit(
        functools.partial(
            train_step,
            model=setup.model,
            tx=setup.tx,
            settings=settings,
            mesh=setup.mesh,
            schedule=setup.schedule,
        ),
        in_shardings=(setup.state_shardings, sharding.data_sharded(setup.mesh)),
        out_shardings=(setup.state_shardings, sharding.replicated(setup.mesh)),
        donate_argnums=0,
    )
    writer = open_writer(workdir)
    meta = {"config": json.loads(cfg.to_json_best_effort()), "group_sources": plan}
    total = cfg.train.total_steps
    last = total if stop_at is None else min(stop_at, total)
    images_per_step = settings.num_groups * settings.images_per_group
    step = int(state.step)
    report: dict = {}
    pending: list = []
    window_start, window_first = time.perf_counter(), step
    start_step = step
    warned_unvisited = False
    try:
        while step < last:
            batch = sharding.host_batch_to_global(next(data_iter), setup.mesh)
            state, metrics = step_fn(state, batch)
            step += 1
            metrics.pop("group_loss")
            pending.append(metrics)
            if step % cfg.train.log_every_steps == 0 or step == total:
                fetched = jax.device_get(pending)
                pending = []
                means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
                _check_finite(means, step - len(fetched), step)
                warned_unvisited = _warn_unvisited(means, cfg, warned_unvisited)
                now = time.perf_counter()
                # The first window includes compilation; throughput is honest from the second.
                rate = (step - window_first) * images_per_step / max(now - window_start, 1e-9)
                eta = (total - step) * images_per_step / max(rate, 1e-9)
                window_start, window_first = now, step
                logging.info(
                    "step %d/%d  loss %.4f  %s  lr %.2e  %.1f img/s  ETA %s",
                    step,
                    total,
                    means["loss"],
                    "  ".join(
                        f"{k} {v:.4f}" for k, v in means.items() if k.startswith(("loss_", "aux_"))
                    ),
                    means["lr"],
                    rate,
                    _fmt_eta(eta),
                )
                scalars = {f"train/{k}": v for k, v in means.items()}
                scalars["train/images_per_sec"] = rate
                writer.write_scalars(step, scalars)
            if step % cfg.train.checkpoint_every_steps == 0 or step in (total, last):
                ckpt.save(step, state, data_iter, meta, force=True)
            if do_eval and (step % cfg.train.eval_every_steps == 0 or step == total):
                report = run_eval(setup, state, step, writer)
    except KeyboardInterrupt:
        logging.warning("interrupted at step %d: saving a checkpoint before exiting", step)
        if step > start_step:
            ckpt.save(step, state, data_iter, meta, force=True)
        ckpt.wait()
        raise
    finally:
        ckpt.wait()
        writer.close()
    if do_eval and not report and step == total:  # resumed a finished run: evaluate it again
        writer = open_writer(workdir)
        report = run_eval(setup, state, step, writer)
        writer.close()
    ckpt.close()
    return report


def open_writer(workdir: str) -> Any:
    return tb_writer.TensorBoardWriter(
        os.path.join(workdir, "tensorboard"), enabled=jax.process_index() == 0
    )


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Restores cfg.eval.step (or the latest) onto the present devices and evaluates it."""
    setup = build_setup(cfg, workdir)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"),
        max_to_keep=cfg.train.max_checkpoints,
        save_every_steps=cfg.train.checkpoint_every_steps,
    )
    step = cfg.eval.step if cfg.eval.step >= 0 else ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(
            f"no checkpoint in {ckpt.directory}: train first (--mode train) or fix --workdir"
        )
    state = ckpt.restore(step, setup.abstract_state)
    writer = open_writer(workdir)
    try:
        return run_eval(setup, state, step, writer)
    finally:
        writer.close()
        ckpt.close()


def _warn_unvisited(means: dict, cfg: ml_collections.ConfigDict, warned: bool) -> bool:
    """Warns once when crops carry more labels than the CA pair lists hold."""
    over = {k.removeprefix("unvisited_labels_"): v for k, v in means.items() if "unvisited" in k}
    over = {k: v for k, v in over.items() if v > 0}
    if over and not warned:
        logging.warning(
            "crops of %s had more than data.max_labels=%d labels (%s per step): those labels "
            "got no CA-classifier pair; raise --config.data.max_labels",
            ", ".join(over),
            cfg.data.max_labels,
            ", ".join(f"{v:.1f}" for v in over.values()),
        )
    return warned or bool(over)


def _fmt_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"
