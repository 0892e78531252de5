"""Speed of ``pcl_ext.sample_negatives`` (the r negative clusters of sampled ProtoNCE) against
PCL's host-side set difference and a vectorized torch version, same run, same batch.

    pcl       PCL's pcl/builder.py: random.sample over set(range(K)) - set(pos.tolist()), then
              torch.LongTensor(...).to(device). random.sample(set) raises on Python >= 3.11,
              so the set is sorted first: the faithful variant that runs.
    torch     mask the batch's clusters, nonzero, randperm, take r (a host sync on CUDA)
    pcl_ext   pcl_ext.sample_negatives(pos, K, r, generator) on --device

PCL's shapes: N = 256 rows, r = 16384 negatives, K = 25k, 50k, 100k. The three run
round-robin within each repeat, so machine noise hits them alike.

    python benchmarks/sample_negatives_speed.py --threads 1
    python benchmarks/sample_negatives_speed.py --quick
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

import pcl_ext

N, R = 256, 16384
KS = (25_000, 50_000, 100_000)


def pcl_sampling(pos: Tensor, k: int, r: int) -> Tensor:
    all_proto_id = [i for i in range(k)]
    neg_proto_id = set(all_proto_id) - set(pos.tolist())
    neg_proto_id = random.sample(sorted(neg_proto_id), r)
    return torch.LongTensor(neg_proto_id).to(pos.device)


def torch_sampling(pos: Tensor, k: int, r: int, generator: torch.Generator) -> Tensor:
    free = torch.ones(k, dtype=torch.bool, device=pos.device)
    free[pos] = False
    free_ids = free.nonzero()[:, 0]
    pick = torch.randperm(free_ids.numel(), generator=generator, device=pos.device)[:r]
    return free_ids[pick]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q1, med, q3 = t.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return dict(median_ms=med, min_ms=min(times), max_ms=max(times), iqr_ms=[q1, q3],
                times_ms=times)


def run_k(k: int, args: argparse.Namespace, device: torch.device) -> dict:
    gen = torch.Generator(device).manual_seed(args.seed)
    random.seed(args.seed)
    pos = torch.randint(0, k, (N,), generator=gen, device=device)
    methods: dict[str, Callable[[], Tensor]] = {
        "pcl": lambda: pcl_sampling(pos, k, R),
        "torch": lambda: torch_sampling(pos, k, R, gen),
        "pcl_ext": lambda: pcl_ext.sample_negatives(pos, k, R, generator=gen),
    }
    taken = set(pos.tolist())
    for name, fn in methods.items():  # every method must give r distinct free ids
        ids = fn().tolist()
        assert len(ids) == R and len(set(ids)) == R and not set(ids) & taken, name
    times: dict[str, list[float]] = {name: [] for name in methods}
    names = list(methods)
    for i in range(args.warmup + args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            sync(device)
            start = time.perf_counter()
            methods[name]()
            sync(device)
            if i >= args.warmup:
                times[name].append((time.perf_counter() - start) * 1e3)
    result = dict(k=k, n=N, r=R, methods={name: stats(ts) for name, ts in times.items()})
    ours = result["methods"]["pcl_ext"]["median_ms"]
    result["speedup_vs_pcl"] = result["methods"]["pcl"]["median_ms"] / ours
    result["speedup_vs_torch"] = result["methods"]["torch"]["median_ms"] / ours
    return result


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


def print_table(results: list[dict], env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads; "
          f"N = {N}, r = {R}; median of {env['repeats']} [min - max], ms")
    print(f"{'K':>7}  {'PCL':>22}  {'torch':>22}  {'pcl_ext':>22}  {'x PCL':>6}  {'x torch':>7}")

    def cell(s: dict) -> str:
        return f"{s['median_ms']:7.3f} [{s['min_ms']:6.3f} - {s['max_ms']:6.3f}]"

    for r in results:
        m = r["methods"]
        print(f"{r['k']:>7}  {cell(m['pcl'])}  {cell(m['torch'])}  {cell(m['pcl_ext'])}  "
              f"{r['speedup_vs_pcl']:6.1f}  {r['speedup_vs_torch']:7.2f}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 warm-up + 5 repeats: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="output (default: benchmarks/results/"
                   "sample_negatives_speed-<device>-<threads>t[-quick].json)")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats = 1, 5
    return args


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, pcl_ext=pcl_ext.__version__,
               python=platform.python_version(), device=device.type,
               device_name=device_name(device), threads=threads, seed=args.seed,
               repeats=args.repeats, warmup=args.warmup)
    results = [run_k(k, args, device) for k in KS]
    print_table(results, env)
    name = f"sample_negatives_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json"
    path = args.json or Path(__file__).resolve().parent / "results" / name
    write_json(path, dict(environment=env, results=results))
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
