"""NT-Xent (SimCLR) forward+backward: the fused ``pcl_ext.info_nce`` against the eager definition
``pcl_ext.reference.info_nce``, same run, same inputs, and the GEMM floor measured alongside.

Batch N gives 2N embeddings z [2N, D] (both views), which are queries and keys at once: row i's
positive is the other view of its sample, its own column is masked (``exclude_self``). The
fused op multiplies four 2N x 2N x D products (S in the forward and again in the backward, dQ,
dK) where eager autograd multiplies three, so its floor is four plain ``torch.mm`` of those
shapes, timed here on the same inputs: fused/floor says how close the kernel gets to its GEMMs,
fused/eager what the fusion wins, and the memory columns what it saves (eager holds the 2N x 2N
logits and their softmax).

Peak memory comes from one extra untimed step: CUDA allocator statistics, or on the CPU the
profiler's allocation events, replayed single-threaded (the profiler misses OpenMP workers).

    python benchmarks/info_nce_speed.py --device cpu --threads 1       # batches 256 .. 8192
    python benchmarks/info_nce_speed.py --device cpu --threads 1 --quick
    python benchmarks/info_nce_speed.py --device cuda --dtype bfloat16
"""
from __future__ import annotations

import argparse
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, cpu_peak_bytes, environment,
                    format_header, format_row, init_device, summary, time_round_robin,
                    write_results)

BATCHES = (256, 1024, 4096, 8192)
QUICK_BATCHES = (64, 256)
DIM = 128
TEMPERATURE = 0.5  # SimCLR's
# Eager's peak is about five 2N x 2N float32 matrices (logits, masked copy, softmax, their
# gradients); it is skipped where that estimate passes --eager-max-gib.
EAGER_MATRICES = 5


def make_inputs(batch: int, device: torch.device, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)  # on the CPU: the same numbers on every device
    z = F.normalize(torch.randn(2 * batch, DIM, generator=gen), dim=1).to(device, dtype)
    targets = ((torch.arange(2 * batch) + batch) % (2 * batch)).to(device)
    return z.requires_grad_(), targets


def nt_xent(loss_fn: Callable[..., Tensor], z: Tensor, targets: Tensor) -> Tensor:
    loss = loss_fn(z, z, targets, temperature=TEMPERATURE, exclude_self=True)
    loss.backward()
    return loss


def four_gemms(z: Tensor) -> Callable[[], Tensor]:
    """The fused op's products as whole GEMMs: S = z z^T twice, S z and S^T z."""
    zd = z.detach()
    s = torch.empty(zd.shape[0], zd.shape[0], device=zd.device, dtype=zd.dtype)

    def run() -> Tensor:
        torch.mm(zd, zd.t(), out=s)
        torch.mm(zd, zd.t(), out=s)
        dq = s @ zd
        return s.t() @ zd + dq

    return run


def peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Bytes allocated on top of what exists during one untimed fn()."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cpu_peak_bytes(fn)
    finally:
        torch.set_num_threads(threads)


def run_batch(batch: int, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict:
    z, targets = make_inputs(batch, device, dtype, args.seed)
    rows = 2 * batch
    eager_gib = EAGER_MATRICES * rows * rows * 4 / 2**30
    out = dict(batch=batch, rows=rows, dim=DIM, eager_estimate_gib=eager_gib)
    if args.quick:
        warmup, repeats = 1, 2
    elif device.type == "cuda":
        warmup, repeats = 10, 30
    else:
        warmup, repeats = (1, 3) if batch >= 4096 else (2, 7)
    out.update(warmup=warmup, repeats=repeats)

    def zero_grad() -> None:
        z.grad = None

    fns = {"fused": lambda: nt_xent(pcl_ext.info_nce, z, targets),
           "floor": four_gemms(z)}
    if eager_gib <= args.eager_max_gib:
        fns["eager"] = lambda: nt_xent(pcl_ext.reference.info_nce, z, targets)
    else:
        out["eager_skipped"] = (f"estimated {eager_gib:.1f} GiB > --eager-max-gib "
                                f"{args.eager_max_gib:g}")
    times = time_round_robin(fns, device, warmup, repeats, before=zero_grad)
    for side in fns:
        out[side] = summary(times[side], "ms")
    for side in ("fused", "eager"):
        if side in fns:
            zero_grad()
            out[side]["peak_bytes"] = peak_bytes(fns[side], device)
    zero_grad()
    loss = nt_xent(pcl_ext.info_nce, z, targets)
    out["loss"] = loss.item()
    if "eager" in fns:
        grad = z.grad.float().clone()
        zero_grad()
        ref = nt_xent(pcl_ext.reference.info_nce, z, targets)
        out["loss_abs_diff"] = abs(out["loss"] - ref.item())
        out["grad_max_abs_diff"] = (grad - z.grad.float()).abs().max().item()
        out["fused_over_eager"] = out["fused"]["median_ms"] / out["eager"]["median_ms"]
        out["memory_ratio"] = out["eager"]["peak_bytes"] / max(out["fused"]["peak_bytes"], 1)
    out["fused_over_floor"] = out["fused"]["median_ms"] / out["floor"]["median_ms"]
    return out


COLUMNS = (("batch", 5), ("2N", 5), ("dtype", 8), ("thr", 3), ("fused ms", 9),
           ("eager ms", 9), ("floor ms", 9), ("f/eager", 7), ("f/floor", 7), ("fused MB", 8),
           ("eager MB", 8), ("mem x", 6), ("|dloss|", 8), ("max|dg|", 8))


def fmt_ms(x: float) -> str:
    return f"{x:.{max(0, 3 - math.floor(math.log10(x)))}f}"  # 4 significant digits


def table_row(r: dict, dtype: str, threads: int) -> str:
    def get(key: str, fmt: str, scale: float = 1.0) -> str:
        return format(r[key] * scale, fmt) if key in r else "-"

    eager = r.get("eager")
    cells = (r["batch"], r["rows"], dtype, threads, fmt_ms(r["fused"]["median_ms"]),
             fmt_ms(eager["median_ms"]) if eager else "skipped",
             fmt_ms(r["floor"]["median_ms"]), get("fused_over_eager", ".2f"),
             get("fused_over_floor", ".2f"), f"{r['fused']['peak_bytes'] / 2**20:.1f}",
             f"{eager['peak_bytes'] / 2**20:.1f}" if eager else "-", get("memory_ratio", ".0f"),
             get("loss_abs_diff", ".1e"), get("grad_max_abs_diff", ".1e"))
    return format_row(cells, COLUMNS)


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--batch", type=int, action="append",
                   help=f"repeatable (default: {', '.join(map(str, BATCHES))})")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="every side; on CPU the fused op computes half dtypes in float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on every side")
    p.add_argument("--eager-max-gib", type=float, default=8.0,
                   help="skip eager where its estimated peak exceeds this (default: 8)")
    p.add_argument("--quick", action="store_true",
                   help=f"batches {QUICK_BATCHES}, 1 warm-up + 2 repeats: a smoke run")
    add_seed_and_json(p, "info_nce_speed-<device>-<dtype>[-tf32]-<threads>t[-quick].json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    batches = args.batch or (QUICK_BATCHES if args.quick else BATCHES)
    device, threads = init_device(args)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    if device.type == "cpu" and cpu_peak_bytes(lambda: torch.empty(1 << 20)) != 4 << 20:
        raise SystemExit("the profiler's memory events are not what this script expects")
    env = environment(device, dtype=args.dtype, tf32=args.tf32, dim=DIM,
                      temperature=TEMPERATURE, seed=args.seed,
                      cpu_memory_measured_with_threads=1 if device.type == "cpu" else None)
    print(f"# NT-Xent forward+backward, D={DIM}: {env['device_name']}, torch {env['torch']}, "
          f"{threads} threads, {args.dtype}{', tf32' if args.tf32 else ''}; floor = four "
          "2N x 2N x D torch.mm")
    print(format_header(COLUMNS))
    results = []
    for batch in batches:
        results.append(run_batch(batch, args, device, dtype))
        print(table_row(results[-1], args.dtype, threads), flush=True)
        if "eager_skipped" in results[-1]:
            print(f"#   eager skipped at batch {batch}: {results[-1]['eager_skipped']}")
    default = (f"info_nce_speed-{device.type}-{args.dtype}{'-tf32' if args.tf32 else ''}-"
               f"{threads}t{'' if args.batch is None else '-' + '+'.join(map(str, batches))}"
               f"{'-quick' if args.quick else ''}.json")
    write_results(dict(environment=env, results=results), args.json, default)


if __name__ == "__main__":
    main()
