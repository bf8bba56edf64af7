"""Extra cost of the CA-classifier per train step: baseline step vs LarvSeg step, same run.

Builds the real train step (shard_map + scan + switch) on random data for a 1:1 weak:seg mix,
times both variants alternately after compilation, and prints one JSON line per variant plus a
ratio line: seconds/step, images/s, XLA FLOPs, achieved GFLOP/s, the bank's bytes and XLA's
temporary (activation) bytes of the compiled step.

    python benchmarks/ca_cost.py --variant tiny --crop 64 --groups 8
    python benchmarks/ca_cost.py --variant B/16 --crop 512 --groups 2 --classes 251 --topk 20 --memory 20
"""

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from larvseg_jax import ca_classifier, groups, sharding
from larvseg_jax.models import segmenter, vit
from larvseg_jax.optim import make_optimizer
from larvseg_jax.train_step import (
    SourceSpec,
    StepSettings,
    create_train_state,
    state_shardings,
    train_step,
)


def build(args, with_ca, dtype="float32"):
    n_weak = args.classes // 2
    sources = (
        SourceSpec("weak", "weak", tuple(range(n_weak)), 0.1, args.crop, ca_weight=0.1),
        SourceSpec("seg", "seg", tuple(range(n_weak // 2, args.classes)), 1.0, args.crop),
    )
    plan = groups.group_sources(["weak", "seg"], [1, 1], args.groups)
    ca = ca_classifier.CASettings(
        memory_size=args.memory, topk=args.topk, warm_up=getattr(args, "warm_up", 1)
    )
    settings = StepSettings(
        sources=sources,
        group_source_ids=tuple(["weak", "seg"].index(s) for s in plan),
        images_per_group=args.batch,
        seg_normalize="all_pixels",
        downsample_rate=2,
        ca=ca if with_ca else None,
        accumulate_gradients=getattr(args, "accumulate", True),
    )
    grid = (args.crop // vit.VARIANTS[args.variant]["patch_size"],) * 2
    dtype = jnp.dtype(dtype)  # compute dtype; params stay fp32
    model = segmenter.Segmenter(
        backbone=vit.vit_from_variant(
            args.variant,
            pos_grid=grid,
            drop_path_rate=0.1,
            dtype=dtype,
            attention=getattr(args, "attention", "auto"),
            gemm=getattr(args, "gemm", "auto"),
        ),
        num_classes=args.classes,
        dtype=dtype,
    )
    tx, schedule = make_optimizer(
        lr=1e-3, end_lr=1e-5, power=0.9, momentum=0.9, weight_decay=0.0, total_steps=1000
    )
    mesh = sharding.make_mesh()
    state = create_train_state(jax.random.PRNGKey(0), model, tx, args.crop, settings)
    shard = state_shardings(state, mesh)
    state = jax.device_put(state, shard)
    fn = jax.jit(
        functools.partial(
            train_step, model=model, tx=tx, settings=settings, mesh=mesh, schedule=schedule
        ),
        in_shardings=(shard, sharding.data_sharded(mesh)),
        out_shardings=(shard, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    return fn, state, plan, mesh, settings


def batch_for(args, plan, rng):
    out = {}
    for name, n in (("weak", args.classes // 2), ("seg", args.classes - args.classes // 4)):
        shape = (args.groups, args.batch, args.crop, args.crop)
        labels = np.full(shape, -1, np.int32)
        for g, src in enumerate(plan):
            if src == name:  # blocks of 6 classes per image, like a real crop
                blocks = rng.integers(0, n, size=(args.batch, 6))
                cell = args.crop // 4
                for b in range(args.batch):
                    for i in range(16):
                        y, x = divmod(i, 4)
                        labels[g, b, y * cell : (y + 1) * cell, x * cell : (x + 1) * cell] = blocks[
                            b, i % 6
                        ]
        out[name] = {"image": rng.normal(size=shape + (3,)).astype(np.float32), "label": labels}
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--variant", default="tiny")
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--classes", type=int, default=251)
    p.add_argument("--topk", type=int, default=20)
    p.add_argument("--memory", type=int, default=20)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    variants = {}
    for name, with_ca in (("baseline", False), ("larvseg", True)):
        fn, state, plan, mesh, _settings = build(args, with_ca)
        batch = sharding.host_batch_to_global(batch_for(args, plan, rng), mesh)
        compiled = fn.lower(state, batch).compile()
        flops = (compiled.cost_analysis() or {}).get("flops", float("nan"))
        memory = compiled.memory_analysis()
        temp_bytes = int(memory.temp_size_in_bytes) if memory is not None else -1
        state, m = fn(state, batch)
        jax.block_until_ready(m)
        variants[name] = {
            "fn": fn,
            "state": state,
            "batch": batch,
            "flops": flops,
            "temp_bytes": temp_bytes,
            "times": [],
        }
    for _ in range(args.rounds):  # alternate, so machine drift hits both alike
        for v in variants.values():
            t0 = time.perf_counter()
            v["state"], m = v["fn"](v["state"], v["batch"])
            jax.block_until_ready(m)
            v["times"].append(time.perf_counter() - t0)
    images = args.groups * args.batch
    common = {
        k: getattr(args, k)
        for k in ("variant", "crop", "groups", "batch", "classes", "topk", "memory")
    }
    common["device"] = jax.devices()[0].device_kind
    for name, v in variants.items():
        sec = float(np.median(v["times"]))
        bank = v["state"].bank
        print(
            json.dumps(
                {
                    "name": f"step_{name}",
                    **common,
                    "seconds_per_step": sec,
                    "images_per_sec": images / sec,
                    "xla_gflop": v["flops"] / 1e9,
                    "gflop_per_sec": v["flops"] / 1e9 / sec,
                    "bank_bytes": int(sum(x.nbytes for x in jax.tree.leaves(bank)))
                    if bank is not None
                    else 0,
                    "temp_bytes": v["temp_bytes"],
                }
            )
        )
    ratios = [c / b for b, c in zip(variants["baseline"]["times"], variants["larvseg"]["times"])]
    print(
        json.dumps(
            {"name": "ca_overhead", **common, "larvseg_over_baseline": float(np.median(ratios))}
        )
    )


if __name__ == "__main__":
    main()
