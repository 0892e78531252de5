"""Speed of ``pcl_ext.momentum_update_`` (MoCo/PCL key-encoder EMA) on ResNet-50's parameters,
against MoCo's per-parameter loop and ``torch._foreach_lerp_``, same run, same tensors.

    moco    MoCo's loop (facebookresearch/moco; pcl_ext.reference.moco_momentum_update_):
            for k, q: k.data = k.data * m + q.data * (1. - m)
    lerp    torch._foreach_lerp_(keys, queries, 1 - m)              (k + (1-m) (q - k))
    pcl_ext pcl_ext.momentum_update_(keys, queries, m)

The three run round-robin within each repeat, so machine noise hits them alike. GB/s counts
the memory floor: read key and query, write key (12 bytes per float32 parameter).

    python benchmarks/momentum_speed.py --device cpu --threads 1
    python benchmarks/momentum_speed.py --device cuda --quick
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Callable

import torch
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, environment, format_header, format_row,
                    init_device, summary, time_round_robin, write_results)
from pcl_ext.reference import moco_momentum_update_

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


@torch.no_grad()
def foreach_lerp(keys: list[Tensor], queries: list[Tensor], m: float) -> None:
    torch._foreach_lerp_(keys, queries, 1. - m)


METHODS: dict[str, Callable[[list[Tensor], list[Tensor], float], None]] = {
    "moco": moco_momentum_update_, "lerp": foreach_lerp, "pcl_ext": pcl_ext.momentum_update_}


def make_params(device: torch.device, dtype: torch.dtype, seed: int):
    """One query encoder, and one key encoder per method (each method updates its own)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = resnet50_shapes()
    query = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    key0 = [torch.randn(s, generator=gen).to(device, dtype) for s in shapes]
    keys = {name: [torch.nn.Parameter(k.clone(), requires_grad=False) for k in key0]
            for name in METHODS}
    return query, keys


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

    steps = {name: partial(fn, keys[name], query, MOMENTUM) for name, fn in METHODS.items()}
    times = time_round_robin(steps, device, args.warmup, args.repeats)
    stats = {name: summary(ts, "ms") for name, ts in times.items()}
    for name, s in stats.items():
        s.update(gbps=bytes_moved / s["median_ms"] / 1e6, max_abs_diff_vs_moco=max_diff[name])
    ours = stats["pcl_ext"]["median_ms"]
    return dict(tensors=len(query), params=numel, bytes_per_step=bytes_moved,
                momentum=MOMENTUM, warmup=args.warmup, repeats=args.repeats, methods=stats,
                speedup_vs_moco=stats["moco"]["median_ms"] / ours,
                speedup_vs_lerp=stats["lerp"]["median_ms"] / ours)


COLUMNS = (("method", 8), ("median ms", 9), ("[min - max]", 17), ("IQR ms", 15), ("GB/s", 6),
           ("x vs it", 7), ("max|diff| vs moco", 17))


def print_table(r: dict, env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads, "
          f"{env['dtype']}; ResNet-50: {r['tensors']} tensors, {r['params'] / 1e6:.2f}M params, "
          f"{r['bytes_per_step'] / 1e6:.0f} MB moved per step, m = {r['momentum']}")
    print(format_header(COLUMNS))
    ours = r["methods"]["pcl_ext"]["median_ms"]
    for name, s in r["methods"].items():
        print(format_row((name, f"{s['median_ms']:.3f}",
                          f"[{s['min_ms']:7.3f} - {s['max_ms']:7.3f}]",
                          f"{s['iqr_ms'][0]:7.3f}-{s['iqr_ms'][1]:7.3f}", f"{s['gbps']:.1f}",
                          f"{s['median_ms'] / ours:.2f}", f"{s['max_abs_diff_vs_moco']:.1e}"),
                         COLUMNS))
    print(f"# pcl_ext speed-up: {r['speedup_vs_moco']:.2f}x vs MoCo's loop, "
          f"{r['speedup_vs_lerp']:.2f}x vs _foreach_lerp_")


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16", "float64"),
                   default="float32")
    p.add_argument("--repeats", type=int, help="timed steps per method (default: 30 on CPU, "
                   "200 on CUDA)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 repeats: a smoke run")
    add_seed_and_json(p, "momentum_speed-<device>-<threads>t[-<dtype>][-quick].json")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 5
    elif args.repeats is None:
        args.repeats = 200 if args.device == "cuda" else 30
    return args


def main() -> None:
    args = parse_args()
    device, threads = init_device(args)
    env = environment(device, dtype=args.dtype, seed=args.seed)
    result = run(args, device, getattr(torch, args.dtype))
    print_table(result, env)
    default = (f"momentum_speed-{device.type}-{threads}t"
               f"{'' if args.dtype == 'float32' else '-' + args.dtype}"
               f"{'-quick' if args.quick else ''}.json")
    write_results(dict(environment=env, result=result), args.json, default)


if __name__ == "__main__":
    main()
