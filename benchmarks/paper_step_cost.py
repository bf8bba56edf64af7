"""Measured cost of the paper's Table 3 train steps on this machine (ViT-B/16, configs as shipped).

Builds each config's exact train step with the repo's own code (experiment.build_setup,
train.initial_state, train.compile_step: 8 groups x 2 images, 512 crops (320 for ImageNet), the
real union, CA-classifier and class sampling where the config has them) on random-initialised
parameters and random batches of the pipeline's layout, on the one default device (the 8 groups
run one after another, as in a 1-GPU run). Reports compile s, s/step (median of --steps after a
warm-up step), images/s, XLA FLOPs and GFLOP/s, XLA temp bytes, s per 1k steps and hours for
total_steps (320k): one JSON line per config (also in --out), --markdown adds a table. A step
whose XLA memory analysis exceeds 90% of MemAvailable is reported as an error, not run (--force).

XLA's cost analysis counts a while loop's body once and a switch as its costliest branch:
"xla_gflop" is one group's; "gflop_per_step_est" multiplies it by the groups per device.
--proxy runs the same step on one group per source (ratios 1) when 8 groups do not fit in RAM
(~2.5 GiB of activations per 512-px group); s/1k steps and hours scale by 8 / groups (for 3:3:2
configs the 1:1:1 mix over-weights the cheaper 320-px ImageNet group a little).

    python benchmarks/paper_step_cost.py --steps 1 --markdown
    python benchmarks/paper_step_cost.py --proxy --steps 1 --markdown \
        --out benchmarks/results/paper_step_cost_cpu_proxy.jsonl
    python benchmarks/paper_step_cost.py --tiny --steps 3 --markdown --out /tmp/tiny.jsonl
"""

import argparse
import gc
import importlib
import json
import os
import resource
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from larvseg_jax import experiment, groups, memory, sharding, train, train_metrics
from larvseg_jax.vocab import IGNORE

DEFAULT_CONFIGS = (
    "baseline_c171_wa150",
    "larvseg_c171_wa150",
    "larvseg_c171_wa150_i124",
    "larvseg_c171_wa847",
    "larvseg_c171_wa847_i585",
    "supervised_a150",
)
GIB = 2**30


def load_config(name: str, tiny: bool, data_dir: str, proxy: bool = False, sets=()):
    cfg = importlib.import_module(f"configs.{name}").get_config()
    for item in sets:  # --set model.remat=True: the step with an option, against the default
        key, _, value = item.partition("=")
        parent, _, leaf = key.rpartition(".")
        node = cfg
        for part in filter(None, parent.split(".")):
            node = node[part]
        node[leaf] = (
            type(node[leaf])(value) if not isinstance(node[leaf], bool) else value == "True"
        )
    if proxy:  # the same step on one group per source (ratios 1): a fraction of the memory
        for entry in cfg.data.sources.values():
            entry.ratio = 1
        cfg.data.num_groups = len(cfg.data.sources)
    cfg.data.dir = data_dir  # build_setup never opens it: the batches are random
    cfg.model.pretrained = ""  # random init: the cost is the same as from AugReg weights
    if tiny:  # development override: runs in seconds
        cfg.model.variant = "tiny"
        cfg.model.pos_grid = (64 // 8, 64 // 8)
        for entry in cfg.data.sources.values():
            entry.crop = 64
        cfg.ca.topk = 8
    return cfg


def random_batch(settings, rng: np.random.Generator) -> dict:
    """The pipeline's host batch: per source [G, B, c, c, 3] images and [G, B, c, c] labels;
    rows of groups that hold another source are 0 / IGNORE (pipeline.AssembleStep).

    Labels are local ids of the source's own vocabulary: seg and weak crops get 16 blocks over
    6 classes (a real crop's handful), single-label crops one class everywhere (FillSingleLabel).
    """
    g, b = settings.num_groups, settings.images_per_group
    batch = {}
    for s, spec in enumerate(settings.sources):
        c, n = spec.crop, len(spec.cls_index)
        images = np.zeros((g, b, c, c, 3), np.float32)
        labels = np.full((g, b, c, c), IGNORE, np.int32)
        for row in (i for i, sid in enumerate(settings.group_source_ids) if sid == s):
            images[row] = rng.normal(size=(b, c, c, 3))
            for i in range(b):
                if spec.kind == "single":
                    labels[row, i] = rng.integers(0, n)
                    continue
                classes = rng.choice(n, size=min(6, n), replace=False)
                cell = c // 4
                for k in range(16):
                    y, x = divmod(k, 4)
                    labels[row, i, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = classes[
                        k % len(classes)
                    ]
        batch[spec.name] = {"image": images, "label": labels}
    return batch


def measure(name: str, args, data_dir: str, out: dict) -> None:
    """Fills `out` as it goes, so a failure still reports what was measured before it."""
    out["variant"] = "tiny" if args.tiny else "B/16"
    shipped = load_config(name, args.tiny, data_dir).data.num_groups
    cfg = load_config(name, args.tiny, data_dir, args.proxy, args.set)
    out["options"] = list(args.set)
    setup = experiment.build_setup(cfg, os.path.join(data_dir, "work", name))
    settings = setup.settings
    images = settings.num_groups * settings.images_per_group
    out.update(
        device=jax.devices()[0].device_kind,
        num_devices=jax.device_count(),
        groups=settings.num_groups,
        config_groups=shipped,
        images_per_group=settings.images_per_group,
        sources={s.name: s.crop for s in settings.sources},
        group_sources=train.group_plan(setup),
        union_classes=len(setup.voc.union),
        ca_topk=settings.ca.topk if settings.ca is not None else 0,
        sample_classes=settings.sample_classes,
        state_bytes=memory.nbytes(setup.abstract_state),
        bank_bytes=memory.nbytes(setup.abstract_state.bank),
    )
    batch = sharding.host_batch_to_global(
        random_batch(settings, np.random.default_rng(0)), setup.mesh
    )
    step_fn = train.compile_step(setup, train_metrics.make_metrics_collection(settings))
    t0 = time.perf_counter()
    compiled = step_fn.lower(setup.abstract_state, batch).compile()
    out["compile_s"] = time.perf_counter() - t0
    flops = float((compiled.cost_analysis() or {}).get("flops", float("nan")))
    # XLA counts a while loop's body once (not x trip count) and a switch as its costliest
    # branch: its FLOPs are one group's. x groups per device estimates the step (an upper bound
    # when sources differ in crop: a 320-px ImageNet group costs less than a 512-px one).
    per_device = groups.groups_per_device(settings.num_groups, jax.device_count())
    out["xla_gflop"] = flops / 1e9
    out["gflop_per_step_est"] = flops * per_device / 1e9
    if compiled.memory_analysis() is not None:
        parts = memory.breakdown(compiled, setup.abstract_state, batch, jax.device_count())
        out["temp_bytes"] = parts["temporaries"]
        out["xla_peak_bytes_est"] = peak = parts["peak"]
        out["mem_available_bytes"] = available = memory.host_available()
        if peak > 0.9 * available and not args.force:
            out["error"] = (
                f"not run: XLA's memory analysis needs ~{peak / GIB:.1f} GiB (arguments + "
                f"outputs - donated + temp) but MemAvailable is {available / GIB:.1f} GiB"
            )
            return
    if args.compile_only:
        return
    t0 = time.perf_counter()
    state = train.initial_state(setup)
    jax.block_until_ready(state)
    out["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    out["warmup_s"] = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    shipped_sec = sec * shipped / settings.num_groups  # the groups run one after another
    out["loss"] = float(jax.device_get(metrics.compute()["loss"]))
    out.update(
        step_times_s=times,
        seconds_per_step=sec,
        images_per_sec=images / sec,
        gflop_per_sec_xla=flops / 1e9 / sec,
        gflop_per_sec_est=out["gflop_per_step_est"] / sec,
        seconds_per_1k_steps=1000 * shipped_sec,  # projections: the config's own groups
        total_steps=setup.loop.total_steps,
        hours_total_steps=setup.loop.total_steps * shipped_sec / 3600,
    )


COLUMNS = (  # (header, JSON key, format, divisor)
    ("groups", "groups", ".0f", 1),
    ("compile s", "compile_s", ".0f", 1),
    ("s/step", "seconds_per_step", ".1f", 1),
    ("img/s", "images_per_sec", ".3f", 1),
    ("XLA GFLOP (1 group)", "xla_gflop", ".0f", 1),
    ("GFLOP/step est", "gflop_per_step_est", ".0f", 1),
    ("GFLOP/s est", "gflop_per_sec_est", ".1f", 1),
    ("XLA temp GiB", "temp_bytes", ".1f", GIB),
    ("XLA need GiB", "xla_peak_bytes_est", ".1f", GIB),
    ("peak RSS GiB", "peak_rss_gib", ".1f", 1),
    ("s/1k steps (config's groups)", "seconds_per_1k_steps", ".0f", 1),
    ("h/320k", "hours_total_steps", ".0f", 1),
    ("load", "loadavg_1m", ".2f", 1),
)


def markdown(rows: list[dict]) -> str:
    lines = ["| config | " + " | ".join(c[0] for c in COLUMNS) + " |", "|---" * 14 + "|"]
    for r in rows:
        cells = [format(r[k] / d, f) if k in r else "-" for _, k, f, d in COLUMNS]
        if "error" in r:
            cells[2] = f"error: {r['error']}"
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS))
    p.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    p.add_argument("--tiny", action="store_true", help="tiny ViT, 64-px crops, ca.topk 8")
    p.add_argument("--force", action="store_true", help="run even if it looks too big for RAM")
    p.add_argument(
        "--proxy",
        action="store_true",
        help="one group per source; projections scale the step to the config's groups",
    )
    p.add_argument("--compile-only", action="store_true", help="compile and analyse, no steps")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, e.g. model.remat=True or model.dtype=bfloat16 (repeatable)",
    )
    p.add_argument("--markdown", action="store_true")
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "paper_step_cost_cpu.jsonl"),
    )
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as data_dir:
        for name in args.configs:
            t0 = time.perf_counter()
            row: dict = {"config": name}
            try:
                measure(name, args, data_dir, row)
            except Exception as e:  # noqa: BLE001 reported, not hidden; the next config runs
                row["error"] = f"{type(e).__name__}: {e}"
            row["wall_s"] = time.perf_counter() - t0
            row["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            row["loadavg_1m"] = os.getloadavg()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
            gc.collect()
            jax.clear_caches()
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if args.markdown:
        print(markdown(rows))


if __name__ == "__main__":
    main()
