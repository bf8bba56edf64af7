"""The training loop and checkpoint evaluation: the one trainer every experiment goes through.

Its metrics and progress line are `train_metrics`; evaluating a state is `train_eval`."""

import functools
import os
from typing import Any

import jax
import ml_collections
from absl import logging
from clu import metrics as clu_metrics

from larvseg_jax import (
    checkpoint,
    experiment,
    groups,
    interrupts,
    memory,
    sharding,
    tb_writer,
)
from larvseg_jax.data import pipeline
from larvseg_jax.errors import CheckpointError, MissingError
from larvseg_jax.experiment import Setup
from larvseg_jax.models import pretrained
from larvseg_jax.train_eval import last_report, run_eval
from larvseg_jax.train_metrics import LogWindow, log_parameters, make_metrics_collection
from larvseg_jax.train_step import TrainState, train_step


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
