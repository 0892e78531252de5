"""PCL's EM loop: MoCo v2 warm-up, then at every epoch cluster the momentum features and train
with ProtoNCE; or the baselines MoCo v2 and SimCLR. One process (CPU or GPU) or many with
torchrun:

    python -m pcl_ext.train                                   # the digits demo, CPU, minutes
    python -m pcl_ext.train --dataset fashion-mnist --out runs/fmnist
    torchrun --nproc_per_node 2 -m pcl_ext.train --out runs/ddp   # DDP (NCCL on GPUs, else gloo)
    python -m pcl_ext.train --out runs/fmnist --resume        # continue a killed run
    python -m pcl_ext.train --method simclr --out runs/simclr # SimCLR (or --method moco)

Hyper-parameters default to PCL's (``main_pcl.py``); a data set's preset replaces those that
cannot apply to it (PCL's 25k-100k clusters on 1,437 digits), and the command line overrides
both. ``--method moco`` (or ``--num-cluster ''``) is the pure-MoCo ablation; ``--method simclr``
trains SimCLR: no momentum encoder and no queue, NT-Xent (:class:`pcl_ext.NTXentLoss`, T = 0.5
unless ``--temperature``) on both views through the one encoder and its MLP head, with every
rank's embeddings as negatives under torchrun. Every epoch ends with an atomic checkpoint
(model, momentum encoder, optimizer, queue, RNG states, last clustering; SimCLR's has no
momentum encoder and no queue) in ``--out``; a killed
run resumed with ``--resume`` repeats at most the epoch it was in. Checkpoints hold tensors and
plain containers only and are read with ``torch.load(weights_only=True)``: reading one cannot
run code it carries.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import pickle
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset
from tqdm import tqdm

from . import ClusterResult, NTXentLoss, ProtoNCELoss, RingQueue, cluster, momentum_update_
from .cluster import coagulation_stats
from .data import AUGMENTATIONS, RAND_AUGMENT, build_datasets
from .evaluate import evaluate_checkpoint, extract_features, initial_encoder, load_checkpoint
from .loss import alignment, uniformity
from .models import ARCHS

# PCL's defaults (main_pcl.py), for ImageNet with 8 GPUs.
PCL_DEFAULTS = dict(arch="resnet50", epochs=200, warmup_epochs=20, batch_size=256, lr=0.03,
                    momentum=0.9, weight_decay=1e-4, low_dim=128, moco_m=0.999,
                    queue_size=16384, temperature=0.2, pcl_r="16384",
                    num_cluster="25000,50000,100000", image_size=None)
# Where PCL's values cannot apply: cluster counts and queues sized to the data set, all
# prototypes (r would exceed the free clusters), a faster key encoder (m = 0.99: PCL's 0.999
# assumes ~10^5 steps), the learning rate scaled to the batch, and for the CPU demo small
# inputs and a short schedule. The digits demo also needs T = 0.1 (MoCo's CIFAR value) and
# crops of at least half the image (CROP_MIN): with PCL's T = 0.2 its randomly initialised
# embeddings (cosine ~0.94 between any two) drift together instead of spreading, and 20%-area
# crops of 8x8 digits leave two views little in common; either way the instance term barely
# learns (loss ~5.8 of ln 513 = 6.24, top-1 5-12% through the warm-up).
PRESETS = {
    "digits": dict(arch="resnet18", epochs=16, warmup_epochs=6, batch_size=64, lr=0.01,
                   moco_m=0.99, queue_size=512, pcl_r="all", num_cluster="10,20,40",
                   image_size=12, temperature=0.1),
    "fashion-mnist": dict(arch="resnet18", epochs=30, warmup_epochs=5, batch_size=256,
                          lr=0.03, moco_m=0.99, queue_size=4096, pcl_r="all",
                          num_cluster="50,100,200"),
    "cifar10": dict(arch="resnet18", epochs=200, warmup_epochs=20, batch_size=256, lr=0.03,
                    moco_m=0.99, queue_size=4096, pcl_r="all", num_cluster="100,200,500"),
    "imagefolder": {},
}
# What a method changes, below the command line and above the data set's preset. SimCLR's
# T = 0.5 is its value at batch 256 with SGD-momentum (Chen et al. 2020, appendix B.7).
METHODS = {"pcl": {}, "moco": dict(num_cluster=""), "simclr": dict(num_cluster="",
                                                                   temperature=0.5)}
METHOD_NAMES = {"pcl": "PCL", "moco": "MoCo", "simclr": "SimCLR"}
# The smallest crop area of the views where MoCo v2's 0.2 cannot apply (InfoMin Aug's, with a
# MoCo queue, is the same).
CROP_MIN = {"digits": 0.5}


def bounded(kind: type, low: float, high: float = math.inf, *,
            low_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type``: a finite ``kind`` (int or float) in ``[low, high]`` (``(low,
    high]`` with ``low_open``). argparse turns its error into a usage error naming the flag."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {'an integer' if kind is int else 'a number'}, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if low_open else value >= low)
                and value <= high):
            bound = f"{'>' if low_open else '>='} {low}"
            raise argparse.ArgumentTypeError(
                f"must be {bound}" + (f" and <= {high}" if high < math.inf else "")
                + f", got {text}")
        return value
    return parse


def cluster_counts(text: str) -> list[int]:
    """``--num-cluster``: comma-separated counts, each >= 1; empty for none (pure MoCo)."""
    return [bounded(int, 1)(k) for k in text.split(",") if k.strip()]


def negatives_count(text: str) -> Optional[int]:
    """``--pcl-r``: ``all`` (None: every prototype) or a count >= 0."""
    if text == "all":
        return None
    try:
        return bounded(int, 0)(text)
    except argparse.ArgumentTypeError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (or 'all')") from None


# The command-line type of each PCL_DEFAULTS flag; the presets' strings go through it too.
FLAG_TYPES = dict(arch=str, epochs=bounded(int, 1), warmup_epochs=bounded(int, 0),
                  batch_size=bounded(int, 1), lr=bounded(float, 0),
                  momentum=bounded(float, 0, 1), weight_decay=bounded(float, 0),
                  low_dim=bounded(int, 1), moco_m=bounded(float, 0, 1),
                  queue_size=bounded(int, 1), temperature=bounded(float, 0, low_open=True),
                  pcl_r=negatives_count, num_cluster=cluster_counts, image_size=bounded(int, 1))


def flag_error(message: str) -> NoReturn:
    """A flag refuted by what only the run knows (the data, the processes): argparse's usage
    error, exit status 2, before any work."""
    print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)  # argparse's prog
    sys.exit(2)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", default="digits", choices=list(PRESETS))
    p.add_argument("--data-root", default=None, help="folder of the data set's files")
    p.add_argument("--out", default="runs/pcl", help="checkpoints, metrics and plots")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.add_argument("--method", choices=list(METHODS), default="pcl",
                   help="pcl; moco: PCL without clusters (as --num-cluster ''); simclr: "
                        "NT-Xent on the two views, no momentum encoder or queue, T 0.5")
    for name in PCL_DEFAULTS:  # absent unless given: the data set's preset, else PCL's value
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, type=FLAG_TYPES[name], default=argparse.SUPPRESS,
                       choices=list(ARCHS) if name == "arch" else None,
                       help=f"PCL: {PCL_DEFAULTS[name]}")
    p.add_argument("--aug", choices=list(AUGMENTATIONS), default="aug-plus",
                   help="the views: MoCo v2's aug-plus, or InfoMin Aug (stronger colour jitter, "
                        "then RandAugment; pcl_ext.data.pretrain_transform)")
    p.add_argument("--randaug-ops", type=bounded(int, 0), default=RAND_AUGMENT[0],
                   help="--aug infomin: RandAugment's layers per image, each applied with "
                        "probability 0.5 (InfoMin: 2; 0: none)")
    p.add_argument("--randaug-magnitude", type=bounded(int, 0, 30), default=RAND_AUGMENT[1],
                   help="--aug infomin: RandAugment's magnitude bin, 0..30 (InfoMin: 30)")
    p.add_argument("--crop-min", type=bounded(float, 0, 1, low_open=True), default=None,
                   help="smallest area fraction of the random crops (default: the views', "
                        "MoCo v2: 0.2, InfoMin: 0.08; digits: 0.5 and 0.2)")
    p.add_argument("--shuffle-bn-splits", type=bounded(int, 1), default=1,
                   help="shuffle BN: the key encoder's batch norm sees this many random "
                        "sub-batches per process (MoCo: one per GPU, 32 images each; 1 = off). "
                        "On the digits demo, 4 sub-batches of 16 gave worse features than 1")
    p.add_argument("--shuffle-bn-ranks", action=argparse.BooleanOptionalAction, default=True,
                   help="under torchrun, permute the global key batch across the ranks before "
                        "the key encoder (MoCo's shuffle BN across GPUs)")
    p.add_argument("--amp", choices=["off", "bf16", "fp16"], default="off",
                   help="autocast the encoders' forward passes: bf16 (GPUs, and CPUs with "
                        "AVX512-BF16 or AMX) or fp16 (GPUs, with a gradient scaler); the loss, "
                        "weights and optimizer stay float32. On the digits demo bf16 trained "
                        "1.5x faster on a 2-core CPU but gave worse features (one run each)")
    p.add_argument("--nredo", type=bounded(int, 1), default=5, help="k-means restarts (PCL: 5)")
    p.add_argument("--niter", type=bounded(int, 1), default=20,
                   help="k-means iterations (PCL: 20)")
    p.add_argument("--estep", choices=["cold", "warm"], default="cold",
                   help="cold: PCL's k-means from random points at every E-step (--nredo runs "
                        "of --niter iterations); warm: one run of --warm-niter iterations from "
                        "the previous E-step's centroids (cold at the first E-step and where "
                        "the number of clusters or the dimension changed)")
    p.add_argument("--warm-niter", type=bounded(int, 1), default=5,
                   help="k-means iterations of a warm-started E-step")
    for term, what in (("align", "each embedding's distance to its prototype"),
                       ("uniform", "uniformity of the batch's per-cluster mean embeddings"),
                       ("corr", "correlation between their dimensions")):
        p.add_argument(f"--pauc-{term}", type=bounded(float, 0), default=0.0,
                       help=f"weight of PAUC's {term} term ({what}; pcl_ext.ProtoNCELoss "
                            "documents this package's reading of it); 0 = PCL")
    p.add_argument("--workers", type=bounded(int, 0), default=0, help="data loader processes")
    p.add_argument("--max-samples", type=bounded(int, 1), default=None,
                   help="train on the first N samples only (smoke runs)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=bounded(int, 0, 2**32 - 1), default=0)  # numpy's range
    p.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="also keep every epoch's checkpoint as OUT/checkpoint-e<epoch>.pt "
                        "(for benchmarks/instance_probe.py; ~140 MB each at resnet18)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = p.parse_args(argv)
    if args.method != "pcl" and getattr(args, "num_cluster", []):
        p.error(f"argument --num-cluster: --method {args.method} has no clusters")
    preset, method = PRESETS[args.dataset], METHODS[args.method]
    for name, pcl_value in PCL_DEFAULTS.items():
        if not hasattr(args, name):
            value = method.get(name, preset.get(name, pcl_value))
            setattr(args, name, FLAG_TYPES[name](value) if isinstance(value, str) else value)
    if args.crop_min is None and args.dataset in CROP_MIN:
        args.crop_min = CROP_MIN[args.dataset]
    return args


def autocast(args, device: torch.device):
    """The ``--amp`` context for forward passes (a no-op when off)."""
    if args.amp == "off":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16)


class Distributed:
    """torchrun's environment, or a single process."""

    def __init__(self, device: Optional[str]) -> None:
        self.enabled = "RANK" in os.environ
        self.rank = int(os.environ.get("RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        local = int(os.environ.get("LOCAL_RANK", 0))
        use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
        self.device = torch.device(f"cuda:{local}" if use_cuda and self.enabled
                                   else device or ("cuda" if use_cuda else "cpu"))
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.enabled:
            dist.init_process_group("nccl" if use_cuda else "gloo")
        self.master = self.rank == 0

    def broadcast(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj if self.master else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]


@torch.no_grad()
def compute_features(model: nn.Module, dataset, args, env: Distributed) -> Tensor:
    """Momentum-encoder embeddings of the whole training set, [n, dim], rows in dataset order
    on every rank: each rank encodes its shard, then features are gathered *by index*."""
    indices = torch.arange(len(dataset))[env.rank::env.world]
    loader = DataLoader(Subset(dataset, indices.tolist()), batch_size=args.batch_size * 2,
                        num_workers=args.workers)
    with autocast(args, env.device):
        local, _ = extract_features(model, loader, env.device, args.progress and env.master)
    if not env.enabled:
        return local
    width = math.ceil(len(dataset) / env.world)  # shards differ by at most one row: pad
    padded = local.new_zeros(width, local.shape[1])
    padded[:len(local)] = local
    gathered = [torch.empty_like(padded) for _ in range(env.world)]
    dist.all_gather(gathered, padded)
    out = local.new_empty(len(dataset), local.shape[1])
    for rank, part in enumerate(gathered):
        rows = torch.arange(len(dataset))[rank::env.world]
        out[rows.to(out.device)] = part[:len(rows)]
    return out


def run_estep(model_k: nn.Module, dataset, args, env: Distributed,
              init_centroids: Optional[list[Tensor]] = None,
              ) -> tuple[ClusterResult, Optional[dict[str, list]]]:
    """Cluster on rank 0 while the others wait, then broadcast (PCL's scheme); with
    ``init_centroids`` (``--estep warm``) k-means starts from them. Also returns, on rank 0,
    the E-step's log entries: per granularity the coagulation statistics
    (:func:`pcl_ext.cluster.coagulation_stats`), the k-means seconds and whether it was
    warm-started."""
    features = compute_features(model_k, dataset, args, env)
    result, log = None, None
    if env.master:
        result = cluster(features, args.num_cluster, niter=args.niter, nredo=args.nredo,
                         temperature=args.temperature, seed=args.seed,
                         init_centroids=init_centroids, warm_niter=args.warm_niter)
        stats = coagulation_stats(features, result)
        log = {"num_clusters": list(args.num_cluster), "kmeans_seconds": result.kmeans_seconds,
               "warm": result.warm, **{key: [s[key] for s in stats] for key in stats[0]}}
        result = result.to("cpu")
    return env.broadcast(result).to(env.device), log


def adjust_learning_rate(optimizer: torch.optim.Optimizer, epoch: int, args) -> float:
    """PCL's cosine schedule, stepped per epoch."""
    lr = args.lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def batch_geometry(q: Tensor, k: Tensor) -> Tensor:
    """Wang and Isola's alignment of the batch's pairs of views and uniformity of its
    queries, ``[2]`` float64 on the device (summed over the epoch without host reads)."""
    return torch.stack([alignment(q, k), uniformity(q)]).double()


@torch.no_grad()
def encode_keys(model_k, im_k: Tensor, splits: int, env: Optional[Distributed] = None,
                across_ranks: bool = False) -> Tensor:
    """MoCo's shuffle BN: the key encoder's batch norm must not see the keys grouped as their
    queries are, or its statistics tell which key belongs to which query (MoCo learns that
    shortcut instead of features). Within a process the batch is permuted and encoded as
    ``splits`` sub-batches. Under torchrun with ``across_ranks`` (MoCo's ``_batch_shuffle_ddp``)
    the global batch is first permuted across the ranks, each rank encodes its share, and the
    keys come back to the rank and row of their images. Returns ``[len(im_k), dim]``."""
    if not (across_ranks and env is not None and env.enabled and env.world > 1):
        perm = torch.randperm(len(im_k), device=im_k.device)
        k = torch.cat([model_k(part) for part in im_k[perm].chunk(splits)])
        return k[torch.argsort(perm)]
    b = len(im_k)  # equal on every rank: the loader drops the last partial batch
    images = [torch.empty_like(im_k) for _ in range(env.world)]
    dist.all_gather(images, im_k.contiguous())
    perm = torch.randperm(b * env.world, device=im_k.device)
    dist.broadcast(perm, src=0)  # rank 0's permutation for all
    mine = torch.cat(images)[perm[env.rank * b:(env.rank + 1) * b]]
    k = encode_keys(model_k, mine, splits).contiguous()
    keys = [torch.empty_like(k) for _ in range(env.world)]
    dist.all_gather(keys, k)
    unshuffled = torch.empty_like(torch.cat(keys))
    unshuffled[perm] = torch.cat(keys)
    return unshuffled[env.rank * b:(env.rank + 1) * b]


def train_one_epoch(model_q, model_k, queue, criterion, optimizer, scaler, loader,
                    cluster_result, epoch: int, args, env: Distributed) -> dict[str, float]:
    sums = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss, acc_inst, acc_proto
    geometry = torch.zeros(2, dtype=torch.float64, device=env.device)  # alignment, uniformity
    steps = 0
    bar = tqdm(loader, desc=f"epoch {epoch}", disable=not (args.progress and env.master),
               leave=False)
    for (im_q, im_k), index in bar:
        im_q, im_k = im_q.to(env.device, non_blocking=True), im_k.to(env.device, non_blocking=True)
        if model_k is None:  # SimCLR: both views in one batch, as its batch norm sees them
            with autocast(args, env.device):
                z = model_q(torch.cat([im_q, im_k]))
            q, k = F.normalize(z.float(), dim=1).chunk(2)                   # N x dim each
            loss = criterion(q, k)
        else:
            with autocast(args, env.device):
                q = model_q(im_q)
            q = F.normalize(q.float(), dim=1)                               # N x dim
            with torch.no_grad():
                momentum_update_(model_k, getattr(model_q, "module", model_q), args.moco_m)
                with autocast(args, env.device):
                    k = encode_keys(model_k, im_k, args.shuffle_bn_splits, env,
                                    args.shuffle_bn_ranks)
                k = F.normalize(k.float(), dim=1)                           # N x dim
            loss = criterion(q, k, queue, cluster_result, index)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()  # the scaler is a pass-through unless --amp fp16
        scaler.step(optimizer)
        scaler.update()
        if queue is not None:
            queue.enqueue_(k)
        acc_proto = criterion.acc_proto if cluster_result is not None else loss.new_zeros(())
        sums += torch.stack([loss.detach(), criterion.acc_inst, acc_proto]).double()
        geometry += batch_geometry(q.detach(), k.detach())
        steps += 1
        if env.master and args.progress and steps % 10 == 0:
            bar.set_postfix(loss=f"{sums[0].item() / steps:.3f}")
    if env.enabled:
        dist.all_reduce(sums)
        sums /= env.world
        dist.all_reduce(geometry)
        geometry /= env.world
    loss, acc_inst, acc_proto = (sums / max(steps, 1)).tolist()
    align, uniform = (geometry / max(steps, 1)).tolist()
    return {"loss": loss, "acc_inst": acc_inst,
            "acc_proto": acc_proto if cluster_result is not None else None,
            "align": align, "uniform": uniform}


def save_checkpoint(path: Path, state: dict) -> None:
    """Write to a temporary file in the same folder, then rename: a kill at any moment
    leaves either the previous checkpoint or the new one, never a torn file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def keep_copy(path: Path, dest: Path) -> None:
    """``dest`` holds what ``path`` holds now: a hard link (the next save_checkpoint replaces
    ``path``, not the file), or a copy, renamed into place, where links are not allowed."""
    dest.unlink(missing_ok=True)  # a resumed run writes its replayed epoch again
    try:
        os.link(path, dest)
    except OSError:
        tmp = dest.with_name(dest.name + ".tmp")
        shutil.copyfile(path, tmp)
        os.replace(tmp, dest)


def rng_state() -> dict:
    """Every RNG's state in plain containers and tensors, which checkpoints must hold only."""
    numpy_state = np.random.get_state(legacy=False)
    # a list, not an ndarray: torch.load(weights_only=True) refuses NumPy objects
    numpy_state["state"]["key"] = numpy_state["state"]["key"].tolist()
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # numpy takes the key as a list too
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def plot_metrics(history: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(2, 4, figsize=(17, 7))
    axes = axes.ravel()
    axes[0].plot(epochs, [h["loss"] for h in history])
    axes[0].set_title("loss")
    axes[1].plot(epochs, [h["acc_inst"] for h in history], label="instance")
    proto = [(h["epoch"], h["acc_proto"]) for h in history if h["acc_proto"] is not None]
    if proto:
        axes[1].plot(*zip(*proto), label="prototype")
    axes[1].set_title("top-1 accuracy (%)")
    axes[1].legend()
    axes[2].plot(epochs, [h["epoch_seconds"] for h in history], label="epoch")
    axes[2].plot(epochs, [h["estep_seconds"] for h in history], label="E-step")
    axes[2].set_title("seconds")
    axes[2].legend()
    # Coagulation monitors (runs logged before they existed have none of these keys).
    for ax, key, title in ((axes[3], "align", "alignment of the views (lower: closer)"),
                           (axes[4], "uniform", "uniformity of the batch (lower: spread)")):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points))
        ax.set_title(title)
    esteps = [h for h in history if "spread_ratio" in h]
    for ax, keys, title in ((axes[5], ["spread_ratio"], "intra-cluster / inter-prototype RMS"),
                            (axes[6], ["empty_share", "singleton_share"],
                             "share of empty (-) and singleton (--) clusters"),
                            (axes[7], ["phi_cv"], "spread of phi (std / mean)")):
        for m in range(len(esteps[0]["spread_ratio"]) if esteps else 0):
            for key, style in zip(keys, ("-", "--")):
                ax.plot([h["epoch"] for h in esteps], [h[key][m] for h in esteps], style,
                        color=f"C{m}", label=f"K={esteps[0]['num_clusters'][m]}"
                        if key == keys[0] else None)
        if esteps:
            ax.legend()
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> None:
    train(parse_args(argv))


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the final evaluation (rank 0, unless --no-eval)."""
    env = Distributed(args.device)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if env.master:
        out.mkdir(parents=True, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)  # same on every rank: identical initial models and queues

    train_set, train_eval_set, test_set, info = build_datasets(
        args.dataset, args.data_root, image_size=args.image_size,
        crop_scale=None if args.crop_min is None else (args.crop_min, 1.0), aug=args.aug,
        rand_augment=(args.randaug_ops, args.randaug_magnitude))
    if args.max_samples is not None:
        keep = list(range(min(args.max_samples, len(train_set))))
        train_set, train_eval_set = Subset(train_set, keep), Subset(train_eval_set, keep)
    n, per_rank = len(train_set), args.batch_size // env.world
    if per_rank == 0:
        flag_error(f"--batch-size {args.batch_size} is smaller than the {env.world} processes")
    if n // env.world < per_rank:  # the loader drops the last partial batch: no step would run
        flag_error(f"--batch-size {args.batch_size} exceeds the {n} training images"
                   + (f" shared by {env.world} processes" if env.world > 1 else "")
                   + ": no training step would run")
    if args.num_cluster and max(args.num_cluster) > n:
        flag_error(f"--num-cluster {max(args.num_cluster)} exceeds the {n} training images "
                   "(k-means needs at least one per cluster)")
    if args.pcl_r is not None and args.num_cluster and \
            args.pcl_r > min(args.num_cluster) - per_rank:
        flag_error(f"--pcl-r {args.pcl_r} exceeds the free clusters of the smallest "
                   f"--num-cluster {min(args.num_cluster)}; use --pcl-r all")
    model_q = initial_encoder(vars(args), info).to(env.device)  # what evaluate's baseline is
    if args.method == "simclr":  # every rank's embeddings are negatives of every row
        model_k, queue = None, None
        criterion = NTXentLoss(args.temperature, normalize=False, gather=env.enabled)
    else:
        model_k = copy.deepcopy(model_q).requires_grad_(False)
        queue = RingQueue(args.queue_size, args.low_dim, device=env.device)
        criterion = ProtoNCELoss(args.temperature, args.pcl_r,
                                 generator=torch.Generator(env.device).manual_seed(args.seed),
                                 align_weight=args.pauc_align,
                                 uniform_weight=args.pauc_uniform, corr_weight=args.pauc_corr)
    optimizer = torch.optim.SGD(model_q.parameters(), args.lr, momentum=args.momentum,
                                weight_decay=args.weight_decay)
    if args.amp == "fp16" and env.device.type != "cuda":
        sys.exit(f"--amp fp16 needs a CUDA device (got {env.device}); use --amp bf16 on CPUs")
    scaler = torch.amp.GradScaler(env.device.type, enabled=args.amp == "fp16")
    start_epoch, history = 0, []
    last_centroids = None  # the previous E-step's prototypes: where --estep warm starts
    if args.resume and ckpt_path.exists():
        try:
            ckpt = load_checkpoint(ckpt_path, map_location=env.device)
        except pickle.UnpicklingError as exc:
            sys.exit(str(exc))
        if ("model_k" in ckpt) != (model_k is not None):
            sys.exit(f"{ckpt_path}: a {ckpt['args'].get('method', 'pcl')} checkpoint cannot "
                     f"resume --method {args.method}")
        model_q.load_state_dict(ckpt["model_q"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if model_k is not None:
            model_k.load_state_dict(ckpt["model_k"])
            queue.load_state_dict(ckpt["queue"])
            criterion.generator.set_state(ckpt["sampler_rng"])
        set_rng_state(ckpt["rng"][env.rank] if env.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        start_epoch, history = ckpt["epoch"], ckpt["history"]  # the E-step reruns each epoch
        if ckpt.get("cluster_result") is not None:
            last_centroids = list(ckpt["cluster_result"]["centroids"])
        if env.master:
            print(f"resumed {ckpt_path} at epoch {start_epoch}")
    elif args.resume and env.master:
        print(f"no checkpoint at {ckpt_path}: starting from scratch")
    if env.enabled:
        model_q = DistributedDataParallel(model_q, device_ids=[env.device] if
                                          env.device.type == "cuda" else None)
    sampler = (DistributedSampler(train_set, shuffle=True, seed=args.seed, drop_last=True)
               if env.enabled else RandomSampler(train_set, generator=torch.Generator()))
    loader = DataLoader(train_set, batch_size=args.batch_size // env.world, sampler=sampler,
                        num_workers=args.workers, drop_last=True,
                        pin_memory=env.device.type == "cuda")
    if env.master:
        losses = (f"T={args.temperature}" if args.method == "simclr" else
                  f"clusters {args.num_cluster or 'none (MoCo)'}, "
                  f"r={'all' if args.pcl_r is None else args.pcl_r}")
        print(f"{METHOD_NAMES[args.method]} on {args.dataset} ({len(train_set)} images), "
              f"{args.arch}, {env.world} x {env.device}, {losses}, "
              f"epochs {start_epoch}..{args.epochs}")

    for epoch in range(start_epoch, args.epochs):
        # The sampler's order depends on the epoch only, so a resumed epoch replays exactly.
        if env.enabled:
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(args.seed + epoch)
        start = time.perf_counter()
        cluster_result, estep_log = None, None
        if epoch >= args.warmup_epochs and args.num_cluster:
            cluster_result, estep_log = run_estep(
                model_k, train_eval_set, args, env,
                last_centroids if args.estep == "warm" else None)
            last_centroids = cluster_result.centroids
        estep_seconds = time.perf_counter() - start
        lr = adjust_learning_rate(optimizer, epoch, args)
        metrics = train_one_epoch(model_q, model_k, queue, criterion, optimizer, scaler,
                                  loader, cluster_result, epoch, args, env)
        metrics.update(epoch=epoch, lr=lr, epoch_seconds=time.perf_counter() - start,
                       estep_seconds=estep_seconds, **(estep_log or {}))
        history.append(metrics)
        rngs = [None] * env.world
        if env.enabled:
            dist.all_gather_object(rngs, rng_state())
        else:
            rngs = [rng_state()]
        if env.master:
            state = {
                "epoch": epoch + 1, "args": vars(args), "info": dataclasses.asdict(info),
                "model_q": getattr(model_q, "module", model_q).state_dict(),
                "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "rng": rngs, "history": history,
                "cluster_result": None if cluster_result is None else  # PCL's dict of lists
                dict(cluster_result.to("cpu"))}
            if model_k is not None:  # SimCLR has no momentum encoder, queue or sampler
                state.update(model_k=model_k.state_dict(), queue=queue.state_dict(),
                             sampler_rng=criterion.generator.get_state())
            save_checkpoint(ckpt_path, state)
            if args.keep_checkpoints:
                keep_copy(ckpt_path, out / f"checkpoint-e{epoch + 1}.pt")
            # Rewritten whole from the checkpoint's history: a resumed run's log has no gaps
            # and no repeats.
            tmp = out / "metrics.jsonl.tmp"
            tmp.write_text("".join(json.dumps(h) + "\n" for h in history))
            os.replace(tmp, out / "metrics.jsonl")
            plot_metrics(history, out / "metrics.png")
            proto = "" if metrics["acc_proto"] is None else \
                f" acc_proto {metrics['acc_proto']:.1f}"
            print(f"epoch {epoch}: loss {metrics['loss']:.4f} acc_inst "
                  f"{metrics['acc_inst']:.1f}{proto} lr {lr:.4f} "
                  f"{metrics['epoch_seconds']:.1f}s (E-step {estep_seconds:.1f}s)", flush=True)

    if env.enabled:
        dist.destroy_process_group()
    results = {}
    if env.master and not args.no_eval:
        results = evaluate_checkpoint(ckpt_path, device=env.device, progress=args.progress)
    return results


if __name__ == "__main__":
    main()
