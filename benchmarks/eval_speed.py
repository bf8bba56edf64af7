"""Evaluation speed: the batched sliding-window runner against the per-image path, one run.

Random-weight model, images of A150-like sizes (short side resized to the crop, 4:3-ish aspect
ratios of both orientations, originals of varied size). Both paths predict the same images twice:
the first pass includes compilation (the number of XLA compilations is counted), the second is
warm. Prints one JSON line (also appended to --out) with images/s, windows/s, achieved GFLOP/s of
the model calls, compilations, and the projected time of A150 validation (2,000 images).

  python benchmarks/eval_speed.py --variant tiny --crop 64 --images 64
  python benchmarks/eval_speed.py --variant B/16 --crop 512 --images 8
  python benchmarks/eval_speed.py --variant tiny --crop 512 --images 8 --classes 11276 \
      --paths batched          # the I11K vocabulary, class-chunked (eval.class_chunk)

"peak_rss_gib" is the process's peak resident memory after each path (the batched path runs
first, so its figure is its own).
"""

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax._src.dispatch import BACKEND_COMPILE_EVENT

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jsonl

from larvseg_jax import slide, slide_image, tiles
from larvseg_jax.models import segmenter, vit

A150_VAL_IMAGES = 2000


def make_images(n: int, crop: int, seed: int) -> list:
    rng = np.random.default_rng(seed)
    items = []
    for i in range(n):
        long = int(crop * rng.uniform(1.0, 1.6))
        hw = (crop, long) if rng.random() < 0.7 else (long, crop)  # most photos are landscape
        scale = rng.uniform(0.6, 1.3)
        out_hw = (max(8, int(hw[0] * scale)), max(8, int(hw[1] * scale)))
        items.append((i, rng.normal(size=(*hw, 3)).astype(np.float32), out_hw))
    return items


def timed(fn):
    compiles = []

    def count(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(count)
    t0 = time.perf_counter()
    try:
        fn()
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    return time.perf_counter() - t0, len(compiles), float(sum(compiles))


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="tiny", choices=sorted(vit.VARIANTS))
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--classes", type=int, default=150)
    p.add_argument("--images", type=int, default=64)
    p.add_argument(
        "--batch", type=int, default=8, help="windows per model call (eval.batch_windows)"
    )
    p.add_argument("--class-chunk", type=int, default=1024, help="eval.class_chunk (0 = off)")
    p.add_argument("--paths", default="batched,per_image", help="which of batched,per_image to run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "eval_speed_cpu.jsonl")
    )
    args = p.parse_args()

    patch = vit.VARIANTS[args.variant]["patch_size"]
    backbone = vit.vit_from_variant(args.variant, pos_grid=(args.crop // patch,) * 2)
    model = segmenter.Segmenter(backbone=backbone, num_classes=args.classes)
    x = jnp.zeros((1, args.crop, args.crop, 3))
    index = jnp.arange(args.classes, dtype=jnp.int32)
    params = model.init(jax.random.PRNGKey(args.seed), x, index, train=False)["params"]

    @jax.jit
    def predict(images):
        return model.apply({"params": params}, images, index, train=False)[0]

    window_flops = predict.lower(x).compile().cost_analysis().get("flops", float("nan"))
    items = make_images(args.images, args.crop, args.seed)
    windows = sum(
        len(slide_image.slide_windows(*im.shape[:2], args.crop, args.crop)) for _, im, _ in items
    )
    row = {
        "device": jax.devices()[0].device_kind,
        "variant": args.variant,
        "crop": args.crop,
        "classes": args.classes,
        "images": args.images,
        "windows": windows,
        "distinct_sizes": len({(im.shape, hw) for _, im, hw in items}),
        "batch": args.batch,
        "class_chunk": args.class_chunk,
        "window_gflop": window_flops / 1e9,
    }
    device = jax.devices()[0]

    def batched():
        runner = slide.SlideRunner(
            predict,
            num_classes=args.classes,
            crop=args.crop,
            stride=args.crop,
            batch=args.batch,
            devices=[device],
            class_chunk=args.class_chunk,
        )
        for _ in runner.run(items):
            pass
        row["batched_windows_run"] = runner.windows_run

    def per_image():
        for _, image, out_hw in items:
            logits = slide_image.slide_inference(
                predict,
                image,
                num_classes=args.classes,
                crop=args.crop,
                stride=args.crop,
                device=device,
            )
            np.asarray(tiles.resize_to_labels(logits, out_hw)[0])

    paths = args.paths.split(",")
    for name, fn in (("batched", batched), ("per_image", per_image)):
        if name not in paths:
            continue
        cold, compiles, compile_s = timed(fn)
        warm, _, _ = timed(fn)
        row[name] = {
            "cold_s": round(cold, 3),
            "warm_s": round(warm, 3),
            "compilations": compiles,
            "compile_s": round(compile_s, 2),
            "images_per_s": round(args.images / warm, 3),
            "windows_per_s": round(windows / warm, 3),
            "gflop_per_s": round(windows * window_flops / warm / 1e9, 2),
            "a150_val_projected_s": round(A150_VAL_IMAGES / (args.images / warm) + compile_s, 1),
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        }
    if len(paths) == 2:
        row["speedup_warm"] = round(row["per_image"]["warm_s"] / row["batched"]["warm_s"], 3)
        row["speedup_cold"] = round(row["per_image"]["cold_s"] / row["batched"]["cold_s"], 3)
    jsonl.emit([row], args.out)


if __name__ == "__main__":
    main()
