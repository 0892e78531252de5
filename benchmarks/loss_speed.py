"""Forward+backward speed and peak memory of the fused ``pcl_ext.proto_nce`` against the eager
reference ``pcl_ext.reference.proto_nce``, same run, same inputs. The shapes (``SHAPES``
below; N batch, D embedding, Q queue, K clusters per granularity, r sampled negatives):

    pcl-imagenet  N=256  D=128  Q=16384  K=25000, 50000, 100000  r=16384 (PCL's ImageNet run)
    pcl-all       N=256  D=128  Q=16384  K=25000, 50000, 100000  all prototypes
    large-batch   N=1024 D=128  Q=65536  K=25000, 50000, 100000  all prototypes
    small         N=256  D=128  Q=4096   K=100, 200, 500         all prototypes

Peak memory comes from one extra untimed step: CUDA allocator statistics, or on the CPU the
profiler's allocation events, replayed single-threaded (the profiler misses OpenMP workers).

    python benchmarks/loss_speed.py                                  # all shapes
    python benchmarks/loss_speed.py --shape small --device cpu --threads 1 --quick
"""
from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, cpu_peak_bytes, environment,
                    format_header, format_row, init_device, shuffle_free_clusters, summary,
                    time_round_robin, write_results)

LossFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Shape:
    n: int                    # batch
    d: int                    # embedding dim
    q: int                    # queue length
    ks: tuple[int, ...]       # clusters per granularity
    r: Optional[int]          # sampled negatives per granularity; None = all prototypes

    def logits(self) -> int:
        cols = [k if self.r is None else self.n + self.r for k in self.ks]
        return self.n * (1 + self.q + sum(cols))


SHAPES = {
    "pcl-imagenet": Shape(256, 128, 16384, (25000, 50000, 100000), 16384),
    "pcl-all": Shape(256, 128, 16384, (25000, 50000, 100000), None),
    "large-batch": Shape(1024, 128, 65536, (25000, 50000, 100000), None),
    "small": Shape(256, 128, 4096, (100, 200, 500), None),
}
# A CPU step past this many logits takes seconds in the reference: fewer default repeats
# keep a full CPU run of all shapes within a few minutes.
BIG_CPU_STEP = 10**8


def make_inputs(shape: Shape, device: torch.device, dtype: torch.dtype, seed: int) -> dict:
    # Drawn on the CPU from one seed, so every device and dtype sees the same numbers.
    gen = torch.Generator().manual_seed(seed)

    def unit(rows: int) -> Tensor:
        return F.normalize(torch.randn(rows, shape.d, generator=gen), dim=1).to(device, dtype)

    assign = [torch.randint(k, (shape.n,), generator=gen) for k in shape.ks]
    negs = None if shape.r is None else [
        shuffle_free_clusters(a, k, shape.r, gen).to(device) for a, k in zip(assign, shape.ks)]
    return dict(q=unit(shape.n).requires_grad_(), k=unit(shape.n), queue=unit(shape.q),
                prototypes=[unit(k) for k in shape.ks],
                phi=[(0.05 + 0.45 * torch.rand(k, generator=gen)).to(device) for k in shape.ks],
                assignments=[a.to(device) for a in assign], negatives=negs)


def step(loss_fn: LossFn, inputs: dict) -> Tensor:
    """One forward+backward; callers set q.grad to None first, as zero_grad() does."""
    loss = loss_fn(**inputs)
    loss.backward()
    return loss


def peak_memory(loss_fn: LossFn, inputs: dict, device: torch.device) -> int:
    """Bytes allocated on top of the inputs during one forward+backward (untimed run)."""
    inputs["q"].grad = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step(loss_fn, inputs)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cpu_peak_bytes(lambda: step(loss_fn, inputs))
    finally:
        torch.set_num_threads(threads)


def measure(loss_fn: LossFn, inputs: dict, device: torch.device, warmup: int,
            repeats: int) -> dict:
    def zero_grad() -> None:
        inputs["q"].grad = None  # the old gradient is freed outside the timer

    zero_grad()
    loss = step(loss_fn, inputs).item()
    grad = inputs["q"].grad.float().clone()
    times = time_round_robin({"step": lambda: step(loss_fn, inputs)}, device, warmup, repeats,
                             before=zero_grad)["step"]
    return dict(loss=loss, grad=grad, **summary(times, "ms"),
                peak_bytes=peak_memory(loss_fn, inputs, device))


def run_shape(name: str, shape: Shape, args: argparse.Namespace, device: torch.device,
              dtype: torch.dtype) -> dict:
    if args.quick:
        warmup, repeats = 1, 3
    elif device.type == "cuda":
        warmup, repeats = 10, 50
    else:
        warmup, repeats = (1, 5) if shape.logits() > BIG_CPU_STEP else (2, 10)
    warmup = warmup if args.warmup is None else args.warmup
    repeats = repeats if args.repeats is None else args.repeats
    inputs = make_inputs(shape, device, dtype, args.seed)
    fns = {"fused": pcl_ext.proto_nce}
    if not args.no_reference:
        fns["reference"] = pcl_ext.reference.proto_nce
    out = dict(shape=name, **asdict(shape), warmup=warmup, repeats=repeats)
    for side, fn in fns.items():
        out[side] = measure(fn, inputs, device, warmup, repeats)
    if not args.no_reference:
        fused, ref = out["fused"], out["reference"]
        out["speedup"] = ref["median_ms"] / fused["median_ms"]
        out["memory_ratio"] = ref["peak_bytes"] / max(fused["peak_bytes"], 1)
        out["loss_abs_diff"] = abs(fused["loss"] - ref["loss"])
        out["grad_max_abs_diff"] = (fused["grad"] - ref["grad"]).abs().max().item()
    for side in fns:
        del out[side]["grad"]
    return out


COLUMNS = (("shape", 12), ("device", 6), ("dtype", 8), ("thr", 3), ("fused ms [min-max]", 22),
           ("ref ms [min-max]", 22), ("speedup", 7), ("fused MB", 8), ("ref MB", 8),
           ("mem x", 6), ("|dloss|", 8), ("max|ddq|", 8))


def fmt_ms(x: float) -> str:
    return f"{x:.{max(0, 3 - math.floor(math.log10(x)))}f}"  # 4 significant digits, no exponent


def table_row(r: dict, device: str, dtype: str, threads: int) -> str:
    def ms(side: str) -> str:
        if side not in r:
            return "-"
        s = r[side]
        return f"{fmt_ms(s['median_ms'])} [{fmt_ms(s['min_ms'])}-{fmt_ms(s['max_ms'])}]"

    def num(key: str, fmt: str) -> str:
        return format(r[key], fmt) if key in r else "-"

    ref_mb = f"{r['reference']['peak_bytes'] / 2**20:.1f}" if "reference" in r else "-"
    cells = (r["shape"], device, dtype, threads, ms("fused"), ms("reference"),
             num("speedup", ".2f"), f"{r['fused']['peak_bytes'] / 2**20:.1f}", ref_mb,
             num("memory_ratio", ".1f"), num("loss_abs_diff", ".1e"),
             num("grad_max_abs_diff", ".1e"))
    return format_row(cells, COLUMNS)


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--shape", action="append", help=f"repeatable or comma list of "
                   f"{', '.join(SHAPES)} (default: all)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                   help="both sides; on CPU the fused op computes half dtypes in float32")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on both sides")
    p.add_argument("--repeats", type=int, help=f"timed steps (default: 50 on CUDA; 10 on CPU, "
                   f"5 for CPU steps over {BIG_CPU_STEP:.0e} logits, i.e. large-batch)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default: 10 on CUDA; 2 "
                   "on CPU, 1 for the big CPU steps)")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 3 repeats: a smoke run")
    p.add_argument("--no-reference", action="store_true", help="time the fused op only")
    add_seed_and_json(p, "loss_speed-<device>-<dtype>[-tf32]-<threads>t[-<shapes>][-quick].json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    names = [s for arg in args.shape or [",".join(SHAPES)] for s in arg.split(",") if s]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown --shape {unknown}; choose from {list(SHAPES)}")
    device, threads = init_device(args)
    dtype = getattr(torch, args.dtype)
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.set_float32_matmul_precision("high" if args.tf32 else "highest")
    # The CPU memory probe walks private profiler structures: it must see a known 4 MiB exactly.
    if device.type == "cpu" and cpu_peak_bytes(lambda: torch.empty(1 << 20)) != 4 << 20:
        raise SystemExit("the profiler's memory events are not what this script expects")

    env = environment(device, dtype=args.dtype, tf32=args.tf32,
                      matmul_precision=torch.get_float32_matmul_precision(), seed=args.seed,
                      cpu_memory_measured_with_threads=1 if device.type == "cpu" else None)
    print(f"# {env['device_name']}, torch {env['torch']}, {threads} threads, {args.dtype}"
          f"{', tf32' if args.tf32 else ''}")
    print(format_header(COLUMNS))
    results = []
    for name in names:
        results.append(run_shape(name, SHAPES[name], args, device, dtype))
        print(table_row(results[-1], device.type, args.dtype, threads), flush=True)

    default = (f"loss_speed-{device.type}-{args.dtype}{'-tf32' if args.tf32 else ''}-{threads}t"
               f"{'' if names == list(SHAPES) else '-' + '+'.join(names)}"
               f"{'-quick' if args.quick else ''}.json")
    write_results(dict(environment=env, results=results), args.json, default)


if __name__ == "__main__":
    main()
