"""Speed of ``pcl_ext.momentum_update_`` (MoCo/PCL key-encoder EMA) on ResNet-50's parameters,
against MoCo's per-parameter loop and ``torch._foreach_lerp_``, same run, same tensors.

    moco    for k, q: k.data = k.data * m + q.data * (1. - m)      (facebookresearch/moco)
    lerp    torch._foreach_lerp_(keys, queries, 1 - m)              (k + (1-m) (q - k))
    pcl_ext pcl_ext.momentum_update_(keys, queries, m)

The three run round-robin within each repeat, so machine noise hits them alike. GB/s counts
the memory floor: read key and query, write key (12 bytes per float32 parameter).

    python benchmarks/momentum_speed.py --device cpu --threads 1
    python benchmarks/momentum_speed.py --device cuda --quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import pcl_ext

MOMENTUM = 0.999


def resnet50_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of torchvision's resnet50 in .parameters() order: 161 tensors, 25.6M."""
    shapes: list[tuple[int, ...]] = []

    def conv_bn(cin: int, cout: int, k: int) -> None:
        shapes.extend([(cout, cin, k, k), (cout,), (cout,)])  # conv (no bias), BN weight, bias

    conv_bn(3, 64, 7)
    cin = 64
    for width, blocks in ((64, 3), (128, 4), (256, 6), (512, 3)):
        for b in range(blocks):
            conv_bn(cin, width, 1)
            conv_bn(width, width, 3)
            conv_bn(width, 4 * width, 1)
            if b == 0:
                conv_bn(cin, 4 * width, 1)  # downsample branch
            cin = 4 * width
    shapes.extend([(1000, 2048), (1000,)])  # fc
    return shapes


def moco_loop(keys: list[Tensor], queries: list[Tensor], m: float) -> None:
    for param_k, param_q in zip(keys, queries):  # MoCo's _momentum_update_key_encoder
        param_k.data = param_k.data * m + param_q.data * (1. - m)


@torch.no_grad()
def foreach_lerp(keys: list[Tensor], queries: list[Tensor], m: float) -> None:
    torch._foreach_lerp_(keys, queries, 1. - m)


METHODS: dict[str, Callable[[list[Tensor], list[Tensor], float], None]] = {
    "moco": moco_loop, "lerp": foreach_lerp, "pcl_ext": pcl_ext.momentum_update_}


def make_params(device: torch.device, dtype: torch.dtype, seed: int):
    """One query encoder, and one key encoder per method (each method updates its own)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = resnet50_shapes()
    query = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    key0 = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    keys = {name: [torch.nn.Parameter(k.clone(), requires_grad=False) for k in key0]
            for name in METHODS}
    return query, keys


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    query, keys = make_params(device, dtype, args.seed)
    numel = sum(q.numel() for q in query)
    bytes_moved = 3 * numel * query[0].element_size()

    # One step each from the same start: the results must agree before we time anything.
    for name, fn in METHODS.items():
        fn(keys[name], query, MOMENTUM)
    ref = torch.cat([k.detach().double().flatten() for k in keys["moco"]])
    max_diff = {name: (torch.cat([k.detach().double().flatten() for k in keys[name]]) - ref)
                .abs().max().item() for name in METHODS}

    times: dict[str, list[float]] = {name: [] for name in METHODS}
    names = list(METHODS)
    for i in range(args.warmup + args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            sync(device)
            start = time.perf_counter()
            METHODS[name](keys[name], query, MOMENTUM)
            sync(device)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)

    stats = {}
    for name, ts in times.items():
        q1, med, q3 = torch.tensor(ts).quantile(torch.tensor([0.25, 0.5, 0.75])).tolist()
        stats[name] = dict(median_ms=med, min_ms=min(ts), max_ms=max(ts), iqr_ms=[q1, q3],
                           gbps=bytes_moved / med / 1e6, max_abs_diff_vs_moco=max_diff[name],
                           times_ms=ts)
    ours = stats["pcl_ext"]["median_ms"]
    return dict(tensors=len(query), params=numel, bytes_per_step=bytes_moved,
                momentum=MOMENTUM, warmup=args.warmup, repeats=args.repeats, methods=stats,
                speedup_vs_moco=stats["moco"]["median_ms"] / ours,
                speedup_vs_lerp=stats["lerp"]["median_ms"] / ours)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0]} ({len(models)} logical cores)" if models else platform.processor()


def write_json(path: Path, payload: dict) -> None:
    # Temp file + rename: a reader never sees a half-written result.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.chmod(tmp, 0o644)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def print_table(r: dict, env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads, "
          f"{env['dtype']}; ResNet-50: {r['tensors']} tensors, {r['params'] / 1e6:.2f}M params, "
          f"{r['bytes_per_step'] / 1e6:.0f} MB moved per step, m = {r['momentum']}")
    print(f"{'method':>8}  {'median ms':>9}  {'[min - max]':>17}  {'IQR ms':>15}  {'GB/s':>6}  "
          f"{'x vs it':>7}  {'max|diff| vs moco':>17}")
    ours = r["methods"]["pcl_ext"]["median_ms"]
    for name, s in r["methods"].items():
        print(f"{name:>8}  {s['median_ms']:9.3f}  [{s['min_ms']:7.3f} - {s['max_ms']:7.3f}]  "
              f"{s['iqr_ms'][0]:7.3f}-{s['iqr_ms'][1]:7.3f}  {s['gbps']:6.1f}  "
              f"{s['median_ms'] / ours:7.2f}  {s['max_abs_diff_vs_moco']:17.1e}")
    print(f"# pcl_ext speed-up: {r['speedup_vs_moco']:.2f}x vs MoCo's loop, "
          f"{r['speedup_vs_lerp']:.2f}x vs _foreach_lerp_")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   default="float32")
    p.add_argument("--repeats", type=int, help="timed steps per method (default: 30 on CPU, "
                   "200 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 repeats: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="output (default: benchmarks/results/"
                   "momentum_speed-<device>-<threads>t[-<dtype>][-quick].json)")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 5
    elif args.repeats is None:
        args.repeats = 200 if args.device == "cuda" else 30
    return args


def main() -> None:
    args = parse_args()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, pcl_ext=pcl_ext.__version__,
               python=platform.python_version(), device=device.type,
               device_name=device_name(device), threads=threads, dtype=args.dtype,
               seed=args.seed)
    result = run(args, device, dtype)
    print_table(result, env)
    default = (f"momentum_speed-{device.type}-{threads}t"
               f"{'' if args.dtype == 'float32' else '-' + args.dtype}"
               f"{'-quick' if args.quick else ''}.json")
    path = args.json or Path(__file__).resolve().parent / "results" / default
    write_json(path, dict(environment=env, result=result))
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
