"""Speed of ``pcl_ext.concentration`` (PCL's phi, the E-step after k-means) against PCL's
Python loop and a vectorized NumPy version, same run, same data.

    pcl_loop  run_kmeans of salesforce/PCL (main_pcl.py) from faiss's D, I on, loop for loop
              (pcl_ext.reference.pcl_concentration)
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
from typing import Callable

import numpy as np
import torch

import pcl_ext
from common import (add_seed_and_json, argument_parser, environment, format_header, format_row,
                    init_device, repeat_timed, summary, time_round_robin, write_results)
from pcl_ext.reference import pcl_concentration

TEMPERATURE, ALPHA = 0.2, 10.0
SHAPES = [(100_000, 10_000), (100_000, 100_000), (1_280_000, 10_000), (1_280_000, 100_000)]


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


def run_shape(n: int, k: int, args: argparse.Namespace, device: torch.device) -> dict:
    D, I = make_inputs(n, k, args.seed)
    D_t, I_t = torch.from_numpy(D).to(device), torch.from_numpy(I).to(device)
    methods: dict[str, Callable[[], object]] = {
        "bincount": lambda: bincount(D, I, k),
        "pcl_ext": lambda: pcl_ext.concentration(D_t, I_t, k, temperature=TEMPERATURE,
                                                 alpha=ALPHA),
    }

    want, loop_times = repeat_timed(lambda: pcl_concentration(D, I, k, TEMPERATURE, ALPHA),
                                    device, args.loop_repeats)
    max_rel = {"pcl_loop": 0.0}
    for name, fn in methods.items():  # the results must agree with PCL's before we time them
        out = fn()
        got = out.cpu().double().numpy() if isinstance(out, torch.Tensor) else out
        max_rel[name] = float(np.max(np.abs(got - want) / want))
    times = dict(pcl_loop=loop_times, **time_round_robin(methods, device, args.warmup,
                                                         args.repeats))
    result = dict(n=n, k=k, methods={
        name: dict(summary(ts, "ms"), max_rel_diff_vs_pcl=max_rel[name])
        for name, ts in times.items()})
    ours = result["methods"]["pcl_ext"]["median_ms"]
    result["speedup_vs_pcl_loop"] = result["methods"]["pcl_loop"]["median_ms"] / ours
    result["speedup_vs_bincount"] = result["methods"]["bincount"]["median_ms"] / ours
    return result


COLUMNS = (("n", 9), ("K", 6), ("PCL loop ms", 11), ("bincount ms", 11), ("pcl_ext ms", 10),
           ("[min - max]", 15), ("x PCL", 6), ("x bincount", 10), ("rel diff", 8))


def print_table(results: list[dict], env: dict) -> None:
    print(f"# {env['device_name']}, torch {env['torch']}, {env['threads']} threads; "
          f"PCL loop x{env['loop_repeats']}, others median of {env['repeats']}")
    print(format_header(COLUMNS))
    for r in results:
        m = r["methods"]
        p = m["pcl_ext"]
        print(format_row((r["n"], r["k"], f"{m['pcl_loop']['median_ms']:.1f}",
                          f"{m['bincount']['median_ms']:.2f}", f"{p['median_ms']:.2f}",
                          f"[{p['min_ms']:5.2f} - {p['max_ms']:5.2f}]",
                          f"{r['speedup_vs_pcl_loop']:.0f}", f"{r['speedup_vs_bincount']:.2f}",
                          f"{p['max_rel_diff_vs_pcl']:.1e}"), COLUMNS))


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__)
    p.add_argument("--repeats", type=int, default=20, help="timed runs of bincount and pcl_ext")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--loop-repeats", type=int, default=2, help="timed runs of PCL's loop")
    p.add_argument("--quick", action="store_true",
                   help="n = 100k only, PCL loop once, 1 warm-up + 5 repeats: a smoke run")
    add_seed_and_json(p, "concentration_speed-<device>-<threads>t[-quick].json")
    args = p.parse_args()
    if args.quick:
        args.warmup, args.repeats, args.loop_repeats = 1, 5, 1
    return args


def main() -> None:
    args = parse_args()
    device, threads = init_device(args)
    env = environment(device, numpy=np.__version__, seed=args.seed, repeats=args.repeats,
                      warmup=args.warmup, loop_repeats=args.loop_repeats)
    shapes = [s for s in SHAPES if s[0] <= 100_000] if args.quick else SHAPES
    results = [run_shape(n, k, args, device) for n, k in shapes]
    print_table(results, env)
    name = f"concentration_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json"
    write_results(dict(environment=env, results=results), args.json, name)


if __name__ == "__main__":
    main()
