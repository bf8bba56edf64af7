"""Table 3 on the synthetic world: seg-only vs baseline vs LarvSeg, over seeds, same budget.

Trains every (method, setting, seed) through main.py's own code path and writes
`<out>/synthetic_table3.json` and `<out>/synthetic_table3.md` (mIoU all/base/novel, mean and
spread over seeds), printing one JSON line per run.

    python benchmarks/synthetic_table3.py --out runs/table3 [--steps 1500] [--seeds 0,1,2]
"""

import argparse
import importlib
import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RUNS = [  # (setting, method, config)
    ("all", "seg-only", "synthetic_seg_only"),
    ("multi-label", "baseline", "synthetic_baseline_weak"),
    ("multi-label", "larvseg", "synthetic_larvseg_weak"),
    ("multi+single", "baseline", "synthetic_baseline"),
    ("multi+single", "larvseg", "synthetic_larvseg"),
]


def run_one(config: str, seed: int, steps: int, lr: float, workdir: str) -> dict:
    from larvseg_jax import train

    cfg = importlib.import_module(f"configs.{config}").get_config()
    cfg.seed = seed
    cfg.train.total_steps = steps
    cfg.train.eval_every_steps = steps
    cfg.train.checkpoint_every_steps = steps
    cfg.train.log_every_steps = max(steps // 6, 1)
    cfg.optim.lr = lr
    return train.train_and_evaluate(cfg, workdir)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="runs/table3")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--only", default="", help="comma-separated configs to run")
    args = parser.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()
    seeds = [int(s) for s in args.seeds.split(",")]
    results = []
    for setting, method, config in RUNS:
        if args.only and config not in args.only.split(","):
            continue
        for seed in seeds:
            workdir = os.path.join(args.out, f"{config}_seed{seed}")
            start = time.time()
            report = run_one(config, seed, args.steps, args.lr, workdir)
            row = {
                "setting": setting,
                "method": method,
                "config": config,
                "seed": seed,
                "steps": args.steps,
                "seconds": round(time.time() - start, 1),
            }
            row.update({k: report[k] for k in ("miou", "miou_base", "miou_novel")})
            print(json.dumps(row), flush=True)
            results.append(row)
    table = summarize(results)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "synthetic_table3.json"), "w") as f:
        json.dump({"runs": results, "summary": table}, f, indent=1)
    with open(os.path.join(args.out, "synthetic_table3.md"), "w") as f:
        f.write(markdown(table, args))
    print(markdown(table, args))


def summarize(results: list) -> list:
    table = []
    for setting, method, config in RUNS:
        rows = [r for r in results if r["config"] == config]
        if not rows:
            continue
        entry = {"setting": setting, "method": method, "config": config, "seeds": len(rows)}
        for key in ("miou", "miou_base", "miou_novel"):
            values = np.array([r[key] for r in rows], float)
            entry[key] = float(values.mean())
            entry[key + "_std"] = float(values.std())
        table.append(entry)
    return table


def markdown(table: list, args) -> str:
    lines = [
        (
            f"Synthetic world, {args.steps} steps, lr {args.lr}, seeds {args.seeds} "
            "(mean ± std of mIoU %):"
        ),
        "",
        "| setting | method | all | base | novel |",
        "|---|---|---|---|---|",
    ]
    for e in table:
        cells = [f"{e[k]:.1f} ± {e[k + '_std']:.1f}" for k in ("miou", "miou_base", "miou_novel")]
        lines.append(f"| {e['setting']} | {e['method']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
