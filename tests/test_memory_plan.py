"""The memory planner and the fit check: parts named from shapes add up to XLA's own argument
accounting, the options lower what they should, and a step that cannot fit stops in one line."""

import functools
import os
import pathlib
import subprocess
import sys

import jax
import pytest

from configs import smoke
from larvseg_jax import experiment, memory, plan
from larvseg_jax.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[1]


@functools.cache
def smoke_plan(num_devices, accumulate=False):
    """The smoke LarvSeg step's plan (one compilation per argument set, shared by the tests)."""
    cfg = smoke.get_config()
    cfg.ca.enabled = True
    cfg.ca.memory_size, cfg.ca.topk = 2, 4
    cfg.train.accumulate_gradients = accumulate
    return dict(plan.plan(cfg, jax.devices()[:num_devices]))


@pytest.mark.parametrize("num_devices", [1, 8])
def test_named_parts_are_xlas_arguments(num_devices):
    cfg = smoke.get_config()
    cfg.ca.enabled = True
    cfg.ca.memory_size, cfg.ca.topk = 2, 4
    parts = smoke_plan(num_devices)
    abstract = experiment.build_template(cfg).abstract_state
    assert parts["params"] == memory.nbytes(abstract.params) > 0
    assert parts["bank"] == memory.nbytes(abstract.bank) // num_devices > 0
    assert parts["groups_per_device"] == 8 // num_devices
    named = sum(parts[k] for k in ("params", "optimizer", "bank", "batch"))
    # XLA's arguments: the same buffers plus the step counter and the RNG key.
    assert 0 <= parts["arguments"] - named <= 64
    assert parts["peak"] >= parts["arguments"] + parts["temporaries"] - parts["arguments"]


def test_options_lower_the_step_memory_as_they_should():
    one = smoke_plan(1)
    eight = smoke_plan(8)
    accumulated = smoke_plan(1, accumulate=True)
    assert eight["temporaries"] < one["temporaries"]  # 1 group per device instead of 8
    assert accumulated["temporaries"] < one["temporaries"] / 2  # one group's activations
    assert one["knobs"][0].startswith("--config.train.accumulate_gradients=True")
    assert not any("accumulate" in k for k in accumulated["knobs"] + eight["knobs"])


def test_check_fits_names_the_knobs():
    parts = smoke_plan(2)
    os.environ[memory.CAPACITY_ENV] = str(parts["peak"])  # fits only without the 10% margin
    try:
        with pytest.raises(ConfigError, match=r"needs .* per device .* allows .*; try --config"):
            memory.check_fits(parts, parts["knobs"], jax.devices()[0])
        os.environ[memory.CAPACITY_ENV] = str(2 * parts["peak"])
        memory.check_fits(parts, parts["knobs"], jax.devices()[0])
    finally:
        del os.environ[memory.CAPACITY_ENV]


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, *args],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **(env or {})},
    )


def test_training_that_cannot_fit_stops_before_its_first_step(tmp_path):
    proc = run(
        "main.py",
        "--config",
        "configs/smoke.py",
        "--workdir",
        str(tmp_path),
        env={memory.CAPACITY_ENV: "100000"},
    )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the train step needs") and "model.remat=True" in last
    assert not os.listdir(tmp_path / "checkpoints")


def test_plan_command():
    proc = run(
        "-m",
        "larvseg_jax.plan",
        "--config",
        "configs/smoke.py",
        "--devices",
        "2",
        "--memory_gib",
        "0.001",
    )
    assert "configs/smoke.py on 2 x cpu, 4 group(s) per device:" in proc.stdout
    assert proc.returncode == 1 and proc.stderr.startswith("error: the train step needs")
    assert "but --memory_gib 0.001 allows" in proc.stderr
