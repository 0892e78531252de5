"""PCL's and MoCo's original code (and the InfoNCE of SimCLR, MoCo v3, CLIP), short and
obviously right: the test oracle and the benchmark baseline.

Each function transcribes the original as literally as it runs today (salesforce/PCL
``pcl/builder.py`` and ``main_pcl.py``, facebookresearch/moco ``moco/builder.py``), slow
parts included: ProtoNCE materializes every logit matrix, the concentration is PCL's Python
loop, the negatives come from a host-side set difference. It knows nothing of the kernels.
"""
from __future__ import annotations

import random
from collections.abc import Iterable
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def proto_nce(q: Tensor, k: Tensor, queue: Tensor, prototypes: Sequence[Tensor],
              phi: Sequence[Tensor], assignments: Sequence[Tensor],
              negatives: Optional[Sequence[Tensor]] = None, *,
              temperature: float = 0.2) -> Tensor:
    """PCL's loss (pcl/builder.py, main_pcl.py): MoCo's InfoNCE over the key and the queue,
    plus the mean over the clusterings of the prototype cross-entropy, each prototype's logit
    divided by its concentration ``phi``. ``negatives=None`` scores all prototypes; otherwise
    row ``i`` scores the batch's own prototypes and the given negatives (PCL's sampled mode,
    drawn by ``pcl_sample_negatives``), its positive in column ``i``."""
    n = q.shape[0]
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(1)       # Nx1
    l_neg = q @ queue.t()                                     # NxQ
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature   # Nx(1+Q)
    target = torch.zeros(n, dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target)
    if len(prototypes) == 0:
        return loss
    proto_loss = 0.0
    for m, (c, p, a) in enumerate(zip(prototypes, phi, assignments)):
        if negatives is None:
            logits = (q @ c.t()) / p.to(q.dtype)               # NxK
            target = a
        else:
            ids = torch.cat([a, negatives[m]])                 # N+r: row i's positive is column i
            logits = (q @ c[ids].t()) / p.to(q.dtype)[ids]     # Nx(N+r)
            target = torch.arange(n, device=q.device)
        proto_loss = proto_loss + F.cross_entropy(logits, target)
    return loss + proto_loss / len(prototypes)


def info_nce(queries: Tensor, keys: Tensor, targets: Optional[Tensor] = None,
             temperature: float = 0.1, exclude_self: bool = False,
             reduction: str = "mean") -> Tensor:
    """InfoNCE as SimCLR, MoCo v3 and CLIP write it: every logit, the self column masked,
    one cross-entropy. ``targets=None``: key ``i`` is row ``i``'s positive."""
    n = queries.shape[0]
    if targets is None:
        targets = torch.arange(n, device=queries.device)
    logits = queries @ keys.t() / temperature                 # NxK
    if exclude_self:
        self_mask = torch.eye(n, keys.shape[0], dtype=torch.bool, device=queries.device)
        logits = logits.masked_fill(self_mask, -torch.inf)
    return F.cross_entropy(logits, targets, reduction=reduction)


def pcl_concentration(sq_dist: np.ndarray, im2cluster: np.ndarray, k: int,
                      temperature: float = 0.2, alpha: float = 10.0,
                      method: str = "linear") -> np.ndarray:
    """PCL's concentration phi: ``run_kmeans`` (main_pcl.py) from ``D, I = index.search(x, 1)``
    on, loop for loop.

    ``sq_dist`` and ``im2cluster`` are faiss's ``D`` and ``I``: ``[n, 1]`` squared distances to
    the nearest centroid and its id, computed in their own dtype as PCL does. Returns float64
    ``[k]``: the mean distance over ``log(count + alpha)`` for clusters of two or more points,
    the largest such value for the others, clipped to its 10th..90th percentile and scaled to
    mean ``temperature``. PCL fixes ``alpha = 10``. ``method`` is NumPy's percentile
    interpolation; PCL uses the default, "linear".
    """
    im2cluster = [int(n[0]) for n in im2cluster]
    Dcluster = [[] for c in range(k)]
    for im, i in enumerate(im2cluster):
        Dcluster[i].append(sq_dist[im][0])
    density = np.zeros(k)
    for i, dist in enumerate(Dcluster):
        if len(dist) > 1:
            density[i] = (np.asarray(dist) ** 0.5).mean() / np.log(len(dist) + alpha)
    dmax = density.max()  # one point or none: use the max (PCL's words)
    for i, dist in enumerate(Dcluster):
        if len(dist) <= 1:
            density[i] = dmax
    density = density.clip(np.percentile(density, 10, method=method),
                           np.percentile(density, 90, method=method))
    return temperature * density / density.mean()


def free_clusters(pos_ids: Tensor, num_clusters: int) -> list[int]:
    """The clusters no row of the batch is in, in increasing order: PCL's set difference."""
    all_proto_id = [i for i in range(num_clusters)]
    neg_proto_id = set(all_proto_id) - set(pos_ids.tolist())
    return sorted(neg_proto_id)


def pcl_sample_negatives(pos_ids: Tensor, num_clusters: int, r: int,
                         rng: random.Random) -> Tensor:
    """PCL's negative prototypes (pcl/builder.py): ``r`` distinct clusters drawn uniformly, on
    the host, from those no row of the batch is in; int64 on ``pos_ids``' device.

    PCL takes ``num_clusters = im2cluster.max() + 1`` and samples the set itself, which
    ``random.sample`` refuses since Python 3.11: sampling the sorted set is the variant that
    runs."""
    neg_proto_id = rng.sample(free_clusters(pos_ids, num_clusters), r)
    return torch.LongTensor(neg_proto_id).to(pos_ids.device)


def moco_momentum_update_(key_params: Iterable[Tensor], query_params: Iterable[Tensor],
                          m: float) -> None:
    """MoCo's ``_momentum_update_key_encoder``: ``k = m k + (1 - m) q`` for each pair of
    parameters, one tensor at a time, written through ``.data`` (no autograd)."""
    for param_k, param_q in zip(key_params, query_params):
        param_k.data = param_k.data * m + param_q.data * (1. - m)


@torch.no_grad()
def moco_dequeue_and_enqueue_(queue: Tensor, ptr: int, keys: Tensor) -> int:
    """MoCo's ``_dequeue_and_enqueue`` minus ``concat_all_gather``: the keys ``[B, dim]`` replace
    columns ``ptr:ptr + B`` of ``queue``, ``[dim, K]`` as MoCo stores it. Returns the next
    pointer, which MoCo keeps in a buffer (``int(self.queue_ptr)`` reads it back)."""
    batch_size = keys.shape[0]
    assert queue.shape[1] % batch_size == 0  # for simplicity (MoCo's words): never wraps
    queue[:, ptr:ptr + batch_size] = keys.T
    return (ptr + batch_size) % queue.shape[1]


def enqueue_rows(buffer: Tensor, ptr: int, keys: Tensor) -> tuple[Tensor, int]:
    """The ring queue's contract, one key at a time as a Python list would take them: row ``j``
    of ``keys`` lands in row ``(ptr + j) % size`` of ``buffer`` ``[size, dim]``, so for more
    keys than rows the last ``size`` remain. Returns a new (buffer, ptr); ``buffer`` is kept."""
    buffer = buffer.clone()
    for row in keys:
        buffer[ptr] = row
        ptr = (ptr + 1) % buffer.shape[0]
    return buffer, ptr


# PAUC's regularizers as pcl_ext reads them (pcl_ext.loss documents the formulas): each
# cluster present in the batch is selected by boolean masks, its prototype-level feature is
# the normalized mean of its rows, and Wang and Isola's metrics are taken literally
# (``torch.pdist``), one granularity at a time.

def pauc_alignment(q: Tensor, prototypes: Sequence[Tensor], assignments: Sequence[Tensor],
                   alpha: float = 2.0) -> Tensor:
    """Mean over granularities of mean_i ||q_i - prototype of i||^alpha."""
    terms = [torch.stack([(q[i] - c[a[i]]).norm() ** alpha for i in range(len(q))]).mean()
             for c, a in zip(prototypes, assignments)]
    return sum(terms) / len(terms)


def batch_prototypes(q: Tensor, assignments: Tensor) -> Tensor:
    """One row per cluster present in the batch (increasing id): its rows' normalized mean."""
    return torch.stack([F.normalize(q[assignments == c].mean(0), dim=0)
                        for c in sorted(set(assignments.tolist()))])


def pauc_uniformity(q: Tensor, assignments: Sequence[Tensor], t: float = 2.0) -> Tensor:
    """Mean over granularities of log mean_{pairs of distinct batch clusters}
    exp(-t ||u_c - u_c'||^2); 0 for a batch in one cluster."""
    terms = []
    for a in assignments:
        u = batch_prototypes(q, a)
        terms.append(torch.pdist(u).pow(2).mul(-t).exp().mean().log() if len(u) > 1
                     else q.new_zeros(()))
    return sum(terms) / len(terms)


def pauc_correlation(q: Tensor, assignments: Sequence[Tensor], eps: float = 1e-5) -> Tensor:
    """Mean over granularities of the mean squared off-diagonal entry of the correlation
    matrix (variances + eps) of the batch clusters' features."""
    terms = []
    for a in assignments:
        u = batch_prototypes(q, a)
        z = u - u.mean(0)
        cov = z.t() @ z / len(u)
        std = (cov.diagonal() + eps).sqrt()
        corr = cov / torch.outer(std, std)
        d = corr.shape[0]
        terms.append(sum(corr[i, j] ** 2 for i in range(d) for j in range(d) if i != j)
                     / (d * (d - 1)))
    return sum(terms) / len(terms)
