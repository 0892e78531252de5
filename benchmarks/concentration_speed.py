"""Speed of ``pcl_ext.concentration`` (PCL's phi, the E-step after k-means) against PCL's
Python loop and a vectorized NumPy version, same run, same data.

    pcl_loop  run_kmeans of salesforce/PCL (main_pcl.py) from faiss's D, I on, loop for loop
    bincount  the same maths vectorized with np.bincount (float64), for honesty
    pcl_ext   pcl_ext.concentration(D, I, K) on --device (inputs already there)

Shapes: n = 100k and 1.28M points (ImageNet), K = 10k and 100k clusters; faiss-shaped inputs
([n, 1] float32 distances, [n, 1] int64 ids), ids uniform over the clusters. PCL's loop takes
seconds at 1.28M points: it runs --loop-repeats times (default 2) with no warm-up (pure Python
has none to speak of); the other two run --warmup + --repeats times, round-robin.

    python benchmarks/concentration_speed.py --threads 1
    python benchmarks/concentration_speed.py --quick
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

import numpy as np
import torch

import pcl_ext

TEMPERATURE, ALPHA = 0.2, 10.0
SHAPES = [(100_000, 10_000), (100_000, 100_000), (1_280_000, 10_000), (1_280_000, 100_000)]


def pcl_loop(D: np.ndarray, I: np.ndarray, k: int) -> np.ndarray:
    """PCL's run_kmeans from `D, I = index.search(x, 1)` to the density, loop for loop."""
    im2cluster = [int(n[0]) for n in I]
    Dcluster = [[] for c in range(k)]
    for im, i in enumerate(im2cluster):
        Dcluster[i].append(D[im][0])
    density = np.zeros(k)
    for i, dist in enumerate(Dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + ALPHA)
    dmax = density.max()
    for i, dist in enumerate(Dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    return TEMPERATURE * density / density.mean()


def bincount(D: np.ndarray, I: np.ndarray, k: int) -> np.ndarray:
    """The same maths without Python loops."""
    ids = I[:, 0]
    count = np.bincount(ids, minlength=k)
    sums = np.bincount(ids, weights=np.sqrt(D[:, 0].astype(np.float64)), minlength=k)
    many = count > 1
    density = np.zeros(k)
    density[many] = sums[many] / count[many] / np.log(count[many] + ALPHA)
    density[~many] = density.max()
    density = density.clip(*np.percentile(density, [10, 90]))
    return TEMPERATURE * density / density.mean()


def make_inputs(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    I = rng.integers(0, k, size=(n, 1), dtype=np.int64)
    D = (rng.chisquare(128, size=(n, 1)) / 512).astype(np.float32)  # ~ squared distances
    return D, I


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(times: list[float]) -> dict:
    t = torch.tensor(times, dtype=torch.float64)
    q1, med, q3 = t.quantile(torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return dict(median_ms=med, min_ms=min(times), max_ms=max(times), iqr_ms=[q1, q3],
                times_ms=times)


def run_shape(n: int, k: int, args: argparse.Namespace, device: torch.device) -> dict:
    D, I = make_inputs(n, k, args.seed)
    D_t, I_t = torch.from_numpy(D).to(device), torch.from_numpy(I).to(device)
    methods: dict[str, Callable[[], object]] = {
        "bincount": lambda: bincount(D, I, k),
        "pcl_ext": lambda: pcl_ext.concentration(D_t, I_t, k, temperature=TEMPERATURE,
                                                 alpha=ALPHA),
    }

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        return (time.perf_counter() - start) * 1e3, out

    times: dict[str, list[float]] = {"pcl_loop": []}
    for _ in range(args.loop_repeats):
        t, want = timed(lambda: pcl_loop(D, I, k))
        times["pcl_loop"].append(t)
    names = list(methods)
    times.update({name: [] for name in names})
    max_rel = {"pcl_loop": 0.0}
    for i in range(args.warmup + args.repeats):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate who goes first
        for name in order:
            t, out = timed(methods[name])
            if i >= args.warmup:
                times[name].append(t)
            elif i == 0:  # the results must agree with PCL's before the timings mean anything
                got = out.cpu().double().numpy() if isinstance(out, torch.Tensor) else out
                max_rel[name] = float(np.max(np.abs(got - want) / want))
    result = dict(n=n, k=k, methods={name: dict(stats(ts), max_rel_diff_vs_pcl=max_rel[name])
                                     for name, ts in times.items()})
    ours = result["methods"]["pcl_ext"]["median_ms"]
    result["speedup_vs_pcl_loop"] = result["methods"]["pcl_loop"]["median_ms"] / ours
    result["speedup_vs_bincount"] = result["methods"]["bincount"]["median_ms"] / ours
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
          f"PCL loop x{env['loop_repeats']}, others median of {env['repeats']}")
    print(f"{'n':>9} {'K':>7}  {'PCL loop ms':>11}  {'bincount ms':>11}  {'pcl_ext ms':>10}  "
          f"{'[min - max]':>15}  {'x PCL':>6}  {'x bincount':>10}  {'rel diff':>8}")
    for r in results:
        m = r["methods"]
        p = m["pcl_ext"]
        print(f"{r['n']:>9} {r['k']:>7}  {m['pcl_loop']['median_ms']:11.1f}  "
              f"{m['bincount']['median_ms']:11.2f}  {p['median_ms']:10.2f}  "
              f"[{p['min_ms']:5.2f} - {p['max_ms']:5.2f}]  {r['speedup_vs_pcl_loop']:6.0f}  "
              f"{r['speedup_vs_bincount']:10.2f}  {p['max_rel_diff_vs_pcl']:8.1e}")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: as is)")
    p.add_argument("--repeats", type=int, default=20, help="timed runs of bincount and pcl_ext")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loop-repeats", type=int, default=2, help="timed runs of PCL's loop")
    p.add_argument("--quick", action="store_true",
                   help="n = 100k only, PCL loop once, 1 warm-up + 5 repeats: a smoke run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="output (default: benchmarks/results/"
                   "concentration_speed-<device>-<threads>t[-quick].json)")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats, args.loop_repeats = 1, 5, 1
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
               torch=torch.__version__, numpy=np.__version__, pcl_ext=pcl_ext.__version__,
               python=platform.python_version(), device=device.type,
               device_name=device_name(device), threads=threads, seed=args.seed,
               repeats=args.repeats, warmup=args.warmup, loop_repeats=args.loop_repeats)
    shapes = [s for s in SHAPES if s[0] <= 100_000] if args.quick else SHAPES
    results = [run_shape(n, k, args, device) for n, k in shapes]
    print_table(results, env)
    name = f"concentration_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json"
    path = args.json or Path(__file__).resolve().parent / "results" / name
    write_json(path, dict(environment=env, results=results))
    print(f"# wrote {path}")


if __name__ == "__main__":
    main()
