"""Where the ViT-B/16 training time goes, JAX against PyTorch, one run (the profile behind the
README's "Speed against PyTorch").

1. The backbone alone, forward + backward (loss = <features, fixed random tensor>), batch 2 at
   512, JAX and PyTorch alternating round by round: the ratio of paired rounds.
2. Its parts alone, fwd + bwd at the same shapes ([2, 1025, 768] tokens): the attention core
   (this project's custom-VJP blockwise form, JAX autodiff, PyTorch's fused
   scaled_dot_product_attention), LayerNorm, the MLP and the QKV projection; and the GEMM
   libraries alone: a block's 12 products (forward, input and weight gradient of its four
   projections) as plain matmuls, XLA's and this project's kernel (models/cpu_gemm.cc) against
   PyTorch's (MKL), paired rounds.
3. With --trace: one JAX backbone step under jax.profiler, its XLA ops summed by kind: the large
   dense matmuls and the attention's small matmuls with their achieved GFLOP/s, and the rest.

  pip install -r requirements-bench.txt
  python benchmarks/backbone_parts.py --depth 4 --rounds 4 --trace
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn
import jax
import jax.numpy as jnp
import jsonl
import numpy as np
import torch
import torch.nn.functional as F
import torch_reference

from larvseg_jax import host_malloc
from larvseg_jax.models import attention, cpu_gemm, vit

B, CROP, D, HEADS, MLP = 2, 512, 768, 12, 3072
N = (CROP // 16) ** 2 + 1


def median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jax_backbone(depth: int):
    model = vit.vit_from_variant("B/16", pos_grid=(32, 32), drop_path_rate=0.1, depth=depth)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, CROP, CROP, 3)).astype(np.float32))
    w = jnp.asarray(rng.normal(size=(B, 32, 32, D)).astype(np.float32))
    keys = {"params": jax.random.PRNGKey(0), "dropout": jax.random.PRNGKey(1)}
    params = model.init(keys, x[:1], train=True)["params"]

    def loss(p, x, key):
        return jnp.sum(model.apply({"params": p}, x, train=True, rngs={"dropout": key}) * w)

    grad = jax.jit(jax.grad(loss))
    key = jax.random.PRNGKey(2)
    return grad, (params, x, key)


def torch_backbone(depth: int):
    net = torch_reference.PlainViT(CROP, D, depth, HEADS, MLP, 16, 0.1)
    x, w = torch.randn(B, 3, CROP, CROP), torch.randn(B, N, D)

    def step():
        net.zero_grad()
        (net.forward_features(x) * w).sum().backward()

    return step


def parts(reps: int) -> dict:
    """Seconds per fwd + bwd of each part alone, JAX and PyTorch."""
    rng = np.random.default_rng(0)
    out = {}
    q, k, v = (
        jnp.asarray(rng.normal(size=(B, HEADS, N, D // HEADS)).astype(np.float32)) for _ in "qkv"
    )
    for impl in ("cpu_kernel", "custom_vjp", "xla"):
        g = jax.jit(
            jax.grad(
                lambda q, k, v, impl=impl: jnp.sum(
                    attention.attention(q, k, v, implementation=impl) * q
                ),
                argnums=(0, 1, 2),
            )
        )
        out[f"attention_jax_{impl}"] = median_time(
            lambda g=g: jax.block_until_ready(g(q, k, v)), reps
        )
    qt, kt, vt = (torch.tensor(np.asarray(t), requires_grad=True) for t in (q, k, v))
    out["attention_torch_sdpa"] = median_time(
        lambda: (F.scaled_dot_product_attention(qt, kt, vt) * qt).sum().backward(), reps
    )
    x = jnp.asarray(rng.normal(size=(B, N, D)).astype(np.float32))
    xt = torch.tensor(np.asarray(x), requires_grad=True)
    modules = {
        "layernorm": (nn.LayerNorm(epsilon=1e-6), torch.nn.LayerNorm(D, eps=1e-6)),
        "mlp": (  # the model's own block: its Dense and its erf GELU
            vit.MlpBlock(MLP),
            torch.nn.Sequential(torch.nn.Linear(D, MLP), torch.nn.GELU(), torch.nn.Linear(MLP, D)),
        ),
        "mlp_flax_erfc_gelu": (  # flax's exact GELU (erfc form), what the model used before
            nn.Sequential([nn.Dense(MLP), lambda y: nn.gelu(y, approximate=False), nn.Dense(D)]),
            None,
        ),
        "qkv": (nn.Dense(3 * D), torch.nn.Linear(D, 3 * D)),
    }
    for name, (jax_module, torch_module) in modules.items():
        p = jax_module.init(jax.random.PRNGKey(0), x)
        sink = jnp.asarray(rng.normal(size=jax_module.apply(p, x).shape).astype(np.float32))
        g = jax.jit(
            jax.grad(lambda p, x, m=jax_module, s=sink: jnp.sum(m.apply(p, x) * s), argnums=(0, 1))
        )
        out[f"{name}_jax"] = median_time(lambda g=g, p=p: jax.block_until_ready(g(p, x)), reps)
        if torch_module is None:
            continue
        sink_t = torch.tensor(np.asarray(sink))
        out[f"{name}_torch"] = median_time(
            lambda m=torch_module, s=sink_t: (m(xt) * s).sum().backward(), reps
        )
    return out


def block_gemms(rounds: int) -> dict:
    """One block's 12 projection GEMMs as plain matmuls (x @ w, g @ w.T, x.T @ g for QKV, out,
    MLP in and out, 2050 tokens), one after another in both frameworks (one jit per product, so
    XLA does not run them two at a time), XLA's dot, this project's GEMM kernel (where it builds)
    and PyTorch alternating: what the GEMM library alone accounts for in the backbone ratio."""
    rng = np.random.default_rng(0)
    m = B * N
    shapes = ((D, 3 * D), (D, D), (D, MLP), (MLP, D))
    operands = [
        [rng.standard_normal(s, np.float32) for s in ((m, i), (i, o), (m, o))] for i, o in shapes
    ]
    forms = (lambda x, w, g, t: x @ w, lambda x, w, g, t: g @ t(w), lambda x, w, g, t: t(x) @ g)
    jitted = [jax.jit(lambda x, w, g, f=f: f(x, w, g, jnp.transpose)) for f in forms]
    kernel_forms = (  # the same products through the CPU GEMM kernel (model.gemm "cpu_kernel")
        lambda x, w, g: cpu_gemm.matmul(x, w),
        lambda x, w, g: cpu_gemm.matmul(g, w, transpose_b=True),
        lambda x, w, g: cpu_gemm.matmul(x, g, transpose_a=True),
    )
    kernel_jitted = [jax.jit(f) for f in kernel_forms]

    def run_jax(fns):
        for x, w, g in jax_ops:
            for f in fns:
                f(x, w, g).block_until_ready()

    def run_torch():
        for x, w, g in torch_ops:
            for f in forms:
                f(x, w, g, torch.t)

    jax_ops = jax.tree.map(jnp.asarray, operands)
    torch_ops = jax.tree.map(torch.from_numpy, operands)
    runs = {"jax": lambda: run_jax(jitted), "torch": run_torch}
    if cpu_gemm.available():
        runs["jax_kernel"] = lambda: run_jax(kernel_jitted)
    times = {name: [] for name in runs}
    for i in range(rounds + 1):  # the first round compiles / warms up
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            if i:
                times[name].append(time.perf_counter() - t0)
    gflop = sum(3 * 2 * m * i * o for i, o in shapes) / 1e9
    return {
        "gflop": round(gflop, 1),
        **{f"{k}_s": round(float(np.median(v)), 4) for k, v in times.items()},
        **{f"{k}_gflop_per_s": round(gflop / float(np.median(v))) for k, v in times.items()},
        **{
            f"{k}_over_torch": round(float(np.median(np.array(v) / times["torch"])), 3)
            for k, v in times.items()
            if k != "torch"
        },
    }


def _dot_flops(body: str) -> int:
    """2 x output size x contraction size of every dot in a fused computation's HLO text."""
    total = 0
    for line in body.splitlines():
        if " dot(" not in line:
            continue
        out = re.search(r"= f32\[([\d,]*)\]", line)
        lhs = re.search(r"dot\(%(\S+),", line)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
        lhs_shape = lhs and re.search(r"%" + re.escape(lhs.group(1)) + r" = f32\[([\d,]*)\]", body)
        if not (out and contracting and lhs_shape):
            continue
        dims = [int(s) for s in lhs_shape.group(1).split(",")]
        k = int(np.prod([dims[int(i)] for i in contracting.group(1).split(",")]))
        total += 2 * k * int(np.prod([int(s) for s in out.group(1).split(",") if s]))
    return total


def _kernel_calls(hlo: str) -> dict[str, tuple[str, int]]:
    """{custom call name: (kind, FLOPs)} of the C++ kernels' calls: "gemm_kernel" with 2 M N K
    (out [M, N], K = the first operand's size / M), "attention_kernel" (FLOPs not counted)."""
    out = {}
    pattern = (
        r"%(\S+) = (\S+) custom-call\(.*?\), custom_call_target=\"(larvseg_\w+)\", "
        r"operand_layout_constraints=\{f32\[([\d,]+)\]"
    )
    for name, result, target, first in re.findall(pattern, hlo):
        if target != "larvseg_gemm":
            out[name] = ("attention_kernel", 0)
            continue
        n = int(re.match(r"f32\[\d+,(\d+)\]", result).group(1))
        out[name] = ("gemm_kernel", 2 * n * int(np.prod([int(d) for d in first.split(",")])))
    return out


def trace_breakdown(grad, args) -> dict:
    """Sums one traced step's XLA ops: dense matmuls (>= 1 GFLOP each), attention matmuls
    (smaller), the C++ kernels' calls (GEMM, attention), everything else; with the wall time of
    the step."""
    hlo = grad.lower(*args).compile().as_text()
    calls = dict(re.findall(r"%(\S+) = [^\n]*?calls=%(fused_computation[.\d]*)", hlo))
    bodies = {
        m.group(1): m.group(2)
        for m in re.finditer(
            r"^%(fused_computation[.\d]*) .*? \{\n(.*?)^\}", hlo, re.MULTILINE | re.DOTALL
        )
    }
    kernels = _kernel_calls(hlo)
    jax.block_until_ready(grad(*args))
    with tempfile.TemporaryDirectory() as folder:
        with jax.profiler.trace(folder, create_perfetto_trace=True):
            t0 = time.perf_counter()
            jax.block_until_ready(grad(*args))
            wall = time.perf_counter() - t0
        path = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)[0]
        with gzip.open(path) as f:
            events = json.load(f)["traceEvents"]
    kinds = collections.defaultdict(lambda: {"ms": 0.0, "gflop": 0.0, "ops": 0})
    for e in events:
        if e.get("ph") != "X" or "hlo_op" not in e.get("args", {}):
            continue
        flops = _dot_flops(bodies.get(calls.get(e["name"], ""), ""))
        kind = "other"
        if flops:
            kind = "dense_matmul" if flops >= 1e9 else "attention_matmul"
        elif e["name"] in kernels:
            kind, flops = kernels[e["name"]]
        kinds[kind]["ms"] += e["dur"] / 1e3
        kinds[kind]["gflop"] += flops / 1e9
        kinds[kind]["ops"] += 1
    for v in kinds.values():
        v["gflop_per_s"] = round(v["gflop"] / v["ms"] * 1e3, 1) if v["gflop"] else None
        v["ms"], v["gflop"] = round(v["ms"], 1), round(v["gflop"], 1)
    return {"wall_s": round(wall, 3), "ops_by_kind": dict(kinds)}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--depth", type=int, default=12, help="transformer blocks (12 in ViT-B/16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--trace", action="store_true", help="also profile one JAX step")
    p.add_argument("--torch-threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results", "backbone_parts_cpu.jsonl"),
    )
    p.add_argument(
        "--default-malloc",
        action="store_true",
        help="leave glibc malloc as it is (default: LARVSEG_MALLOC=keep, as train_step.py)",
    )
    args = p.parse_args()
    if not args.default_malloc:
        os.environ["LARVSEG_MALLOC"] = "keep"
    kept = host_malloc.keep_freed_memory("B/16")
    torch.set_num_threads(args.torch_threads)
    grad, grad_args = jax_backbone(args.depth)
    torch_step = torch_backbone(args.depth)
    jax.block_until_ready(grad(*grad_args))
    torch_step()
    times = {"jax": [], "torch": []}
    for _ in range(args.rounds):
        t0 = time.perf_counter()
        jax.block_until_ready(grad(*grad_args))
        times["jax"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        torch_step()
        times["torch"].append(time.perf_counter() - t0)
    ratio = float(np.median(np.array(times["jax"]) / np.array(times["torch"])))
    row = {
        "name": "backbone_parts",
        "device": jax.devices()[0].device_kind,
        "threads": args.torch_threads,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "host_malloc": "keep_freed_memory" if kept else "default",
        "depth": args.depth,
        "gemm_kernel": cpu_gemm.available(),  # the backbone's projections use it (model.gemm auto)
        "batch": B,
        "crop": CROP,
        "backbone_s": {k: [round(t, 3) for t in v] for k, v in times.items()},
        "backbone_jax_over_torch": round(ratio, 3),
        "parts_s": {k: round(v, 4) for k, v in parts(max(args.rounds, 3)).items()},
        "block_gemms": block_gemms(max(2 * args.rounds, 5)),
    }
    if args.trace:
        row["jax_trace"] = trace_breakdown(grad, grad_args)
    jsonl.emit([row], args.out)


if __name__ == "__main__":
    main()
