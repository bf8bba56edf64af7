"""Two processes on loopback (jax.distributed, CPU collectives) are one training run: they agree
with a single process holding all the devices, share one checkpoint, and resume from it."""

import os
import pathlib
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import smoke
from larvseg_jax import distributed
from larvseg_jax.errors import ConfigError
from tests.test_resume import final_state

ROOT = pathlib.Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(workdir, num_processes: int, devices_per_process: int) -> list[str]:
    """main.py --mode train of the smoke config in `num_processes` processes; their outputs."""
    return finish(start(workdir, num_processes, devices_per_process))


def start(workdir, num_processes: int, devices_per_process: int) -> tuple[str, list]:
    """Starts `train` without waiting (runs on other workdirs may go on at the same time)."""
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
        JAX_PLATFORMS="cpu",
    )
    command = [sys.executable, "main.py", "--config", "configs/smoke.py", "--workdir", workdir]
    command += ["--mode", "train"]
    port = free_port()
    procs = []
    for i in range(num_processes):
        extra = []
        if num_processes > 1:
            extra = ["--coordinator", f"127.0.0.1:{port}", "--num_processes", str(num_processes)]
            extra += ["--process_id", str(i)]
        with open(f"{workdir}.process{i}.log", "w") as log:  # a full pipe would block it
            procs.append(
                subprocess.Popen(
                    [*command, *extra], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                )
            )
    return workdir, procs


def finish(started: tuple[str, list]) -> list[str]:
    """Waits for the processes of `start`; asserts they all succeeded; their outputs."""
    workdir, procs = started
    # One process failing leaves the others waiting for it (up to JAX's 2-minute timeouts):
    # stop them all at the first failure and show every process's output.
    deadline = time.monotonic() + 600
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()
    for p in procs:
        p.wait()
    outputs = [pathlib.Path(f"{workdir}.process{i}.log").read_text() for i in range(len(procs))]
    report = "\n".join(
        f"--- process {i} (exit {p.returncode}):\n{out[-3000:]}"
        for i, (p, out) in enumerate(zip(procs, outputs))
    )
    assert all(p.returncode == 0 for p in procs), report
    return outputs


def test_two_processes_train_as_one_and_resume(tmp_path):
    cfg = smoke.get_config()
    two, one = str(tmp_path / "two"), str(tmp_path / "one")
    # The reference runs alongside: the processes spend most of their time compiling, on one
    # core each.
    started = start(two, num_processes=2, devices_per_process=2), start(one, 1, 4)
    outputs, _ = map(finish, started)
    for i, out in enumerate(outputs):
        assert f"process {i} of 2: 2 local of 4 devices" in out and "step 6" in out
    a, b = final_state(cfg, two), final_state(cfg, one)
    assert int(a.step) == int(b.step) == cfg.train.total_steps
    # Same programs over the same 4 devices; only the cross-process reductions may round
    # differently.
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6), a, b)

    # Lose the last checkpoint: both processes resume from step 3 and end where they ended.
    final = os.path.join(two, "checkpoints", str(cfg.train.total_steps))
    shutil.rmtree(final)
    outputs = train(two, num_processes=2, devices_per_process=2)
    assert all("resum" in out.lower() for out in outputs), outputs[0][-2000:]
    jax.tree.map(np.testing.assert_array_equal, final_state(cfg, two), a)


@pytest.mark.parametrize(
    "flags, message",
    [
        ((None, 2, 0), "--num_processes and --process_id need --coordinator HOST:PORT"),
        (("127.0.0.1:1234", None, 0), "needs --num_processes N and --process_id I"),
        (("127.0.0.1:1234", 2, 2), "--process_id 2 must be in 0..1"),
        (("localhost", 2, 0), "must be HOST:PORT"),
    ],
)
def test_bad_distributed_flags_are_one_line(flags, message):
    with pytest.raises(ConfigError, match=message):
        distributed.initialize(*flags)


def test_distributed_flag_errors_reach_the_command_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "main.py", "--config", "configs/smoke.py", "--workdir", str(tmp_path)]
        + ["--process_id", "1"],
        check=False,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("error: --num_processes and --process_id need --coordinator")
    )
