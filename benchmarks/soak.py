"""Soak test: train while being SIGKILLed at random moments; the result must equal a clean run.

Runs `main.py` on the smoke config (micro ViT, CA-classifier on, 2 simulated devices) for
--steps steps, kills it with SIGKILL after a random 0.5..2x --every seconds (start-up, compile,
steps, checkpoint writes: wherever it is), re-runs the same command until it finishes, then
trains the same config once without interruption and compares the two final train states
(params, optimizer, memory banks, step) and data positions bit for bit. Prints one JSON line.

    python benchmarks/soak.py --steps 3000 --every 20 --seed 0
"""

import argparse
import ast
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

OVERRIDES = ("ca.enabled=True", "ca.memory_size=2", "ca.topk=4", "data.num_workers=0")


def command(workdir: str, steps: int) -> list[str]:
    keys = (*OVERRIDES, f"train.total_steps={steps}", "train.checkpoint_every_steps=25")
    keys += ("train.log_every_steps=25",)
    args = [sys.executable, "main.py", "--config", "configs/smoke.py", "--workdir", workdir]
    return [*args, "--mode", "train", *(f"--config.{k}" for k in keys)]


def run_with_kills(
    workdir: str, steps: int, every: float, rng: random.Random, max_attempts: int
) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    kills, attempts, start = 0, 0, time.perf_counter()
    while True:
        attempts += 1
        if attempts > max_attempts:  # each attempt must outlive start-up + 25 steps to advance
            raise SystemExit(f"not finished after {max_attempts} attempts: raise --every")
        proc = subprocess.Popen(
            command(workdir, steps),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            code = proc.wait(timeout=rng.uniform(0.5, 2.0) * every)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        if code != 0:
            raise SystemExit(f"attempt {attempts} exited with {code}: run it by hand to see why")
        return {"kills": kills, "attempts": attempts, "seconds": time.perf_counter() - start}


def final_state(workdir: str, steps: int):
    import jax
    import numpy as np

    from configs import smoke
    from larvseg_jax import checkpoint, experiment

    cfg = smoke.get_config()
    for key in (*OVERRIDES, f"train.total_steps={steps}"):
        path, value = key.split("=")
        section, name = path.split(".")
        cfg[section][name] = ast.literal_eval(value)
    setup = experiment.build_setup(cfg, workdir)
    ckpt = checkpoint.Checkpointer(
        os.path.join(workdir, "checkpoints"), max_to_keep=2, save_every_steps=1
    )
    state = jax.device_get(ckpt.restore(ckpt.latest_step(), setup.abstract_state))
    ckpt.close()
    position = os.path.join(workdir, "checkpoints", str(steps), "data_iter", "process_0-of-1.json")
    with open(position) as f:
        return state, f.read(), np


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=float, default=20.0, help="mean seconds between kills")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max_attempts", type=int, default=100)
    p.add_argument("--out", default="", help="also write the JSON line to this file")
    args = p.parse_args()
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    with tempfile.TemporaryDirectory() as tmp:
        killed, clean = os.path.join(tmp, "killed"), os.path.join(tmp, "clean")
        result = run_with_kills(
            killed, args.steps, args.every, random.Random(args.seed), args.max_attempts
        )
        start = time.perf_counter()
        subprocess.run(
            command(clean, args.steps),
            cwd=ROOT,
            check=True,
            env=dict(os.environ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        result["clean_seconds"] = time.perf_counter() - start
        import jax

        a, pos_a, np = final_state(killed, args.steps)
        b, pos_b, _ = final_state(clean, args.steps)
        same = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        result.update(
            steps=args.steps,
            every_s=args.every,
            seed=args.seed,
            final_state_equal=bool(same and int(a.step) == int(b.step) == args.steps),
            data_position_equal=pos_a == pos_b,
        )
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
