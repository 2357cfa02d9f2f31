"""Benchmark of the S-CFG core per denoising step, against the attention it observes.

    python -m scfg_ext.bench [--device cuda] [--configs sd15-512 sdxl-1024] [--batches 1 4]

For each configuration it builds random q/k/v with the real shapes of the observed blocks (rows =
cond + uncond per image), times torch SDPA on them (what the UNet runs anyway: self- and
cross-attention of those blocks) and the S-CFG work of one step (the capture of every block and the
rate map), alternating the two, and prints the ratio from the same run. Peak extra memory is CUDA's
allocator peak on a GPU; on the CPU it is the growth of the process's peak RSS, measured in a fresh
subprocess per configuration after the attention baseline has reached its own peak.

Recomputing ``to_q`` / ``to_k`` of every observed block is timed separately ("q/k recompute"), with
the real projection sizes: what a host adapter pays when it cannot reuse the attention's own q/k
(the A1111 adapter reuses them unless another extension changed the attention's inputs; Forge's
patches receive them). ``--profile`` prints torch.profiler's top operators of one S-CFG step (core
+ q/k recompute) of the first config and batch instead of the table. ``--count-ops`` prints the
aten operators S-CFG issues per observed block and per step, and its host syncs per step, on the two
code paths a GPU takes (fused SDPA kernels, or materialised maps where the card has no such kernel
for the shapes), counted on any device with a dispatch mode; see ``count_ops``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import attention
from .params import make_params
from .report import RunReport
from .segment import Geometry
from .step import Pair, StepCapture


@dataclass(frozen=True)
class Level:
    size: tuple[int, int]
    blocks: int
    heads: int
    dim_head: int


CONFIGS = {
    # SD1.5 at 512²: latent 64²; latent/4 (in7, in8, out3-5) and latent/8 (middle), 8 heads × 160.
    "sd15-512": ((64, 64), [Level((16, 16), 5, 8, 160), Level((8, 8), 1, 8, 160)]),
    # SDXL at 1024²: latent 128²; latent/4 only: in7, in8, middle, out0-2 × 10 transformer blocks.
    "sdxl-1024": ((128, 128), [Level((32, 32), 60, 20, 64)]),
    # SDXL at 512² (what a CPU WebUI run can afford): latent 64², latent/4 = 16².
    "sdxl-512": ((64, 64), [Level((16, 16), 60, 20, 64)]),
}
CONTEXT_DIM = {"sd15": 768, "sdxl": 2048}
CONTEXT = 77


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_inputs(levels, batch, device, dtype, max_blocks):
    rows = 2 * batch
    blocks = []
    for level in levels:
        n, inner = level.size[0] * level.size[1], level.heads * level.dim_head
        for _ in range(min(level.blocks, max_blocks)):
            x = [torch.randn(rows, t, inner, device=device, dtype=dtype) * 0.3
                 for t in (n, n, n, CONTEXT, CONTEXT)]
            blocks.append((level, *x))
    return blocks


def make_projections(config, levels, batch, device, dtype, max_blocks):
    """What the A1111 adapter recomputes per block: to_q(x), to_k(x) of attn1 and to_q(x),
    to_k(context) of attn2 (inner = channels for SD1.5/SDXL)."""
    rows, ctx_dim = 2 * batch, CONTEXT_DIM[config.split("-")[0]]
    out = []
    for level in levels:
        n, inner = level.size[0] * level.size[1], level.heads * level.dim_head
        for _ in range(min(level.blocks, max_blocks)):
            x = torch.randn(rows, n, inner, device=device, dtype=dtype)
            ctx = torch.randn(rows, CONTEXT, ctx_dim, device=device, dtype=dtype)
            w = [torch.randn(inner, d, device=device, dtype=dtype) * 0.02 for d in (inner,) * 3 + (ctx_dim,)]
            out.append((x, ctx, w))
    return out


def projection_step(projections):
    for x, ctx, (wq1, wk1, wq2, wk2) in projections:
        F.linear(x, wq1), F.linear(x, wk1), F.linear(x, wq2), F.linear(ctx, wk2)


def attention_step(blocks):
    """SDPA self- and cross-attention of the observed blocks, as the UNet runs them."""
    for level, q, k, qc, kc, vc in blocks:
        h = level.heads

        def split(t, h=h):
            return t.unflatten(-1, (h, -1)).transpose(1, 2)
        F.scaled_dot_product_attention(split(q), split(k), split(k))
        F.scaled_dot_product_attention(split(qc), split(kc), split(vc))


def scfg_step(blocks, latent, batch, params, device, dtype):
    """One step of S-CFG: capture every observed block, then the rate map of each image."""
    grid = max((lv.size for lv, *_ in blocks), key=lambda s: s[0] * s[1])
    capture = StepCapture(params, grid, layers=len(blocks))
    rows = tuple(range(2 * batch))  # A1111's layout: cond rows, then uncond rows
    for i, (level, q, k, qc, kc, _) in enumerate(blocks):
        capture.self_attention(i, rows, q, k, level.heads, None)
        capture.cross_attention(i, rows, qc, kc, level.heads, None, level.size)
    c = torch.randn(batch, 4, *latent, device=device, dtype=dtype)
    u = torch.randn(batch, 4, *latent, device=device, dtype=dtype)
    return capture.result([Pair(i, batch + i, 7.0) for i in range(batch)], c, u)


# Operators that make the host wait for the device: reading a value back (.item(), float(), bool(),
# .tolist()) and tensors made from host data (torch.tensor(list)), a blocking host-to-device copy.
SYNC_OPS = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.equal", "aten.item")
HOST_DATA_OPS = ("aten.lift_fresh", "aten.lift_fresh_copy")


class OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every aten operator call (after decomposition into the dispatcher's ops)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


FUSED_KERNEL = "aten._scaled_dot_product_efficient_attention"


def _as_one_kernel(sdpa):
    """SDPA counted as the one kernel CUDA's efficient attention runs it as: on the CPU a value
    width other than the head width makes SDPA decompose into its math, which a GPU does not run
    (the fused path is taken only where ``attention.fused_attention_ok`` says the kernel exists)."""
    from torch.utils._python_dispatch import _disable_current_modes, _get_current_dispatch_mode

    def run(*args, **kwargs):
        mode = _get_current_dispatch_mode()
        if isinstance(mode, OpCounter):
            mode.ops.append(FUSED_KERNEL)
        with _disable_current_modes():
            return sdpa(*args, **kwargs)
    return run


PATHS = ("materialised", "fused")


def count_ops(config: str, batch: int = 1, device="meta", dtype=torch.float32,
              path: str = "fused") -> dict:
    """aten ops per observed block and per step, and host syncs per step, of one S-CFG step as an
    adapter drives it (capture of every block, the rate map, the run report), on a GPU's code path:
    ``fused`` (SDPA's efficient-attention kernel for every map, counted as one op per call) or
    ``materialised`` (a GPU without that kernel for the shapes: one query chunk of all heads at a
    time, not the CPU's per-head blocks, with a large card's budget for S). On the meta device by
    default: the same operators without the arithmetic."""
    latent, levels = CONFIGS[config]
    blocks = make_inputs(levels, batch, torch.device(device), dtype, 10**6)
    params = make_params(enabled=True)
    saved = (attention._one_head_at_a_time, attention.fused_device, attention.fused_attention_ok,
             F.scaled_dot_product_attention)
    attention._one_head_at_a_time = lambda device: False
    if path == "fused":
        attention.fused_device = lambda device: True
        attention.fused_attention_ok = lambda q4, k4, v4: True
        F.scaled_dot_product_attention = _as_one_kernel(saved[-1])
    try:
        grid = max((lv.size for lv in levels), key=lambda s: s[0] * s[1])
        rows = tuple(range(2 * batch))
        c = torch.randn(batch, 4, *latent, device=device, dtype=dtype)
        u = torch.randn(batch, 4, *latent, device=device, dtype=dtype)
        geometry = Geometry()  # an adapter's, built in the pass's first step and kept
        for _ in range(2):  # the second step is the one counted
            with OpCounter() as per_blocks:
                capture = StepCapture(params, grid, layers=len(blocks), geometry=geometry,
                                      budget_bytes=attention.GPU_BUDGET_MAX)
                for i, (level, q, k, qc, kc, _) in enumerate(blocks):
                    capture.self_attention(i, rows, q, k, level.heads, None)
                    capture.cross_attention(i, rows, qc, kc, level.heads, None, level.size)
            with OpCounter() as per_result:
                result = capture.result([Pair(i, batch + i, 7.0) for i in range(batch)], c, u)
                RunReport().step_applied(result.rate)
    finally:
        (attention._one_head_at_a_time, attention.fused_device, attention.fused_attention_ok,
         F.scaled_dot_product_attention) = saved
    ops = per_blocks.ops + per_result.ops
    return {"config": config, "batch": batch, "path": path, "blocks": len(blocks),
            "ops_per_block": len(per_blocks.ops) / len(blocks), "ops_result": len(per_result.ops),
            "ops_per_step": len(ops), "syncs_per_step": sum(op in SYNC_OPS for op in ops),
            "host_data_per_step": sum(op in HOST_DATA_OPS for op in ops)}


def profile(config, batch, device, dtype, max_blocks, top=15):
    """torch.profiler's operator table of one S-CFG step (core + q/k recompute)."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    latent, levels = CONFIGS[config]
    blocks = make_inputs(levels, batch, device, dtype, max_blocks)
    projections = make_projections(config, levels, batch, device, dtype, max_blocks)
    params = make_params(enabled=True)
    scfg_step(blocks, latent, batch, params, device, dtype)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        projection_step(projections)
        scfg_step(blocks, latent, batch, params, device, dtype)
        _sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return (f"{config} batch {batch}, {len(blocks)} of {sum(lv.blocks for lv in levels)} blocks\n"
            + prof.key_averages().table(sort_by=key, row_limit=top))


def measure(config, batch, device, dtype, repeats, max_blocks):
    latent, levels = CONFIGS[config]
    blocks = make_inputs(levels, batch, device, dtype, max_blocks)
    projections = make_projections(config, levels, batch, device, dtype, max_blocks)
    total_blocks = sum(lv.blocks for lv in levels)
    scale = total_blocks / len(blocks)
    params = make_params(enabled=True)
    attention_step(blocks)
    scfg_step(blocks, latent, batch, params, device, dtype)  # warm-up
    _sync(device)
    base_mem = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    projection_step(projections)
    times = {"attention": [], "scfg": [], "qk": []}
    for _ in range(repeats):  # alternate, so all see the same machine state
        for name, fn in (("attention", lambda: attention_step(blocks)),
                         ("scfg", lambda: scfg_step(blocks, latent, batch, params, device, dtype)),
                         ("qk", lambda: projection_step(projections))):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated()
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            if device.type == "cuda" and name == "scfg":
                base_mem = max(base_mem or 0, torch.cuda.max_memory_allocated() - resident)
    if device.type == "cuda":
        extra = base_mem
    else:
        extra = max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) * 1024
    att, scfg = statistics.median(times["attention"]), statistics.median(times["scfg"])
    qk = statistics.median(times["qk"])
    return {"config": config, "batch": batch, "device": str(device), "dtype": str(dtype).split(".")[-1],
            "blocks_measured": len(blocks), "blocks_total": total_blocks,
            "attention_ms": att * scale * 1e3, "scfg_ms": scfg * scale * 1e3, "ratio": scfg / att,
            "qk_ms": qk * scale * 1e3,
            "extra_mib": extra / 2**20, "extra_mib_per_image": extra / 2**20 / batch}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float16 on CUDA, float32 on CPU by default")
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS))
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--max-blocks", type=int, default=None,
                    help="time at most this many blocks per level and scale the times up (CPU: 6)")
    ap.add_argument("--profile", action="store_true",
                    help="print torch.profiler's top operators of one step of the first config/batch")
    ap.add_argument("--count-ops", action="store_true",
                    help="print aten ops per observed block / per step and host syncs per step")
    ap.add_argument("--fused", action="store_true",
                    help="time the fused SDPA path even where the device has no fused kernel for it "
                         "(on the CPU SDPA then runs its math: to compare the paths there)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: one config/batch in this process
    args = ap.parse_args(argv)
    if args.count_ops:
        print("| config | batch | GPU path | observed blocks | aten ops per block | ops in the rate map |"
              " ops per step | host syncs per step | tensors from host data per step |")
        print("|---|---|---|---|---|---|---|---|---|")
        for config in args.configs:
            for batch in args.batches:
                for path in PATHS:
                    r = count_ops(config, batch, path=path)
                    print(f"| {config} | {batch} | {path} | {r['blocks']} | {r['ops_per_block']:.1f} | "
                          f"{r['ops_result']} | {r['ops_per_step']} | {r['syncs_per_step']} | "
                          f"{r['host_data_per_step']} |")
        return
    device = torch.device(args.device)
    default_dtype = torch.float16 if device.type == "cuda" else torch.float32
    dtype = getattr(torch, args.dtype) if args.dtype else default_dtype
    max_blocks = args.max_blocks or (6 if device.type == "cpu" else 10**6)
    if args.fused:
        attention.fused_device = lambda device: True
        attention.fused_attention_ok = lambda q4, k4, v4: True
    if args.profile:
        print(profile(args.configs[0], args.batches[0], device, dtype, max_blocks))
        return
    if args.one:
        config, batch = args.one.split(":")
        print(json.dumps(measure(config, int(batch), device, dtype, args.repeats, max_blocks)))
        return
    print(f"S-CFG core benchmark{' (fused path forced)' if args.fused else ''}, {device} "
          f"{str(dtype).split('.')[-1]}, torch {torch.__version__}, "
          f"median of {args.repeats} alternating runs")
    print("| config | batch | blocks timed | attention ms/step | S-CFG ms/step | S-CFG/attention |"
          " q/k recompute ms/step | extra peak MiB | per image |")
    print("|---|---|---|---|---|---|---|---|---|")
    for config in args.configs:
        for batch in args.batches:
            cmd = [sys.executable, "-m", "scfg_ext.bench", "--one", f"{config}:{batch}",
                   "--device", args.device, "--repeats", str(args.repeats), "--max-blocks", str(max_blocks)]
            if args.dtype:
                cmd += ["--dtype", args.dtype]
            if args.fused:
                cmd += ["--fused"]
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
            print(f"| {config} | {batch} | {r['blocks_measured']}/{r['blocks_total']} | "
                  f"{r['attention_ms']:.1f} | {r['scfg_ms']:.1f} | {r['ratio']:.2f}x | {r['qk_ms']:.1f} | "
                  f"{r['extra_mib']:.1f} | {r['extra_mib_per_image']:.1f} |")
    print("Times of partly timed configs are scaled to all blocks; memory is what the timed blocks held.")


if __name__ == "__main__":
    main()
