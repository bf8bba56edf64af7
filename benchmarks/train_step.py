"""This project's LarvSeg train step against the same step in PyTorch (timm ViT-B/16), one run.

Both steps: ViT-B/16 at 512, the paper's cosine head and mask norm, seg CE, image-level CE and
the CA-classifier (M=20, K=40, warm-up 0 so every pair does the full work), a 1:1 seg:weak mix
of 2 images each over a 251-class union, fp32, SGD with momentum. After compilation / a warm-up
step the steps alternate round by round (machine drift hits all alike); the ratio is the median
over rounds of this project's time over PyTorch's in the same round. Also: images/s, achieved
GFLOP/s (analytic ViT FLOPs: 3 x forward per image) against a matmul peak measured in this run,
JAX compile time, XLA's temporary memory and PyTorch's peak step memory (a child process's
max RSS growth over one step). Both steps run in one process with main.py's opt-in host malloc
setting (LARVSEG_MALLOC=keep, larvseg_jax/host_malloc.py; --default-malloc leaves glibc's).
Prints JSON lines and a Markdown table; appends to --out.

  pip install -r requirements-bench.txt
  python benchmarks/train_step.py --rounds 3                 # ViT-B/16 at 512
  python benchmarks/train_step.py --variant tiny --crop 64 --rounds 5
"""

import argparse
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ca_cost
import jax
import jax.numpy as jnp
import jsonl
import numpy as np
import torch
import torch_reference

from larvseg_jax import host_malloc, sharding
from larvseg_jax.models import vit


def vit_forward_flops(variant: str, crop: int) -> float:
    """Matmul FLOPs of one image's ViT forward: 24 N D^2 + 4 N^2 D per layer."""
    cfg = vit.VARIANTS[variant]
    n = (crop // cfg["patch_size"]) ** 2 + 1
    d, depth, mlp = cfg["width"], cfg["depth"], cfg["mlp_dim"]
    return depth * (8 * n * d * d + 4 * n * d * mlp + 4 * n * n * d)


def matmul_peak(dtypes, n=2048, reps=5) -> dict:
    """GFLOP/s of an n x n matmul per framework and dtype: {"jax": {dtype: rate}, "torch": ...}."""
    out = {"jax": {}, "torch": {}}
    for dtype in dtypes:
        a = jnp.ones((n, n), dtype)
        # float32 accumulation, as the model's matmuls (larvseg_jax/models/matmul.py)
        f = jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32))
        f(a).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(reps):
            f(a).block_until_ready()
        out["jax"][dtype] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
        b = torch.ones(n, n, dtype=getattr(torch, dtype))
        b @ b
        t0 = time.perf_counter()
        for _ in range(reps):
            b @ b
        out["torch"][dtype] = 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9
    return out


def torch_inputs(args, batch, plan):
    """The JAX batch's seg and weak groups as NCHW float and (B, H, W) long tensors."""
    out = []
    for name in ("seg", "weak"):
        g = plan.index(name)
        images = torch.from_numpy(np.ascontiguousarray(batch[name]["image"][g])).permute(0, 3, 1, 2)
        labels = torch.from_numpy(batch[name]["label"][g].astype(np.int64))
        out += [images.contiguous(), labels]
    return out


def build_torch(args, bf16=False):
    n_weak = args.classes // 2
    torch.manual_seed(0)
    step = torch_reference.Step(
        args.classes,
        args.crop,
        args.memory,
        args.topk,
        seg_index=list(range(n_weak // 2, args.classes)),
        weak_index=list(range(n_weak)),
        sizes=vit.VARIANTS[args.variant],
        bf16=bf16,
    )
    return step


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _torch_peak_child(args, inputs, bf16, queue):
    torch.set_num_threads(args.torch_threads)
    step = build_torch(args, bf16)
    step(*inputs)  # the first step allocates the optimizer's momentum buffers
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    step(*inputs)
    queue.put((_status_kib("VmHWM") - before) * 1024)


def torch_peak_bytes(args, inputs, bf16=False) -> int:
    """Peak RSS growth over a second step in a fresh process: the step's working memory
    (activations, gradients, temporaries) next to XLA's temporary bytes."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_torch_peak_child, args=(args, inputs, bf16, queue))
    proc.start()
    value = queue.get()
    proc.join()
    return int(value)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="B/16", choices=sorted(vit.VARIANTS))
    p.add_argument("--crop", type=int, default=512)
    p.add_argument("--classes", type=int, default=251)
    p.add_argument("--topk", type=int, default=40)
    p.add_argument("--memory", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of both steps (bfloat16 also runs the fp32 steps for comparison)",
    )
    p.add_argument("--no-peak", action="store_true", help="skip PyTorch's peak-memory child run")
    p.add_argument(
        "--jax-only",
        action="store_true",
        help="no PyTorch steps: the JAX steps alternate among themselves (no ratios)",
    )
    p.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step_cpu.jsonl")
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is (by default both steps run with main.py's opt-in "
        "LARVSEG_MALLOC=keep, larvseg_jax/host_malloc.py: freed memory kept, fewer page faults)",
    )
    args = p.parse_args()
    if not args.default_malloc:
        os.environ["LARVSEG_MALLOC"] = "keep"
    kept = host_malloc.keep_freed_memory(args.variant)
    args.groups, args.batch, args.warm_up = 2, 2, 0
    torch.set_num_threads(args.torch_threads)
    rng = np.random.default_rng(0)

    contenders = {}
    # "jax" is the default step (model.attention and model.gemm "auto": on this CPU the fused
    # attention kernel, and in float32 the GEMM kernel for the large projections);
    # "jax_xla_gemm" the same with XLA's dot for every projection (what the GEMM kernel buys);
    # "jax_pure_xla" also with the pure-XLA attention ("custom_vjp"): what runs where no kernel
    # can be built. With --dtype bfloat16 both sides compute in bf16 (JAX: model.dtype, PyTorch:
    # CPU autocast) and the fp32 steps run alongside, so every ratio comes from the same rounds.
    jax_runs = [("jax", "auto", "auto", args.dtype)]
    if args.dtype == "float32":
        jax_runs.append(("jax_xla_gemm", "auto", "xla", "float32"))
        jax_runs.append(("jax_pure_xla", "custom_vjp", "xla", "float32"))
    else:
        jax_runs.append(("jax_fp32", "auto", "auto", "float32"))
    for name, attention, gemm, dtype in jax_runs:
        args.attention, args.gemm = attention, gemm
        fn, state, plan, mesh, _ = ca_cost.build(args, with_ca=True, dtype=dtype)
        host = ca_cost.batch_for(args, plan, rng)
        batch = sharding.host_batch_to_global(host, mesh)
        t0 = time.perf_counter()
        compiled = fn.lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
        mem = compiled.memory_analysis()
        state, m = compiled(state, batch)
        jax.block_until_ready(m)
        contenders[name] = {
            "run": lambda c=compiled, b=batch, n=name: _jax_step(contenders[n], c, b),
            "state": state,
            "compile_s": compile_s,
            "temp_bytes": int(mem.temp_size_in_bytes) if mem is not None else -1,
            "dtype": dtype,
            "times": [],
        }
    inputs = torch_inputs(args, host, plan)
    torch_runs = [] if args.jax_only else [("torch", args.dtype)]
    if args.dtype != "float32" and not args.jax_only:
        torch_runs.append(("torch_fp32", "float32"))
    for name, dtype in torch_runs:
        bf16 = dtype == "bfloat16"
        peak = -1 if args.no_peak else torch_peak_bytes(args, inputs, bf16)
        step = build_torch(args, bf16)
        step(*inputs)  # warm-up
        contenders[name] = {
            "run": lambda s=step: s(*inputs),
            "peak_bytes": peak,
            "dtype": dtype,
            "backbone": step.model.backbone_kind,
            "times": [],
        }

    for _ in range(args.rounds):
        for c in contenders.values():
            t0 = time.perf_counter()
            c["run"]()
            c["times"].append(time.perf_counter() - t0)

    peaks = matmul_peak(sorted({"float32", args.dtype}))
    images = args.groups * args.batch
    flops = 3 * vit_forward_flops(args.variant, args.crop) * images
    common = {
        "with_torch_steps": not args.jax_only,
        "variant": args.variant,
        "crop": args.crop,
        "classes": args.classes,
        "topk": args.topk,
        "memory": args.memory,
        "images": images,
        "device": jax.devices()[0].device_kind,
        "threads": args.torch_threads,
        "host_malloc": "keep_freed_memory" if kept else "default",
        "step_gflop_analytic": flops / 1e9,
        "matmul_peak": peaks,
    }
    rows = []
    for name, c in contenders.items():
        sec = float(np.median(c["times"]))
        row = {
            "name": name,
            **common,
            "seconds_per_step": sec,
            "times": c["times"],
            "images_per_sec": images / sec,
            "gflop_per_sec": flops / sec / 1e9,
            "fraction_of_peak": flops
            / sec
            / 1e9
            / peaks["torch" if name.startswith("torch") else "jax"][c["dtype"]],
        }
        for key in ("compile_s", "temp_bytes", "peak_bytes", "backbone", "dtype"):
            if key in c:
                row[key] = c[key]
        rows.append(row)
    for name, *_ in jax_runs:
        for ref, _ in torch_runs:
            pairs = zip(contenders[name]["times"], contenders[ref]["times"])
            ratio = float(np.median([a / b for a, b in pairs]))
            rows.append({"name": f"{name}_over_{ref}", **common, "ratio": ratio})
    jsonl.emit(rows, args.out)
    print(markdown(rows))


def _jax_step(c, compiled, batch):
    c["state"], m = compiled(c["state"], batch)
    jax.block_until_ready(m)


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def markdown(rows) -> str:
    lines = [
        (
            "| step | dtype | s/step (median) | images/s | GFLOP/s (% of matmul peak) | memory "
            "| vs PyTorch (median of paired rounds) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "ratio" in r:
            continue
        if "temp_bytes" in r:
            mem = f"XLA temp {size(r['temp_bytes'])}"
        elif r["peak_bytes"] >= 0:
            mem = f"peak RSS +{size(r['peak_bytes'])}"
        else:
            mem = "not measured (--no-peak)"
        prefix = r["name"] + "_over_"
        vs = "; ".join(
            f"{q['ratio']:.2f}x {q['name'][len(prefix) :]}"
            for q in rows
            if "ratio" in q and q["name"].startswith(prefix)
        )
        lines.append(
            f"| {r['name']} | {r['dtype']} | {r['seconds_per_step']:.3g} | "
            f"{r['images_per_sec']:.3g} | {r['gflop_per_sec']:.0f} "
            f"({100 * r['fraction_of_peak']:.0f} %) | {mem} | {vs or ('1' if r['name'].startswith('torch') else '-')} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
