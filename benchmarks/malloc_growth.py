"""Does LARVSEG_MALLOC=keep (larvseg_jax/host_malloc.py) let the heap grow over a long run?

Runs the B/16 LarvSeg train step of benchmarks/train_step.py (no PyTorch) for --steps steps in a
fresh process per malloc setting (mallopt must come before JAX starts its threads), and records
per step: seconds, minor page faults and the process's resident memory. A heap that reuses its
freed blocks stays flat after the first steps; one that grows shows it in the slope.

  python benchmarks/malloc_growth.py --steps 20
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jsonl
import numpy as np

SETTINGS = {"keep": "keep", "default": ""}  # name -> LARVSEG_MALLOC


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    """One process, one setting: prints a JSON line per step."""
    from larvseg_jax import host_malloc

    kept = host_malloc.keep_freed_memory(args.variant)
    import ca_cost
    import jax

    from larvseg_jax import sharding

    args.groups, args.batch, args.warm_up, args.attention = 2, 2, 0, "auto"
    fn, state, plan, mesh, _ = ca_cost.build(args, with_ca=True)
    batch = sharding.host_batch_to_global(
        ca_cost.batch_for(args, plan, np.random.default_rng(0)), mesh
    )
    compiled = fn.lower(state, batch).compile()
    for step in range(args.steps):
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        row = {
            "step": step,
            "seconds": time.perf_counter() - t0,
            "minor_faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults,
            "rss_bytes": rss_bytes(),
            "kept": kept,
        }
        print(json.dumps(row), flush=True)


def summary(name: str, steps: list[dict], args) -> dict:
    """Steps 0-1 warm the heap up; the slope of RSS over the rest is the growth per step."""
    rest = steps[2:]
    x = np.array([s["step"] for s in rest], float)
    rss = np.array([s["rss_bytes"] for s in rest], float)
    slope = float(np.polyfit(x, rss, 1)[0]) if len(rest) > 1 else 0.0
    return {
        "name": name,
        "variant": args.variant,
        "crop": args.crop,
        "steps": len(steps),
        "host_malloc": "keep_freed_memory" if steps[0]["kept"] else "default",
        "seconds_per_step_median": float(np.median([s["seconds"] for s in rest])),
        "minor_faults_per_step_median": float(np.median([s["minor_faults"] for s in rest])),
        "rss_gib_after_step_2": steps[2]["rss_bytes"] / 2**30,
        "rss_gib_last": steps[-1]["rss_bytes"] / 2**30,
        "rss_gib_max": max(s["rss_bytes"] for s in steps) / 2**30,
        "rss_growth_mib_per_step": slope / 2**20,
        "per_step": steps,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variant", default="B/16")
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--classes", type=int, default=251)
    p.add_argument("--topk", type=int, default=40)
    p.add_argument("--memory", type=int, default=20)
    p.add_argument("--settings", default="keep,default", help="comma list of: keep, default")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "malloc_growth_cpu.jsonl"),
    )
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.steps < 4:
        p.error("--steps must be at least 4 (two warm-up steps, then a slope)")
    rows = []
    for name in args.settings.split(","):
        if name not in SETTINGS:
            p.error(f"--settings: unknown {name!r}; use {sorted(SETTINGS)}")
        env = {**os.environ, "LARVSEG_MALLOC": SETTINGS[name]}
        cmd = [sys.executable, __file__, "--child", *sys.argv[1:]]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if done.returncode:
            sys.exit(f"{name}: the child failed:\n{done.stderr[-2000:]}")
        steps = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        rows.append(summary(name, steps, args))
    jsonl.emit(rows, args.out)
    for r in rows:
        print(
            f"{r['name']}: {r['seconds_per_step_median']:.2f} s/step, "
            f"{r['minor_faults_per_step_median']:.0f} faults/step, RSS "
            f"{r['rss_gib_after_step_2']:.2f} -> {r['rss_gib_last']:.2f} GiB "
            f"({r['rss_growth_mib_per_step']:+.1f} MiB/step over {r['steps']} steps)"
        )


if __name__ == "__main__":
    main()
