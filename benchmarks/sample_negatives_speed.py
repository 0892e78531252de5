"""Speed of ``pcl_ext.sample_negatives`` (the r negative clusters of sampled ProtoNCE) against
PCL's host-side set difference and a vectorized torch version, same run, same batch.

    pcl       PCL's pcl/builder.py: random.sample over set(range(K)) - set(pos.tolist()), then
              torch.LongTensor(...).to(device). random.sample(set) raises on Python >= 3.11,
              so the set is sorted first: the faithful variant that runs
              (pcl_ext.reference.pcl_sample_negatives).
    torch     mask the batch's clusters, nonzero, randperm, take r (a host sync on CUDA)
    pcl_ext   pcl_ext.sample_negatives(pos, K, r, generator) on --device

PCL's shapes: N = 256 rows, r = 16384 negatives, K = 25k, 50k, 100k. The three run
round-robin within each repeat, so machine noise hits them alike.

    python benchmarks/sample_negatives_speed.py --threads 1
    python benchmarks/sample_negatives_speed.py --quick
"""
from __future__ import annotations

import argparse
import random
from typing import Callable

import torch
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, environment, format_header, format_row,
                    init_device, shuffle_free_clusters, summary, time_round_robin, write_results)
from pcl_ext.reference import pcl_sample_negatives

N, R = 256, 16384
KS = (25_000, 50_000, 100_000)


def run_k(k: int, args: argparse.Namespace, device: torch.device) -> dict:
    gen = torch.Generator(device).manual_seed(args.seed)
    rng = random.Random(args.seed)
    pos = torch.randint(0, k, (N,), generator=gen, device=device)
    methods: dict[str, Callable[[], Tensor]] = {
        "pcl": lambda: pcl_sample_negatives(pos, k, R, rng),
        "torch": lambda: shuffle_free_clusters(pos, k, R, gen),
        "pcl_ext": lambda: pcl_ext.sample_negatives(pos, k, R, generator=gen),
    }
    taken = set(pos.tolist())
    for name, fn in methods.items():  # every method must give r distinct free ids
        ids = fn().tolist()
        assert len(ids) == R and len(set(ids)) == R and not set(ids) & taken, name
    times = time_round_robin(methods, device, args.warmup, args.repeats)
    result = dict(k=k, n=N, r=R, methods={name: summary(ts, "ms") for name, ts in times.items()})
    ours = result["methods"]["pcl_ext"]["median_ms"]
    result["speedup_vs_pcl"] = result["methods"]["pcl"]["median_ms"] / ours
    result["speedup_vs_torch"] = result["methods"]["torch"]["median_ms"] / ours
    return result


COLUMNS = (("K", 7), ("PCL", 22), ("torch", 22), ("pcl_ext", 22), ("x PCL", 6), ("x torch", 7))


def print_table(results: list[dict], env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads; "
          f"N = {N}, r = {R}; median of {env['repeats']} [min - max], ms")
    print(format_header(COLUMNS))

    def cell(s: dict) -> str:
        return f"{s['median_ms']:7.3f} [{s['min_ms']:6.3f} - {s['max_ms']:6.3f}]"

    for r in results:
        m = r["methods"]
        print(format_row((r["k"], cell(m["pcl"]), cell(m["torch"]), cell(m["pcl_ext"]),
                          f"{r['speedup_vs_pcl']:.1f}", f"{r['speedup_vs_torch']:.2f}"), COLUMNS))


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 repeats: a smoke run")
    add_seed_and_json(p, "sample_negatives_speed-<device>-<threads>t[-quick].json")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 5
    return args


def main() -> None:
    args = parse_args()
    device, threads = init_device(args)
    env = environment(device, seed=args.seed, repeats=args.repeats, warmup=args.warmup)
    results = [run_k(k, args, device) for k in KS]
    print_table(results, env)
    name = f"sample_negatives_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json"
    write_results(dict(environment=env, results=results), args.json, name)


if __name__ == "__main__":
    main()
