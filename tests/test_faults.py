"""SIGKILL in the middle of an asynchronous checkpoint write: the same command resumes from the
last complete checkpoint and ends bit-identical to an uninterrupted run; the same killed run
resumed on one device instead of eight continues to the same result (to float tolerance: the
step's reductions run in another order).

The kill is deterministic: checkpoint.PAUSE_BEFORE_COMMIT_ENV makes the save of one step write
everything and then wait before its atomic rename; the test kills the process there.
"""

import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import numpy as np

from configs import smoke
from larvseg_jax import checkpoint
from tests.processes import read_until
from tests.test_resume import final_state

ROOT = pathlib.Path(__file__).resolve().parents[1]
OVERRIDES = {
    "ca.enabled": True,
    "ca.memory_size": 2,
    "ca.topk": 4,
    "train.checkpoint_every_steps": 2,
}


def _config():
    cfg = smoke.get_config()
    for key, value in OVERRIDES.items():
        section, name = key.split(".")
        cfg[section][name] = value
    return cfg


def _main(workdir, env=None, devices=8):
    args = [sys.executable, "main.py", "--config", "configs/smoke.py", "--workdir", str(workdir)]
    args += ["--mode", "train"] + [f"--config.{k}={v}" for k, v in OVERRIDES.items()]
    flags = f"--xla_force_host_platform_device_count={devices}"
    env = dict(os.environ, XLA_FLAGS=flags, **(env or {}))
    return subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_sigkill_during_an_async_save_resumes_bit_identically(tmp_path):
    # The reference runs the same way (a subprocess on 8 devices, XLA optimising as usual).
    straight = _main(tmp_path / "straight")
    log = straight.communicate(timeout=300)[0]
    assert straight.returncode == 0, log[-3000:]

    killed = tmp_path / "killed"
    proc = _main(killed, {checkpoint.PAUSE_BEFORE_COMMIT_ENV: "4"})
    output = read_until(proc, "save of step 4 paused before its commit")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, "".join(output[-20:])
    names = os.listdir(killed / "checkpoints")
    assert "2" in names and "4" not in names  # step 4 is half-written under a temporary name
    assert any(n.startswith("4.") for n in names), names
    on_one = tmp_path / "killed_then_one_device"
    shutil.copytree(killed, on_one)

    again, elsewhere = _main(killed), _main(on_one, devices=1)
    for proc, workdir in ((again, killed), (elsewhere, on_one)):
        log = proc.communicate(timeout=300)[0]
        assert proc.returncode == 0, log[-3000:]
        assert f"resuming from {workdir / 'checkpoints'}/2" in log, log[-3000:]
        assert not any(".orbax-checkpoint-tmp" in n for n in os.listdir(workdir / "checkpoints"))

    a, b = final_state(_config(), tmp_path / "straight"), final_state(_config(), killed)
    assert int(a.step) == int(b.step) == 6
    jax.tree.map(np.testing.assert_array_equal, a, b)  # params, optimizer, memory banks
    position = "checkpoints/6/data_iter/process_0-of-1.json"
    assert (tmp_path / "straight" / position).read_text() == (killed / position).read_text()

    c = final_state(_config(), on_one)
    assert int(c.step) == 6
    close = lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6)
    jax.tree.map(close, a, c)
    assert (tmp_path / "straight" / position).read_text() == (on_one / position).read_text()
