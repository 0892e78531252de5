"""Warm against cold E-step on the same features: seconds, k-means objective and agreement.

    python benchmarks/estep_speed.py runs/grid/pcl-s0/checkpoint.pt

From a ``pcl_ext.train`` checkpoint of a PCL run: the momentum encoder's embeddings of its
training set (what the next E-step would cluster), clustered twice per granularity,

* cold: PCL's scheme, ``--nredo`` k-means runs of ``--niter`` iterations from random points;
* warm: ``--estep warm``, one run of ``--warm-niter`` iterations from the centroids of the
  checkpoint's last E-step (one epoch older: what a warm E-step starts from in training).

Each is timed (median of ``--repeats``); the table gives the k-means objective (sum of squared
distances, lower is better), the AMI of each clustering with the labels, and the AMI between
the two clusterings. Saved as JSON (``benchmarks/results/estep_speed-cpu-<T>t.json``).
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch
from sklearn.metrics import adjusted_mutual_info_score
from torch.utils.data import DataLoader, Subset

from common import (environment, format_header, format_row, init_device, argument_parser,
                    timed, write_results)
from pcl_ext.cluster import cluster
from pcl_ext.data import build_datasets
from pcl_ext.evaluate import extract_features, initial_encoder, load_checkpoint

COLUMNS = [("K", 6), ("start", 6), ("runs x iters", 13), ("seconds", 9), ("objective", 11),
           ("AMI labels", 11), ("AMI cold-warm", 14)]


def main() -> None:
    p = argument_parser(__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, help="output (default: benchmarks/results/"
                   "estep_speed-<device>-<T>t.json)")
    args = p.parse_args()
    device, threads = init_device(args)
    ckpt = load_checkpoint(args.checkpoint)
    a = ckpt["args"]
    if ckpt.get("cluster_result") is None:
        sys.exit(f"{args.checkpoint}: no clustering in this checkpoint (a MoCo run, or one "
                 "that stopped in its warm-up): nothing to warm-start from")
    _, train_eval, _, info = build_datasets(a["dataset"], a["data_root"],
                                            image_size=a["image_size"])
    if a.get("max_samples") is not None:
        train_eval = Subset(train_eval, range(min(a["max_samples"], len(train_eval))))
    model_k = initial_encoder(a, info)
    model_k.load_state_dict(ckpt["model_k"])
    model_k.to(device).eval()
    loader = DataLoader(train_eval, batch_size=512)
    with torch.no_grad():
        features, labels = extract_features(model_k, loader, device, False)  # as run_estep
    features = torch.nn.functional.normalize(features.float(), dim=1)
    previous = [c.to(device) for c in ckpt["cluster_result"]["centroids"]]
    ks = list(a["num_cluster"])
    runs = {}
    for start in ("cold", "warm"):
        kwargs = dict(niter=a["niter"], nredo=a["nredo"], temperature=a["temperature"],
                      seed=a["seed"], warm_niter=a.get("warm_niter", 5))
        if start == "warm":
            kwargs["init_centroids"] = previous
        seconds = []
        for _ in range(args.repeats):
            result, s = timed(lambda: cluster(features, ks, **kwargs), device)
            seconds.append(s)
        runs[start] = (result, statistics.median(seconds), seconds)

    rows = []
    print(f"{args.checkpoint}: {len(features)} x {features.shape[1]} features, epoch "
          f"{ckpt['epoch']}, {threads} thread(s), {environment(device)['device_name']}")
    print(format_header(COLUMNS))
    y = labels.numpy()
    for m, k in enumerate(ks):
        cold_ids = runs["cold"][0].im2cluster[m].cpu().numpy()
        for start in ("cold", "warm"):
            result, _, _ = runs[start]
            ids = result.im2cluster[m].cpu().numpy()
            objective = ((features - result.centroids[m][result.im2cluster[m]]) ** 2).sum().item()
            row = dict(k=k, start=start,
                       runs=1 if start == "warm" else a["nredo"],
                       iterations=a.get("warm_niter", 5) if start == "warm" else a["niter"],
                       kmeans_seconds=result.kmeans_seconds[m],
                       objective_normalized_centroids=objective,
                       ami_labels=adjusted_mutual_info_score(y, ids),
                       ami_cold_warm=adjusted_mutual_info_score(cold_ids, ids))
            rows.append(row)
            print(format_row([k, start, f"{row['runs']} x {row['iterations']}",
                              f"{row['kmeans_seconds']:.3f}", f"{objective:.1f}",
                              f"{row['ami_labels']:.4f}", f"{row['ami_cold_warm']:.4f}"],
                             COLUMNS))
    totals = {start: dict(median_seconds=runs[start][1], seconds=runs[start][2])
              for start in runs}
    print(f"whole E-step k-means (all granularities, median of {args.repeats}): cold "
          f"{totals['cold']['median_seconds']:.2f} s, warm {totals['warm']['median_seconds']:.2f} s")
    write_results(dict(environment(device, checkpoint=str(args.checkpoint),
                                   epoch=ckpt["epoch"], n=len(features)),
                       rows=rows, totals=totals),
                  args.json, f"estep_speed-{device.type}-{threads}t.json")


if __name__ == "__main__":
    main()
