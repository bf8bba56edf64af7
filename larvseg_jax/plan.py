"""How much memory a run needs per device, before it starts: no data, no training.

  python -m larvseg_jax.plan --config configs/larvseg_c171_wa150.py --devices 8 \\
      [--memory_gib 80] [--config.train.accumulate_gradients=True ...]

Compiles the run's real train step for --devices devices (simulated CPU devices when this
machine has fewer) and prints XLA's memory analysis per device: params, optimizer, bank, batch,
temporaries (activations kept for the backward pass, gradients, workspace) and the peak. With
--memory_gib (or on an accelerator, its memory) it exits 1 with the knobs to turn when the step
does not fit; training runs the same check on its first step.
"""

import os
import sys


def _early_devices(argv: list[str]) -> int:
    """--devices N, read before JAX starts (simulated CPU devices are fixed at start-up)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--devices="):
            return int(arg.split("=", 1)[1])
        if arg == "--devices" and i + 1 < len(argv):
            return int(argv[i + 1])
    return 1


if __name__ == "__main__":
    try:
        _count = _early_devices(sys.argv)
    except ValueError:
        _count = 1  # absl reports the bad value below
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_count}"
    )

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from larvseg_jax import checkpoint, experiment, groups, memory, sharding, train, train_metrics
from larvseg_jax.errors import UserError
from larvseg_jax.train_step import state_shardings

FLAGS = flags.FLAGS


def abstract_batch(settings, mesh) -> dict:
    """ShapeDtypeStructs of the global batch (per source [G, B, c, c, 3] and [G, B, c, c])."""
    shard = sharding.data_sharded(mesh)
    g, b = settings.num_groups, settings.images_per_group
    return {
        spec.name: {
            "image": jax.ShapeDtypeStruct(
                (g, b, spec.crop, spec.crop, 3), np.float32, sharding=shard
            ),
            "label": jax.ShapeDtypeStruct((g, b, spec.crop, spec.crop), np.int32, sharding=shard),
        }
        for spec in settings.sources
    }


def plan(cfg, devices) -> dict:
    """Per-device bytes of the run's train step over `devices` (see `memory.breakdown`), and
    the knobs that would lower them."""
    experiment.validate(cfg)
    per_device = groups.groups_per_device(cfg.data.num_groups, len(devices))
    template = experiment.build_template(cfg)
    mesh = sharding.make_mesh(devices)
    shardings = state_shardings(template.abstract_state, mesh)
    state = checkpoint.abstract_with_shardings(template.abstract_state, shardings)
    batch = abstract_batch(template.settings, mesh)
    step = train.jit_step(
        template.model,
        template.tx,
        template.settings,
        mesh,
        template.schedule,
        shardings,
        train_metrics.make_metrics_collection(template.settings),
    )
    parts = memory.breakdown(step.lower(state, batch).compile(), state, batch, len(devices))
    parts["groups_per_device"] = per_device
    parts["knobs"] = memory.knobs(
        per_device,
        template.settings.accumulate_gradients,
        template.model.backbone.remat,
        template.settings.images_per_group,
    )
    return parts


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    available = jax.devices()
    if len(available) < FLAGS.devices:
        available = jax.devices("cpu")
    devices = available[: FLAGS.devices]
    try:
        if len(devices) < FLAGS.devices:
            raise UserError(f"--devices {FLAGS.devices}: only {len(devices)} devices here")
        parts = plan(FLAGS.config, devices)
        print(
            f"{config_flags.get_config_filename(FLAGS['config'])} on {len(devices)} x {devices[0].device_kind}, "
            f"{parts['groups_per_device']} group(s) per device: {memory.describe(parts)}"
        )
        limit = None
        if FLAGS.memory_gib is not None:
            limit = (int(FLAGS.memory_gib * memory.GIB), f"--memory_gib {FLAGS.memory_gib:g}")
        if FLAGS.memory_gib is not None or devices[0].platform != "cpu":
            memory.check_fits(parts, parts["knobs"], devices[0], limit)
            print("fits")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "Experiment config file.", lock_config=True)
    flags.DEFINE_integer("devices", 1, "Devices the run will use (all of every process).")
    flags.DEFINE_float("memory_gib", None, "Memory of one device; default: the accelerator's.")
    flags.mark_flags_as_required(["config"])
    app.run(main)
