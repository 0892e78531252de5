"""Speed of PCL's E-step (``pcl_ext.cluster``): k-means seconds per granularity, and the
concentration phi (``pcl_ext.concentration``) against PCL's Python loop, same run, same data.

    python benchmarks/cluster_speed.py                      # 100k x 128, K = 1k and 10k
    python benchmarks/cluster_speed.py --quick --threads 1  # a smoke run (20k x 128)

On CUDA the faiss-cpu backend runs too, as the baseline of the GPU backend. The data: unit
vectors drawn around 2,000 random centres (embeddings have cluster structure; k-means speed
barely depends on it, but the objective of nredo=1 vs nredo=5 does).
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import pcl_ext
from common import (add_seed_and_json, argument_parser, environment, format_header, format_row,
                    init_device, repeat_timed, summary, write_results)
from pcl_ext.cluster import kmeans
from pcl_ext.reference import pcl_concentration


def make_features(n: int, d: int, seed: int, num_centres: int = 2000) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_centres, d, generator=gen), dim=1)
    ids = torch.randint(num_centres, (n,), generator=gen)
    return F.normalize(centres[ids] + 0.06 * torch.randn(n, d, generator=gen), dim=1)


def run_case(x: Tensor, k: int, nredo: int, backend: str, args: argparse.Namespace) -> dict:
    device = x.device
    km, km_times = repeat_timed(lambda: kmeans(x, k, niter=args.niter, nredo=nredo,
                                               seed=args.seed, backend=backend),
                                device, args.repeats)
    out = dict(k=k, nredo=nredo, backend=km.backend, kmeans=summary(km_times, "s"),
               objective=km.sq_dist.sum(dtype=torch.float64).item(),
               empty_clusters=int((torch.bincount(km.assignments, minlength=k) == 0).sum()))
    phi, phi_times = repeat_timed(lambda: pcl_ext.concentration(km.sq_dist, km.assignments, k,
                                                                temperature=0.2),
                                  device, args.phi_repeats)
    out["phi"] = summary(phi_times, "s")
    if not args.no_reference:  # faiss's [n, 1] D and I, as PCL has them
        sq, assign = km.sq_dist[:, None].cpu().numpy(), km.assignments[:, None].cpu().numpy()
        ref, ref_times = repeat_timed(lambda: pcl_concentration(sq, assign, k, 0.2),
                                      torch.device("cpu"), max(1, args.phi_repeats // 2))
        out["phi_pcl_loop"] = summary(ref_times, "s")
        out["phi_speedup"] = out["phi_pcl_loop"]["median_s"] / out["phi"]["median_s"]
        out["phi_max_abs_diff"] = float(np.abs(phi.double().cpu().numpy() - ref).max())
    return out


COLUMNS = (("K", 6), ("nredo", 5), ("backend", 10), ("k-means s [min-max]", 22),
           ("vs base", 7), ("phi ms", 8), ("PCL phi ms", 10), ("phi x", 7), ("|dphi|", 7),
           ("objective", 10), ("dobj %", 7), ("empty", 5))


def table_row(r: dict) -> str:
    km = r["kmeans"]
    cells = (r["k"], r["nredo"], r["backend"],
             f"{km['median_s']:.2f} [{km['min_s']:.2f}-{km['max_s']:.2f}]",
             f"{r['speedup_vs_baseline']:.2f}" if "speedup_vs_baseline" in r else "-",
             f"{r['phi']['median_s'] * 1e3:.2f}",
             f"{r['phi_pcl_loop']['median_s'] * 1e3:.1f}" if "phi_pcl_loop" in r else "-",
             f"{r['phi_speedup']:.0f}" if "phi_speedup" in r else "-",
             f"{r['phi_max_abs_diff']:.0e}" if "phi_max_abs_diff" in r else "-",
             f"{r['objective']:.1f}",
             f"{r['objective_vs_nredo1_pct']:+.2f}" if "objective_vs_nredo1_pct" in r else "-",
             r["empty_clusters"])
    return format_row(cells, COLUMNS)


def parse_args() -> argparse.Namespace:
    p = argument_parser(__doc__.split("\n\n")[0], threads_help="torch.set_num_threads, which "
                        "faiss follows (default: as is)")
    p.add_argument("--n", type=int, default=100_000, help="samples (default 100k; 20k quick)")
    p.add_argument("--d", type=int, default=128)
    p.add_argument("--ks", default="1000,10000", help="clusters per granularity "
                   "(default 1000,10000; 100,1000 quick)")
    p.add_argument("--niter", type=int, default=20)
    p.add_argument("--pcl-nredo", type=int, default=5, help="also run the first K once with "
                   "this nredo (PCL's 5; 0: skip)")
    p.add_argument("--repeats", type=int, help="timed k-means runs per case (default: 1 on "
                   "CPU, 3 on CUDA)")
    p.add_argument("--phi-repeats", type=int, default=5, help="timed concentration runs")
    p.add_argument("--quick", action="store_true", help="20k samples, K = 100, 1000: a smoke run")
    p.add_argument("--no-reference", action="store_true", help="skip PCL's phi loop")
    add_seed_and_json(p, "cluster_speed-<device>-<threads>t[-quick].json")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.quick:
        args.n, args.ks = 20_000, "100,1000"
    ks = [int(k) for k in args.ks.split(",") if k]
    device, threads = init_device(args)
    args.repeats = args.repeats or (3 if device.type == "cuda" else 1)
    x = make_features(args.n, args.d, args.seed).to(device)
    backends = ["auto", "faiss-cpu"] if device.type == "cuda" else ["faiss-cpu"]
    kmeans(x[:2000], 10, niter=2, backend=backends[0])  # warm-up: faiss, BLAS, CUDA context

    env = environment(device, n=args.n, d=args.d, niter=args.niter, seed=args.seed,
                      repeats=args.repeats, phi_repeats=args.phi_repeats)
    print(f"# {env['device_name']}, torch {env['torch']}, {threads} threads, "
          f"{args.n} x {args.d} features, niter {args.niter}")
    print(format_header(COLUMNS))
    cases = [(k, 1) for k in ks] + ([(ks[0], args.pcl_nredo)] if args.pcl_nredo > 1 else [])
    results = []
    for k, nredo in cases:
        case = [run_case(x, k, nredo, backend, args) for backend in backends]
        base = case[-1]["kmeans"]["median_s"]
        for r in case:
            if len(case) > 1:
                r["speedup_vs_baseline"] = base / r["kmeans"]["median_s"]
            single = next((s for s in results if s["k"] == k and s["nredo"] == 1
                           and s["backend"] == r["backend"]), None)
            if nredo > 1 and single:
                r["objective_vs_nredo1_pct"] = 100 * (r["objective"] / single["objective"] - 1)
            results.append(r)
            print(table_row(r), flush=True)

    default = (f"cluster_speed-{device.type}-{threads}t{'-quick' if args.quick else ''}.json")
    write_results(dict(environment=env, results=results), args.json, default)


if __name__ == "__main__":
    main()
