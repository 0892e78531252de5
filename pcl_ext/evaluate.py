"""Evaluation of frozen features: weighted kNN, linear probe, and clustering quality.

``evaluate_encoder`` runs all three on an encoder; ``format_table`` prints several encoders'
results side by side (e.g. trained vs random init). ``python -m pcl_ext.evaluate CHECKPOINT...``
evaluates ``pcl_ext.train`` checkpoints beside a random encoder of the same architecture.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import sys
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["extract_features", "knn_accuracy", "linear_probe", "fit_logistic_regression",
           "cluster_quality", "evaluate_encoder", "initial_encoder", "load_checkpoint",
           "evaluate_checkpoint",
           "format_table"]


@torch.no_grad()
def extract_features(model_or_fn: Union[nn.Module, Callable[[Tensor], Tensor]],
                     loader: Iterable, device: Union[str, torch.device],
                     progress: bool = True) -> tuple[Tensor, Tensor]:
    """L2-normalized features ``[n, d]`` (float32) and labels ``[n]`` (int64), on ``device``.

    ``loader`` yields ``(images, labels, ...)`` batches. An ``nn.Module`` runs in eval mode
    (batch-norm statistics frozen) and gets its previous mode back afterwards.
    """
    from tqdm import tqdm

    was_training = isinstance(model_or_fn, nn.Module) and model_or_fn.training
    if isinstance(model_or_fn, nn.Module):
        model_or_fn.eval()
    feats, labels = [], []
    try:
        for batch in tqdm(loader, desc="features", disable=not progress, leave=False):
            out = model_or_fn(batch[0].to(device, non_blocking=True))
            feats.append(F.normalize(out.float().flatten(1), dim=1))
            labels.append(batch[1].to(device, torch.long))
    finally:
        if was_training:
            model_or_fn.train()
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_accuracy(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                 test_labels: Tensor, k: int = 200, t: float = 0.07,
                 num_classes: Optional[int] = None, block_elems: int = 1 << 26) -> float:
    r"""Top-1 accuracy (%) of the weighted kNN classifier of InstDisc (Wu et al., 2018).

    Each test sample takes its ``k`` most cosine-similar training samples; neighbour ``j``
    votes for its class with weight :math:`\exp(s_j / t)`; the class with the largest summed
    weight wins (ties: the smallest class id). Features are L2-normalized here, so passing
    normalized or raw features gives the same result. Test rows are processed in blocks of
    about ``block_elems`` similarities (256 MiB; one row at least), so memory stays bounded.
    """
    train = F.normalize(train_feats.float(), dim=1)
    test = F.normalize(test_feats.float(), dim=1).to(train.device)
    train_labels = train_labels.to(train.device)
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, train.shape[0])
    rows = max(1, block_elems // max(train.shape[0], k * num_classes))
    correct = 0
    for test_block, label_block in zip(test.split(rows), test_labels.to(train.device).split(rows)):
        sim, idx = (test_block @ train.t()).topk(k, dim=1)                # b x k
        votes = F.one_hot(train_labels[idx], num_classes).float()         # b x k x C
        # a contraction, not scatter_add_: no atomics, so the same votes on every run
        scores = torch.einsum("bk,bkc->bc", (sim / t).exp(), votes)       # b x C
        correct += (scores.argmax(1) == label_block).sum().item()
    return 100.0 * correct / test.shape[0]


def linear_probe(train_feats: Tensor, train_labels: Tensor, test_feats: Tensor,
                 test_labels: Tensor, *, c: float = 1.0, max_iter: int = 1000,
                 tol: float = 1e-5) -> float:
    """Top-1 accuracy (%) of a multinomial logistic regression on frozen features
    (:func:`fit_logistic_regression` on the training features, then argmax on the test ones),
    computed on the training features' device."""
    weight, bias, mean, std = fit_logistic_regression(train_feats, train_labels, c=c,
                                                      max_iter=max_iter, tol=tol)
    x = (test_feats.to(mean.device, mean.dtype) - mean) / std
    predicted = (x @ weight.t() + bias).argmax(1)
    return 100.0 * (predicted == test_labels.to(predicted.device)).double().mean().item()


def fit_logistic_regression(feats: Tensor, labels: Tensor, *, c: float = 1.0,
                            max_iter: int = 1000, tol: float = 1e-5,
                            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""scikit-learn's ``LogisticRegression`` (multinomial, L2, ``C = c``) on standardized
    features, solved in torch on the features' device: a convex problem solved to
    convergence, with no learning rate or schedule to tune per encoder.

    With :math:`x_i` the rows of ``feats`` standardized by their mean and standard deviation
    (zero-variance columns left at 0, as ``StandardScaler`` does), it minimizes

    .. math:: f(W, b) = \frac1n \sum_i \operatorname{CE}(W x_i + b, y_i)
              + \frac{\|W\|^2}{2 C n}

    by full-batch L-BFGS (``torch.optim.LBFGS``, strong Wolfe line search), in the
    coordinates :math:`V = W P^{-1}` with :math:`P = (S + I / (Cn))^{-1/2}` and
    :math:`S = \frac1n\sum_i x_i x_i^T`: the same problem with the same minimizer (the
    penalty is still taken on :math:`W = VP`), but the solver sees decorrelated features
    :math:`P x_i`, so it needs far fewer iterations than in :math:`W` (scikit-learn's
    solver), where the correlations between the features slow it down. It stops when the
    largest gradient entry (w.r.t. ``V`` and ``b``) is below ``tol``, when a step no longer
    changes ``f``, or after ``max_iter`` iterations. On 60,000 x 512 backbone features of
    Fashion-MNIST (``benchmarks/linear_probe_speed.py``, one thread of a 2-core AVX2 CPU) it
    ended 1e-5 above the lowest objective found, where scikit-learn's default stopping
    (865 iterations) left 4e-4, in 31 s instead of 77 s (median of 3). The iterations run
    in float32 (TF32 on CUDA only if the user allows it); the sums behind the mean and
    standard deviation, and the eigendecomposition behind :math:`P`, in float64.

    Returns ``W`` ``[classes, d]``, ``b`` ``[classes]`` and the standardization's ``mean``
    and ``std`` ``[d]``, float64 on ``feats``' device; classes are ``0..labels.max()``.
    """
    x = feats.detach().float()
    y = labels.to(x.device, torch.long)
    n, d = x.shape
    mean = x.sum(0, dtype=torch.float64) / n      # float64 sums, no float64 copy of x
    x = x - mean.float()
    std = (x.square().sum(0, dtype=torch.float64) / n).sqrt()
    std = torch.where(std > 0, std, torch.ones_like(std))
    x = x / std.float()
    second_moment = (x.t() @ x).double() / n
    evals, evecs = torch.linalg.eigh(second_moment + torch.eye(d, dtype=torch.float64,
                                                               device=x.device) / (c * n))
    precond = ((evecs * evals.rsqrt()) @ evecs.t()).float()          # P, d x d, symmetric
    z = x @ precond                                                  # n x d, decorrelated
    num_classes = int(y.max()) + 1
    v = z.new_zeros(num_classes, d, requires_grad=True)
    b = z.new_zeros(num_classes, requires_grad=True)
    solver = torch.optim.LBFGS([v, b], max_iter=max_iter, tolerance_grad=tol,
                               tolerance_change=1e-12, history_size=20,
                               line_search_fn="strong_wolfe")

    def objective() -> Tensor:
        solver.zero_grad()
        loss = F.cross_entropy(z @ v.t() + b, y) + (v @ precond).square().sum() / (2 * c * n)
        loss.backward()
        return loss

    with torch.enable_grad():
        solver.step(objective)
    return (v.detach() @ precond).double(), b.detach().double(), mean, std


def cluster_quality(feats: Tensor, labels: Tensor, num_clusters: int, seed: int = 0,
                    nredo: int = 1) -> dict[str, float]:
    """AMI and NMI between the classes and a k-means clustering of the L2-normalized features.

    k-means is PCL's (``pcl_ext.cluster.kmeans``: faiss, 20 iterations), best of ``nredo``
    runs.
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    from .cluster import kmeans

    assign = _numpy(kmeans(F.normalize(feats.float(), dim=1), num_clusters,
                           seed=seed, nredo=nredo).assignments)
    truth = _numpy(labels)
    return {"ami": float(adjusted_mutual_info_score(truth, assign)),
            "nmi": float(normalized_mutual_info_score(truth, assign))}


def evaluate_encoder(encoder: Union[nn.Module, Callable[[Tensor], Tensor]],
                     train_eval_loader: Iterable, test_loader: Iterable, num_classes: int,
                     device: Union[str, torch.device], *, knn_k: int = 200, knn_t: float = 0.07,
                     seed: int = 0, progress: bool = True) -> dict[str, float]:
    """kNN and linear-probe top-1 (%) on the test set, AMI/NMI of k-means on the train set.

    ``train_eval_loader`` should yield the training images without augmentation. k-means uses
    ``num_classes`` clusters on the training features (the set PCL's E-step clusters).
    """
    train_x, train_y = extract_features(encoder, train_eval_loader, device, progress)
    test_x, test_y = extract_features(encoder, test_loader, device, progress)
    return {"knn_top1": knn_accuracy(train_x, train_y, test_x, test_y, k=knn_k, t=knn_t,
                                     num_classes=num_classes),
            "linear_top1": linear_probe(train_x, train_y, test_x, test_y),
            **cluster_quality(train_x, train_y, num_classes, seed=seed)}


_COLUMNS = {"knn_top1": ("kNN top-1 %", ".2f"), "linear_top1": ("linear top-1 %", ".2f"),
            "ami": ("AMI", ".4f"), "nmi": ("NMI", ".4f")}


def format_table(rows: dict[str, dict[str, float]]) -> str:
    """One line per encoder (``{"trained": metrics, "random init": metrics}``), one column per
    metric: those of ``evaluate_encoder`` first, then any others; ``-`` where one is missing."""
    keys = [k for k in _COLUMNS if any(k in r for r in rows.values())]
    keys += sorted({k for r in rows.values() for k in r} - set(keys))
    heads = [_COLUMNS.get(k, (k, ".4g"))[0] for k in keys]
    cells = [[name] + [format(r[k], _COLUMNS.get(k, (k, ".4g"))[1]) if k in r else "-"
                       for k in keys] for name, r in rows.items()]
    widths = [max(len(str(c)) for c in col) for col in zip(["encoder"] + heads, *cells)]
    lines = [["encoder"] + heads] + cells
    return "\n".join("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def initial_encoder(args: dict, info) -> nn.Module:
    """The query encoder a ``pcl_ext.train`` run with these ``args`` (a checkpoint's
    ``"args"``) started from, before any step: the first draw after seeding with its seed, as in
    the trainer. ``info`` is the data set's ``DatasetInfo`` (channels, small-image stem)."""
    from .models import build_encoder

    torch.manual_seed(args["seed"])
    return build_encoder(arch=args["arch"], dim=args["low_dim"], small_images=info.small_images,
                         in_channels=info.channels)


def load_checkpoint(path: Union[str, Path],
                    map_location: Union[str, torch.device, None] = "cpu") -> dict:
    """A ``pcl_ext.train`` checkpoint, read with ``torch.load(weights_only=True)``.

    A checkpoint holds tensors and plain containers only (the RNG states, the arguments and the
    clustering included), so reading one never runs code: a pickle may carry any callable
    (``os.system`` with its arguments) and ``weights_only=False`` would call it. Anything else
    is refused with ``pickle.UnpicklingError`` naming the file and, where torch says it, the
    object it refers to (checkpoints of earlier pcl_ext versions too: they held NumPy arrays
    and dataclasses).
    """
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))  # the global torch refused
        what = f"`{found.group(1)}`" if found else "something other than tensors and containers"
        raise pickle.UnpicklingError(
            f"{path}: not loaded: the file refers to {what}, which a pcl_ext checkpoint never "
            "holds (pcl_ext reads checkpoints with torch.load(weights_only=True), so that "
            "reading one cannot run code it carries)") from None


def evaluate_checkpoint(paths: Union[str, Path, Sequence[Union[str, Path]]],
                        device: Union[str, torch.device, None] = None, *,
                        batch_size: int = 512, progress: bool = True) -> dict[str, dict]:
    """Evaluate the query encoder of one or more ``pcl_ext.train`` checkpoints beside a randomly
    initialised encoder of the same architecture; print one table and write each checkpoint's
    row and its random baseline as JSON (``eval.json`` beside the checkpoint).

    Backbone (pre-MLP) features are evaluated. Checkpoints with the same data set, input size,
    architecture and seed (a PCL run and its MoCo ablation) share one random baseline; the
    random encoder is the trained one's own initialisation (same seed).
    """
    from torch.utils.data import DataLoader

    from .data import build_datasets

    paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise ValueError("evaluate_checkpoint: `paths` is empty")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ckpts = [load_checkpoint(p) for p in paths]
    groups: dict[tuple, list[int]] = {}  # one random baseline and one data pass per group
    for i, ckpt in enumerate(ckpts):
        a = ckpt["args"]
        key = (a["dataset"], a["data_root"], a["image_size"], a["arch"], a["low_dim"], a["seed"])
        groups.setdefault(key, []).append(i)
    rows, random_row = {}, {}
    for members in groups.values():
        first = ckpts[members[0]]["args"]
        dataset, seed = first["dataset"], first["seed"]
        _, train_eval, test, info = build_datasets(dataset, first["data_root"],
                                                   image_size=first["image_size"])
        loaders = [DataLoader(ds, batch_size=batch_size) for ds in (train_eval, test)]
        suffix = f" ({dataset}, {info.image_size} px)" if len(groups) > 1 else ""
        encoders = {"random init" + suffix: initial_encoder(first, info)}
        for i in members:
            args = ckpts[i]["args"]
            method = "SimCLR" if args.get("method") == "simclr" else \
                "PCL" if args["num_cluster"] else "MoCo"  # runs before --method: no key
            name = f"{method}, epoch {ckpts[i]['epoch']}"
            if len(paths) > 1:
                name += f" ({paths[i].parent.name or paths[i].name})"
            encoder = initial_encoder(args, info)
            encoder.load_state_dict(ckpts[i]["model_q"])
            encoders[name] = encoder
        results = {}
        for name, encoder in encoders.items():
            encoder.to(device).eval()
            results[name] = evaluate_encoder(encoder.features, *loaders, info.num_classes,
                                             device, seed=seed, progress=progress)
        baseline = next(iter(results))
        for i, name in zip(members, list(results)[1:]):
            tmp = paths[i].with_name("eval.json.tmp")
            tmp.write_text(json.dumps({"checkpoint": str(paths[i]), "dataset": dataset,
                                       "results": {name: results[name],
                                                   baseline: results[baseline]}}, indent=2))
            os.replace(tmp, paths[i].with_name("eval.json"))
        rows.update(list(results.items())[1:])
        random_row[baseline] = results[baseline]
    rows.update(random_row)  # trained encoders first, then the baselines
    print(format_table(rows), flush=True)
    return rows


def main(argv: Optional[list[str]] = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="kNN, linear probe and AMI/NMI of "
                                     "pcl_ext.train checkpoints against a random encoder")
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="one or more checkpoint.pt files (e.g. a PCL run and its MoCo "
                             "ablation: one table, one shared random baseline)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args(argv)
    try:
        evaluate_checkpoint(args.checkpoints, args.device, batch_size=args.batch_size,
                            progress=args.progress)
    except pickle.UnpicklingError as exc:  # a refused CHECKPOINT: its message, no traceback
        sys.exit(f"pcl_ext.evaluate: {exc}")


if __name__ == "__main__":
    main()
