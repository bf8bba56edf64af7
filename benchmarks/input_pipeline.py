"""Training input pipeline throughput (images/s) per grain worker count, next to the train step.

Writes a realistic "wa150" source (640x480 JPEG photo-like images, 150-class PNG label maps)
with the repo's writer, then reads it through the trainer's own `pipeline.make_train_iterator`
(ArrayRecord read, JPEG decode, SPEC 4 augmentation at crop 512, batching into G groups x B) for
each --workers value: worker start-up + first batch are reported apart from the steady rate, and
the CPU seconds spent give a per-core rate that carries over to bigger hosts. Then times the
paper's ViT-B/16 train step (experiment.build_setup from a paper config) on this machine, so that
`workers needed = accelerator images/s / per-worker images/s` can be read off. One JSON line per
measurement; --out saves them all as one JSON file.

    python benchmarks/input_pipeline.py --workers 0,1,2,4 \
        --out benchmarks/results/input_pipeline_cpu.json [--skip_step] [--step_crop 512]
"""

import argparse
import contextlib
import gc
import importlib
import io
import json
import multiprocessing
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from PIL import Image

OFFICIAL_IMAGES_PER_ITER = 16  # the official 8-GPU LarvSeg run: 8 GPUs x 2 images
RULE = "workers needed = accelerator images/s / per-worker images/s"


def load():
    return [round(x, 2) for x in os.getloadavg()]  # the machine is shared: record its load


def photo_like(rng, h=480, w=640, quality=90):
    """Smooth multi-octave colour noise + fine grain: JPEG sizes like real photos."""
    img = np.zeros((h, w, 3), np.float32)
    for cells, amp in ((3, 90.0), (12, 45.0), (48, 25.0), (160, 12.0)):
        low = rng.normal(size=(cells * h // w + 1, cells + 1, 3)).astype(np.float32)
        up = [
            np.asarray(Image.fromarray(low[..., c]).resize((w, h), Image.BICUBIC)) for c in range(3)
        ]
        img += amp * np.stack(up, -1)
    img += rng.normal(scale=6.0, size=img.shape)
    img = np.clip(img + 128.0, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def label_regions(rng, h=480, w=640, num_classes=150):
    """Voronoi regions of 4-12 classes, plus a little ignore (255), as a uint8 PNG."""
    n = int(rng.integers(4, 13))
    seeds = rng.uniform((0, 0), (h, w), size=(n, 2))
    ys, xs = np.mgrid[0:h:4, 0:w:4]
    d = (ys[..., None] - seeds[:, 0]) ** 2 + (xs[..., None] - seeds[:, 1]) ** 2
    ids = rng.choice(num_classes, size=n, replace=False).astype(np.uint8)
    ids[rng.random(n) < 0.1] = 255
    label = np.repeat(np.repeat(ids[np.argmin(d, -1)], 4, 0), 4, 1)
    buf = io.BytesIO()
    Image.fromarray(label).save(buf, format="PNG")
    return buf.getvalue()


def write_data(data_dir, count, seed):
    from larvseg_jax.data import catalog, sources

    rng = np.random.default_rng(seed)
    sizes = []

    def examples():
        for i in range(count):
            image = photo_like(rng)
            sizes.append(len(image))
            yield {"image": image, "image_id": f"bench_{i:05d}", "label": label_regions(rng)}

    names = catalog.class_names("a150")
    split = {"train": examples}
    sources.write_source(
        data_dir, "wa150", kind="weak", class_names=names, split_examples=split, image_format="jpeg"
    )
    return {"examples": count, "jpeg_kb_mean": float(np.mean(sizes)) / 1024}


def stop(it, timeout=30.0):
    """Shuts the iterator's workers down, so they do not compete with the next measurement."""
    getattr(it, "close", lambda: None)()
    del it
    gc.collect()  # grain stops its worker processes when the iterator is collected
    end = time.time() + timeout
    while multiprocessing.active_children() and time.time() < end:
        time.sleep(0.1)


def cpu_seconds():
    """CPU time (user + system) of this process and its live children, threads included."""
    import psutil

    me, total = psutil.Process(), 0.0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += sum(proc.cpu_times()[:2])
    return total


def time_pipeline(args, data_dir, workers):
    from larvseg_jax.data import pipeline

    load_before, t0 = load(), time.perf_counter()
    it = pipeline.make_train_iterator(
        [pipeline.StreamSpec("wa150", args.crop, (0.5, 2.0))],
        data_dir=data_dir,
        group_sources=["wa150"] * args.groups,  # one source over every group
        local_groups=list(range(args.groups)),
        images_per_group=args.images_per_group,
        seed=0,
        cat_max_ratio=0.75,
        photometric=True,
        num_workers=workers,
        prefetch=args.prefetch,
    )
    next(it)
    first = time.perf_counter() - t0
    # Drain whatever the workers (and their read threads) buffered while the others started.
    warm_batches = max(workers, 1) * 2 * max(args.prefetch, 1)
    for _ in range(warm_batches - 1):
        next(it)
    warm = time.perf_counter() - t0
    cpu0, t1 = cpu_seconds(), time.perf_counter()
    for _ in range(args.batches):
        batch = next(it)
    sec, cpu = time.perf_counter() - t1, cpu_seconds() - cpu0
    image = batch["wa150"]["image"]
    stop(it)
    images = args.batches * args.groups * args.images_per_group
    return {
        "name": "pipeline",
        "workers": workers,
        "batch_shape": list(image.shape),
        "startup_first_batch_s": round(first, 3),
        "warmup_batches": warm_batches,
        "warmup_s": round(warm, 3),
        "timed_batches": args.batches,
        "seconds": round(sec, 3),
        "images_per_sec": images / sec,
        "cpu_s": round(cpu, 2),  # this process + its workers, over the timed batches
        "images_per_cpu_s": images / cpu,
        # workers=0: in-process, the pipeline's 2 read threads; no per-worker rate
        "images_per_sec_per_worker": images / sec / workers if workers else None,
        "loadavg_before": load_before,
        "loadavg_after": load(),
    }


def time_step(args, data_dir):
    import jax

    from larvseg_jax import experiment, sharding, train, train_metrics

    cfg = importlib.import_module(f"configs.{args.step_config}").get_config()
    cfg.data.dir = data_dir
    cfg.data.num_groups = args.step_groups
    cfg.data.images_per_group = 1
    cfg.model.pos_grid = (args.step_crop // 16,) * 2
    for entry in cfg.data.sources.values():
        entry.crop = args.step_crop
    with tempfile.TemporaryDirectory() as workdir:
        setup = experiment.build_setup(cfg, workdir)
    settings, plan = setup.settings, train.group_plan(setup)
    g, b, c = settings.num_groups, settings.images_per_group, args.step_crop
    rng, host = np.random.default_rng(0), {}
    for spec in settings.sources:
        label = np.full((g, b, c, c), -1, np.int32)
        for j, name in enumerate(plan):
            if name == spec.name:  # 4x4 blocks of 6 classes, like a real crop
                blocks = rng.choice(len(spec.cls_index), size=6, replace=False)
                cells = np.arange(16).reshape(4, 4) % 6
                label[j] = np.kron(blocks[cells], np.ones((c // 4, c // 4), np.int64))
        image = rng.normal(size=(g, b, c, c, 3)).astype(np.float32)
        host[spec.name] = {"image": image, "label": label}
    batch = sharding.host_batch_to_global(host, setup.mesh)
    state = train.initial_state(setup)
    fn = train.compile_step(setup, train_metrics.make_metrics_collection(settings))
    times = []
    for _ in range(1 + args.step_rounds):  # the first call compiles
        t0 = time.perf_counter()
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times[1:]))
    return {
        "name": "train_step",
        "config": args.step_config,
        "variant": cfg.model.variant,
        "crop": c,
        "images_per_step": g * b,
        "device": jax.devices()[0].device_kind,
        "compile_and_first_step_s": round(times[0], 1),
        "seconds_per_step": round(sec, 3),
        "images_per_sec": g * b / sec,
        "loadavg": load(),
    }


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--workers", default="0,1,2,4", help="comma-separated grain worker counts")
    p.add_argument("--data_dir", default="", help="write the source here (default: temp)")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--groups", type=int, default=8, help="the paper's 8 GPUs")
    p.add_argument("--images_per_group", type=int, default=2)
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--batches", type=int, default=24, help="timed batches per worker count")
    p.add_argument("--skip_step", action="store_true")
    p.add_argument("--step_config", default="baseline_c171_wa150")
    p.add_argument("--step_crop", type=int, default=512)
    p.add_argument("--step_groups", type=int, default=2, help="1 image per group")
    p.add_argument("--step_rounds", type=int, default=1)
    p.add_argument("--out", default="")
    args = p.parse_args()
    from absl import flags

    flags.FLAGS.mark_as_parsed()  # grain workers read absl flags
    rows = []

    def emit(row):
        print(json.dumps(row), flush=True)
        rows.append(row)

    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or tmp
        t0 = time.perf_counter()
        info = write_data(data_dir, args.examples, seed=0)
        info.update(write_s=round(time.perf_counter() - t0, 1), cpu_count=os.cpu_count())
        emit({"name": "data", **info, "loadavg": load()})
        for workers in (int(w) for w in args.workers.split(",")):
            emit(time_pipeline(args, data_dir, workers))
        step = None if args.skip_step else time_step(args, data_dir)
    if step:
        emit(step)
    pipes = [r for r in rows if r["name"] == "pipeline"]
    one = sorted((r for r in pipes if r["workers"]), key=lambda r: r["workers"]) or pipes
    per_worker = one[0]["images_per_sec_per_worker"] or one[0]["images_per_sec"]
    per_core = min(r["images_per_cpu_s"] for r in one)  # a worker holding one full core
    needed = OFFICIAL_IMAGES_PER_ITER  # images per iteration of the official 8-GPU job
    summary = {
        "name": "summary",
        "rule": RULE,
        "per_worker_images_per_sec": per_worker,
        "per_core_images_per_sec": per_core,
        "best_images_per_sec": max(r["images_per_sec"] for r in pipes),
        "official_images_per_iteration": needed,
        "accelerator_images_per_sec_needed": (
            f"{needed} / (s per iteration) for the 8-GPU job, 2 / (s per iteration) per GPU"
        ),
        "if_iteration_s": [
            {
                "iteration_s": s,
                "images_per_sec": needed / s,
                "workers": needed / s / per_worker,
                "cores": needed / s / per_core,
            }
            for s in (0.25, 0.5, 1.0)
        ],
    }
    if step:
        summary["workers_needed_for_measured_step"] = step["images_per_sec"] / per_worker
    emit(summary)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
