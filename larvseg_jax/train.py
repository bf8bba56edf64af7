"""The training loop and checkpoint evaluation: the one trainer every experiment goes through."""

import functools
import json
import os
import time
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from PIL import Image

from larvseg_jax import (
    ca_visualize,
    checkpoint,
    evaluate,
    experiment,
    groups,
    interrupts,
    memory,
    sharding,
    slide_image,
    tb_writer,
    visualize,
)
from larvseg_jax.data import catalog, pipeline, sources
from larvseg_jax.errors import CheckpointError, MissingError, NonFiniteError
from larvseg_jax.experiment import Setup
from larvseg_jax.models import pretrained
from larvseg_jax.progress import format_seconds
from larvseg_jax.train_step import TrainState, metric_names, train_step


def initial_state(setup: Setup) -> TrainState:
    """Random init, then the pretrained backbone if the config names one."""
    state = jax.jit(setup.init_fn, out_shardings=setup.state_shardings)(
        jax.random.PRNGKey(setup.loop.seed)
    )
    if setup.loop.pretrained:
        params = jax.device_get(state.params)
        params["backbone"] = pretrained.load_augreg_npz(
            setup.loop.pretrained, params["backbone"], pos_grid=setup.loop.pos_grid
        )
        state = state.replace(params=params, opt_state=setup.tx.init(params))
        state = jax.device_put(state, setup.state_shardings)
    return state


def open_checkpointer(setup: Setup) -> checkpoint.Checkpointer:
    return checkpoint.Checkpointer(
        os.path.join(setup.workdir, "checkpoints"),
        max_to_keep=setup.loop.max_checkpoints,
        save_every_steps=setup.loop.checkpoint_every_steps,
        keep_every_steps=setup.loop.keep_checkpoints_every_steps,
    )


def open_writer(workdir: str) -> tb_writer.TensorBoardWriter:
    return tb_writer.TensorBoardWriter(
        os.path.join(workdir, "tensorboard"), enabled=jax.process_index() == 0
    )


def group_plan(setup: Setup) -> list[str]:
    """The source of every global group (virtual device), in group order."""
    settings = setup.settings
    return [settings.sources[i].name for i in settings.group_source_ids]


def make_train_iterator(setup: Setup):
    """This process's endless, checkpointable stream of host batches."""
    return pipeline.make_train_iterator(
        setup.streams,
        data_dir=setup.data_dir,
        group_sources=group_plan(setup),
        local_groups=groups.local_group_indices(setup.settings.num_groups, setup.mesh),
        seed=setup.loop.seed,
        **setup.data_options,
    )


def _finite_average(name: str) -> type[clu_metrics.Metric]:
    """Average of output `name` over the window's finite steps (skipped steps not averaged)."""

    @flax.struct.dataclass
    class FiniteAverage(clu_metrics.Average):
        @classmethod
        def from_model_output(cls, **out) -> clu_metrics.Average:
            finite = out["finite"]
            value = jnp.asarray(out[name], jnp.float32)
            return cls(total=jnp.where(finite, value, 0.0), count=finite.astype(jnp.int32))

    return FiniteAverage


def _bad_count(test) -> type[clu_metrics.Metric]:
    """Steps of the window for which `test(outputs)` is True (non-finite bookkeeping)."""

    @flax.struct.dataclass
    class Count(clu_metrics.Metric):
        total: jax.Array

        @classmethod
        def from_model_output(cls, **out) -> clu_metrics.Metric:
            return cls(total=test(out).astype(jnp.int32))

        def merge(self, other):
            return type(self)(total=self.total + other.total)

        def compute(self):
            return self.total

    return Count


NO_STEP = np.iinfo(np.int32).max


@flax.struct.dataclass
class _FirstNonFinite(clu_metrics.Metric):
    """The first step of the window whose loss or gradients were not finite (NO_STEP: none)."""

    step: jax.Array

    @classmethod
    def from_model_output(cls, **out) -> clu_metrics.Metric:
        return cls(step=jnp.where(out["finite"], NO_STEP, out["step"]).astype(jnp.int32))

    def merge(self, other):
        return type(self)(step=jnp.minimum(self.step, other.step))

    def compute(self):
        return self.step


def make_metrics_collection(settings) -> type[clu_metrics.Collection]:
    """A clu Collection of each train metric averaged over a log window's finite steps, plus
    the count of non-finite steps, the first of them and which loss terms were not finite."""
    names = metric_names(settings)
    fields = {n: _finite_average(n) for n in names}
    fields["skipped_steps"] = _bad_count(lambda out: ~out["finite"])
    fields["first_nonfinite_step"] = _FirstNonFinite
    for n in names:
        if n.startswith(("loss", "aux_")):
            fields[f"nonfinite_{n}"] = _bad_count(lambda out, n=n: ~jnp.isfinite(out[n]))
    fields["nonfinite_gradients"] = _bad_count(
        lambda out: jnp.isfinite(out["loss"]) & ~out["grads_finite"]
    )
    return clu_metrics.Collection.create(**fields)


def compile_step(setup: Setup, collection: type[clu_metrics.Collection]):
    """The jitted step: (state, global batch) -> (state, this step's metrics collection)."""
    return jit_step(
        setup.model,
        setup.tx,
        setup.settings,
        setup.mesh,
        setup.schedule,
        setup.state_shardings,
        collection,
    )


def jit_step(model, tx, settings, mesh, schedule, state_shardings, collection):
    """`compile_step` from the run's parts (the memory planner has no data, hence no Setup)."""
    step = functools.partial(
        train_step, model=model, tx=tx, settings=settings, mesh=mesh, schedule=schedule
    )

    def step_and_metrics(state, batch):
        state, metrics = step(state, batch)
        metrics.pop("group_loss")
        return state, collection.single_from_model_output(**metrics)

    return jax.jit(
        step_and_metrics,
        in_shardings=(state_shardings, sharding.data_sharded(mesh)),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def compile_within_memory(setup: Setup, step_fn: Any, state: TrainState, batch: Any) -> Any:
    """Compiles the step ahead of its first call and stops with one line, before anything
    runs, when XLA's memory analysis of it exceeds a device's memory."""
    compiled = step_fn.lower(state, batch).compile()
    parts = memory.breakdown(compiled, state, batch, setup.mesh.devices.size)
    logging.info("train step: %s", memory.describe(parts))
    settings = setup.settings
    turn = memory.knobs(
        groups.groups_per_device(settings.num_groups, setup.mesh.devices.size),
        settings.accumulate_gradients,
        setup.model.backbone.remat,
        settings.images_per_group,
    )
    memory.check_fits(parts, turn, jax.local_devices()[0])
    return compiled


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


class LogWindow:
    """Train metrics averaged on device over `log_every_steps`; one progress line per window."""

    def __init__(self, setup: Setup, writer: Any, step: int):
        self.loop = setup.loop
        self.writer = writer
        self.images_per_step = setup.settings.num_groups * setup.settings.images_per_group
        self.metrics: clu_metrics.Collection | None = None
        self.first, self.start = step, time.perf_counter()
        self.warned_unvisited = False
        self.skipped_total = 0

    def add(self, step_metrics: clu_metrics.Collection) -> None:
        self.metrics = step_metrics if self.metrics is None else self.metrics.merge(step_metrics)

    def flush(self, step: int) -> None:
        """Fetches the window's means (one host sync), checks them, logs and writes TB."""
        if self.metrics is None:
            return
        means = {k: float(v) for k, v in jax.device_get(self.metrics.compute()).items()}
        self.metrics = None
        window = step - self.first
        if self._nonfinite(means, step) == window:
            logging.warning(
                "step %d: every step since %d was skipped (non-finite)", step, self.first
            )
            self.first, self.start = step, time.perf_counter()
            return
        bad = [k for k, v in means.items() if not np.isfinite(v)]
        if bad:
            raise NonFiniteError(
                f"non-finite {', '.join(bad)} between steps {self.first} and {step}: lower "
                "--config.optim.lr or check the data"
            )
        self._warn_unvisited(means)
        now = time.perf_counter()
        # The first window includes compilation; throughput is honest from the second.
        rate = (step - self.first) * self.images_per_step / max(now - self.start, 1e-9)
        eta = (self.loop.total_steps - step) * self.images_per_step / max(rate, 1e-9)
        self.first, self.start = step, now
        terms = "  ".join(
            f"{k} {v:.4f}" for k, v in means.items() if k.startswith(("loss_", "aux_"))
        )
        logging.info(
            "step %d/%d  loss %.4f  %s  lr %.2e  %.1f img/s  ETA %s",
            step,
            self.loop.total_steps,
            means["loss"],
            terms,
            means["lr"],
            rate,
            format_seconds(eta),
        )
        scalars = {f"train/{k}": v for k, v in means.items()}
        scalars["train/images_per_sec"] = rate
        self.writer.write_scalars(step, scalars)

    def _nonfinite(self, means: dict, step: int) -> int:
        """Pops the non-finite bookkeeping from `means`; stops or warns per train.nonfinite.

        Returns the window's count of skipped (non-finite) steps.
        """
        skipped = int(means.pop("skipped_steps"))
        first = int(means.pop("first_nonfinite_step"))
        terms = [
            k.removeprefix("nonfinite_")
            for k in [k for k in means if k.startswith("nonfinite_")]
            if means.pop(k) > 0
        ]
        self.skipped_total += skipped
        self.writer.write_scalars(step, {"train/skipped_steps": skipped})  # in this window
        if not skipped:
            return 0
        what = f"non-finite {', '.join(terms) or 'loss'} at step {first}"
        if skipped > 1:
            what += f" (and {skipped - 1} more of steps {first}-{step - 1})"
        kept = "params, optimizer state and memory bank were left as they were for those steps"
        if self.loop.nonfinite == "stop":
            raise NonFiniteError(
                f"{what}; {kept} and training stopped: lower --config.optim.lr, check that "
                "source's data, or pass --config.train.nonfinite=skip to go on past such steps"
            )
        logging.warning("%s: skipped (%s; %d skipped so far)", what, kept, self.skipped_total)
        return skipped

    def _warn_unvisited(self, means: dict) -> None:
        """Warns once when crops carry more labels than the CA pair lists hold."""
        over = {
            k.removeprefix("unvisited_labels_"): v for k, v in means.items() if "unvisited" in k
        }
        over = {k: v for k, v in over.items() if v > 0}
        if over and not self.warned_unvisited:
            logging.warning(
                "crops of %s had more than data.max_labels=%d labels (%s per step): those labels "
                "got no CA-classifier pair; raise --config.data.max_labels",
                ", ".join(over),
                self.loop.max_labels,
                ", ".join(f"{v:.1f}" for v in over.values()),
            )
            self.warned_unvisited = True


def log_parameters(state: TrainState, writer: Any) -> None:
    """Parameter counts in the log; clu's full parameter table in TensorBoard's text tab."""
    counts = {k: int(parameter_overview.count_parameters(v)) for k, v in state.params.items()}
    logging.info(
        "parameters: %s (%s)",
        f"{sum(counts.values()):,}",
        ", ".join(f"{k} {v:,}" for k, v in counts.items()),
    )
    logging.info(
        "process %d of %d: %d local of %d devices (%s)",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
    )
    table = parameter_overview.get_parameter_overview(state.params, include_stats=False)
    writer.write_texts(0, {"parameters": "```\n" + table + "\n```"})


def last_report(workdir: str, step: int) -> dict:
    """The eval JSON of `step` if it was written, else {}."""
    path = os.path.join(workdir, "eval", f"step_{step}.json")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return json.load(f)


def train_and_evaluate(
    cfg: ml_collections.ConfigDict,
    workdir: str,
    *,
    do_eval: bool = True,
    stop_at: int | None = None,
) -> dict:
    """Trains to cfg.train.total_steps (resuming from the latest checkpoint) and evaluates.

    A run whose latest checkpoint is already at total_steps is complete: it is reported and
    nothing is re-run (use --mode eval to evaluate again). `stop_at` ends this run early with a
    checkpoint, as a preemption would (tests use it). An interrupt in any phase (setup and data
    generation, restore, compilation, a step, an evaluation, a save) raises `Interrupted`, which
    says what is on disk.
    """
    latest = None
    try:
        setup = experiment.build_setup(cfg, workdir)
        loop = setup.loop
        ckpt = open_checkpointer(setup)
    except KeyboardInterrupt as interrupt:
        raise Interrupted(0, wrote=False, latest=None, phase="setup") from interrupt
    try:
        latest = ckpt.latest_step()
        if latest is not None and latest >= loop.total_steps:
            logging.info(
                "run complete: %s holds step %d of %d; nothing to do (--mode eval evaluates it "
                "again)",
                ckpt.directory,
                latest,
                loop.total_steps,
            )
            return last_report(workdir, latest) if do_eval else {}
        data_iter = make_train_iterator(setup)
        if latest is not None:
            logging.info("resuming from %s/%d", ckpt.directory, latest)
            state = ckpt.restore(latest, setup.abstract_state, data_iter, setup.config_json)
        else:
            state = initial_state(setup)
        interrupts.check()
    except KeyboardInterrupt as interrupt:
        ckpt.close()
        phase = "setup" if latest is None else "restore"
        raise Interrupted(latest or 0, wrote=False, latest=latest, phase=phase) from interrupt
    except BaseException:
        ckpt.close()
        raise
    writer = open_writer(workdir)
    if latest is None:
        log_parameters(state, writer)
    try:
        return _train_loop(setup, state, data_iter, ckpt, writer, do_eval=do_eval, stop_at=stop_at)
    finally:
        ckpt.wait()
        writer.close()
        ckpt.close()


def _train_loop(setup, state, data_iter, ckpt, writer, *, do_eval, stop_at) -> dict:
    """Steps until total_steps (or stop_at), with logs, checkpoints and evaluations on schedule.

    The step and its input run under `jax.transfer_guard("disallow")`: an implicit host-device
    transfer in the hot path is an error, not a silent slowdown. A stop request is honoured at
    step boundaries: the step reached is saved (unless it already was) and in-flight saves
    finish before `Interrupted` is raised.
    """
    loop = setup.loop
    step_fn = compile_step(setup, make_metrics_collection(setup.settings))
    meta = {"config": setup.config_json, "group_sources": group_plan(setup)}
    last = loop.total_steps if stop_at is None else min(stop_at, loop.total_steps)
    step = start_step = int(jax.device_get(state.step))
    saved = None  # the last step this run saved
    window = LogWindow(setup, writer, step)
    report: dict = {}
    phase = "compilation of the first step"
    try:
        while step < last:
            interrupts.check()
            # The one intended transfer (in a multi-process run it is a batched device_put,
            # which the guard below would refuse); the step itself moves nothing implicitly.
            batch = sharding.host_batch_to_global(next(data_iter), setup.mesh)
            if step == start_step:
                interrupts.test_point("compile")
                step_fn = compile_within_memory(setup, step_fn, state, batch)
            with jax.transfer_guard("disallow"):
                state, step_metrics = step_fn(state, batch)
                window.add(step_metrics)
            step += 1
            phase = "training"
            if step % loop.log_every_steps == 0 or step == loop.total_steps:
                window.flush(step)
            if step % loop.checkpoint_every_steps == 0 or step in (loop.total_steps, last):
                ckpt.save(step, state, data_iter, meta, force=True)
                saved = step
                interrupts.test_point("save")
            if do_eval and (step % loop.eval_every_steps == 0 or step == loop.total_steps):
                phase = f"evaluation of step {step}"
                report = run_eval(setup, state, step, writer)
                phase = "training"
        phase = "the last save"
        if step > start_step:
            _make_sure_saved(ckpt, step, state, data_iter, meta)
    except KeyboardInterrupt as interrupt:
        if step > start_step and saved != step:
            logging.warning("interrupted at step %d: saving a checkpoint before exiting", step)
            ckpt.save(step, state, data_iter, meta, force=True)
            saved = step
        elif saved == step:
            logging.warning(
                "interrupted at step %d: finishing the checkpoint write in flight", step
            )
        ckpt.wait()
        latest = ckpt.latest_step()
        raise Interrupted(step, wrote=saved == step == latest, latest=latest, phase=phase) from (
            interrupt
        )
    return report


def _make_sure_saved(ckpt, step, state, data_iter, meta) -> None:
    """The run's last checkpoint must be on disk: a failed final save is tried once more, then
    the run fails (a training run that ends without its weights is not a success)."""
    ckpt.wait()
    if ckpt.latest_step() == step:
        return
    ckpt.save(step, state, data_iter, meta, force=True)
    ckpt.wait()
    if ckpt.latest_step() != step:
        raise CheckpointError(
            f"the final checkpoint of step {step} could not be written to {ckpt.directory} "
            "(see the lines above): check that disk, then run the same command to redo the "
            f"steps since the latest checkpoint ({ckpt.latest_step()})"
        )


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM, with what is on disk afterwards (so the message is true).

    Attributes:
      step: the step reached.
      wrote: a checkpoint of `step` is on disk.
      latest: the latest checkpoint on disk (None: there is none).
      phase: what was running ("setup", "restore", "compilation of the first step",
        "training", "evaluation of step N").
    """

    def __init__(self, step: int, *, wrote: bool, latest: int | None, phase: str = "training"):
        super().__init__(step)
        self.step, self.wrote, self.latest, self.phase = step, wrote, latest, phase

    def message(self) -> str:
        during = "" if self.phase == "training" else f" during {self.phase}"
        if self.wrote and self.phase.startswith("evaluation"):
            return (
                f"interrupted{during}: the checkpoint of step {self.step} is saved, its "
                "evaluation was not written; run the same command to resume (--mode eval "
                "evaluates a checkpoint)"
            )
        if self.wrote:
            return (
                f"interrupted at step {self.step}{during}: checkpoint saved; run the same "
                "command to resume"
            )
        if self.phase.startswith("evaluation"):
            return f"interrupted during {self.phase}: its report was not written"
        if self.latest is not None:
            return (
                f"interrupted at step {self.step}{during} before another step finished: nothing "
                f"new saved; the same command resumes from the checkpoint of step {self.latest}"
            )
        return (
            f"interrupted at step {self.step}{during} before the first step finished: nothing "
            "was saved; the same command starts again"
        )


def evaluate_checkpoint(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Restores cfg.eval.step (or the latest) onto the present devices and evaluates it."""
    try:
        setup = experiment.build_setup(cfg, workdir)
    except KeyboardInterrupt as interrupt:
        raise Interrupted(0, wrote=False, latest=None, phase="setup") from interrupt
    ckpt = open_checkpointer(setup)
    step = setup.loop.eval_step if setup.loop.eval_step >= 0 else ckpt.latest_step()
    if step is None:
        ckpt.close()
        raise MissingError(
            f"no checkpoint in {ckpt.directory}: train first (--mode train) or fix --workdir"
        )
    try:
        state = ckpt.restore(step, setup.abstract_state, config=setup.config_json)
        writer = open_writer(workdir)
        try:
            return run_eval(setup, state, step, writer)
        finally:
            writer.close()
    except KeyboardInterrupt as interrupt:
        raise Interrupted(
            step, wrote=False, latest=step, phase=f"evaluation of step {step}"
        ) from interrupt
    finally:
        ckpt.close()
