"""ProtoNCELoss: PCL's training loss as an nn.Module on top of the fused op."""
from __future__ import annotations

import weakref
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cluster import ClusterResult
from .ops import _tracing, proto_nce_with_accuracy, sample_negatives


def _move(t: Tensor, device: torch.device) -> Tensor:
    """``t`` on ``device``. A copy to the CPU blocks (its result is read at once); one to a GPU
    does not, and its source is pinned first: from pageable memory the driver would
    synchronize the stream before copying."""
    if device.type == "cpu":
        return t.to(device)
    if device.type == "cuda" and t.device.type == "cpu":
        t = t.pin_memory()  # a no-op for a DataLoader(pin_memory=True) batch
    return t.to(device, non_blocking=True)


def _first_of_cluster(assignments: Tensor) -> Tensor:
    """[N] bool: no earlier row is assigned to the same cluster."""
    same = assignments[:, None] == assignments[None, :]  # N x N
    return ~same.tril(diagonal=-1).any(dim=1)

__all__ = ["ProtoNCELoss", "alignment", "uniformity", "prototype_features",
           "prototype_alignment", "prototype_uniformity", "prototype_correlation"]


def _cluster_lists(cluster_result: Any) -> tuple[Sequence[Tensor], Sequence[Tensor],
                                                 Sequence[Tensor]]:
    """PCL's cluster_result dict, or any object with the same three attributes."""
    try:
        return (cluster_result["im2cluster"], cluster_result["centroids"],
                cluster_result["density"])
    except (TypeError, KeyError):
        pass
    try:
        return cluster_result.im2cluster, cluster_result.centroids, cluster_result.density
    except AttributeError:
        raise TypeError("ProtoNCELoss: `cluster_result` must be PCL's dict or a ClusterResult "
                        "with im2cluster, centroids and density lists") from None


def _finite(name: str, value: float, *, zero_ok: bool, owner: str = "ProtoNCELoss") -> float:
    """A finite ``value`` that is >= 0 (``zero_ok``) or > 0, as a float; errors name
    ``owner`` and the argument ``name``."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: `{name}` must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero_ok):
        raise ValueError(f"{owner}: `{name}` must be finite and "
                         f"{'>= 0' if zero_ok else '> 0'}, got {value}")
    return value


class ProtoNCELoss(nn.Module):
    """PCL's loss: MoCo's InfoNCE plus ProtoNCE averaged over the clusterings, fused.

    Args:
        temperature: T of the instance term (PCL: 0.2).
        num_negatives: r prototypes sampled per clustering among those that are no row's
            positive (PCL: 16384, its ``--pcl-r``); ``None`` uses every prototype.
        generator: a ``torch.Generator`` for the negative sampling (reproducible runs).

    ``forward(q, k, queue, cluster_result=None, index=None)``: ``q, k`` [N, D]; ``queue``
    [Q, D] (a tensor or a :class:`pcl_ext.RingQueue`); ``cluster_result`` PCL's dict (or a
    ``ClusterResult``) whose ``im2cluster`` lists are indexed by dataset id, and ``index`` the
    batch's dataset ids. Without ``cluster_result`` this is MoCo's InfoNCE (PCL's warm-up).
    After each call ``acc_inst``, ``acc_proto`` and ``acc_proto_ties`` hold top-1 accuracies
    (percent, 0-dim tensors on the device, no host synchronization), the prototype ones the
    mean over clusterings and NaN without clusters. ``acc_inst`` and ``acc_proto`` are exactly
    what PCL's trainer logs (Acc@Inst, Acc@Proto): ``topk`` of the logits, which takes the
    first of tied columns. In sampled mode a cluster that is the positive of several rows
    fills several identical columns, and PCL counts only the row whose target is the first of
    them; ``acc_proto_ties`` counts every row whose target logit is tied for the largest, so
    it is higher where a batch has duplicate positives. With all prototypes they differ only
    where distinct prototypes tie up to rounding.

    A training step does not synchronize the host. The clustering is checked
    (:meth:`pcl_ext.ClusterResult.validate`: ids in range, ``phi`` positive and finite) the
    first time the loss sees its tensors, and again only once they are replaced or changed in
    place (autograd's version counter; a write through ``.data`` or NumPy escapes it: call
    ``validate()`` then); sampled negatives are valid by construction. ``index`` moves
    without a blocking copy (pinned first unless it is, e.g. by ``DataLoader(pin_memory=True)``);
    keep ``im2cluster`` on the device, where :func:`pcl_ext.cluster` returns it. On CUDA a
    ``num_negatives`` above ``K - N`` costs one synchronization per step to count the free
    clusters (see :func:`pcl_ext.sample_negatives`).

    PAUC's regularizers (Mo, Sun and Li, BMVC 2022), opt-in: with clusters the loss becomes

    ``L + align_weight * l_align + uniform_weight * l_unif + corr_weight * l_corr``

    with the terms of :func:`prototype_alignment`, :func:`prototype_uniformity` and
    :func:`prototype_correlation`. Only PAUC's abstract is public: these formulas are this
    package's reading of it, built on Wang and Isola's alignment and uniformity (ICML 2020),
    not the authors' code. With every weight 0 (the default) the loss is PCL's, bit for bit;
    during the warm-up (no clusters) the terms are off. No host synchronization.

    Keyword args:
        align_weight, uniform_weight, corr_weight: the terms' weights (>= 0; default 0).
        align_alpha: alpha of the alignment (Wang and Isola: 2).
        uniform_t: t of the uniformity (Wang and Isola: 2).
    """

    def __init__(self, temperature: float = 0.2, num_negatives: Optional[int] = 16384,
                 generator: Optional[torch.Generator] = None, *, align_weight: float = 0.0,
                 uniform_weight: float = 0.0, corr_weight: float = 0.0,
                 align_alpha: float = 2.0, uniform_t: float = 2.0) -> None:
        super().__init__()
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"ProtoNCELoss: `num_negatives` must be >= 0 or None, "
                             f"got {num_negatives}")
        self.align_weight = _finite("align_weight", align_weight, zero_ok=True)
        self.uniform_weight = _finite("uniform_weight", uniform_weight, zero_ok=True)
        self.corr_weight = _finite("corr_weight", corr_weight, zero_ok=True)
        self.align_alpha = _finite("align_alpha", align_alpha, zero_ok=False)
        self.uniform_t = _finite("uniform_t", uniform_t, zero_ok=False)
        self.temperature = temperature
        self.num_negatives = num_negatives
        self.generator = generator
        self.acc_inst: Optional[Tensor] = None
        self.acc_proto: Optional[Tensor] = None
        self.acc_proto_ties: Optional[Tensor] = None
        self._checked: list[tuple[weakref.ref, int]] = []  # the last clustering validated

    def forward(self, q: Tensor, k: Tensor, queue: Any, cluster_result: Any = None,
                index: Optional[Tensor] = None) -> Tensor:
        queue = getattr(queue, "buffer", queue)
        assignments, prototypes, phi, negatives = [], [], [], None
        if cluster_result is not None:
            if index is None:
                raise ValueError("ProtoNCELoss: `index` (the batch's dataset ids) is required "
                                 "with `cluster_result`")
            im2cluster, prototypes, phi = _cluster_lists(cluster_result)
            if not _tracing():
                self._check_once(im2cluster, prototypes, phi)
            assignments = [_move(a[_move(index, a.device)], q.device) for a in im2cluster]
            if self.num_negatives is not None:
                negatives = [sample_negatives(a, c.shape[0], self.num_negatives, self.generator)
                             for a, c in zip(assignments, prototypes)]
        # The clustering is checked above and sampled negatives are valid by construction:
        # the op's own value checks would cost a host synchronization per step on CUDA.
        loss, correct = proto_nce_with_accuracy(q, k, queue, prototypes, phi, assignments,
                                                negatives, temperature=self.temperature,
                                                check_values=False)
        accuracy = correct.float().mean(dim=1) * 100  # [1 + M]: instance, then each clustering
        self.acc_inst = accuracy[0]
        nan = accuracy.new_full((), float("nan"))
        self.acc_proto_ties = accuracy[1:].mean() if len(prototypes) else nan
        pcl_correct = correct[1:]  # M x N
        if negatives is not None and len(prototypes):
            # Row i's target is column i; an earlier row with the same cluster holds an
            # identical column, which PCL's topk picks first. Negatives are never positives.
            pcl_correct = pcl_correct & torch.stack([_first_of_cluster(a) for a in assignments])
        self.acc_proto = pcl_correct.float().mean() * 100 if len(prototypes) else nan
        if len(prototypes) and (self.align_weight or self.uniform_weight or self.corr_weight):
            loss = loss + self.regularizer(q, prototypes, assignments)
        return loss

    def _check_once(self, im2cluster, prototypes, phi) -> None:
        """``ClusterResult.validate`` (one host synchronization) the first time these tensors,
        in this state, are seen: a new clustering, or one changed in place (autograd's version
        counter moved)."""
        tensors = [*im2cluster, *prototypes, *phi]
        if len(tensors) == len(self._checked) and all(
                ref() is t and version == t._version
                for (ref, version), t in zip(self._checked, tensors)):
            return
        ClusterResult(list(im2cluster), list(prototypes), list(phi)).validate()
        # Weak references: the loss must not keep an old clustering alive.
        self._checked = [(weakref.ref(t), t._version) for t in tensors]

    def __getstate__(self) -> dict:
        # Weak references do not pickle; a copy checks the first clustering it sees.
        return {**self.__dict__, "_checked": []}

    def regularizer(self, q: Tensor, prototypes: Sequence[Tensor],
                    assignments: Sequence[Tensor]) -> Tensor:
        """The weighted PAUC terms of a batch (those with a non-zero weight only)."""
        terms = []
        if self.align_weight:
            terms.append(self.align_weight * prototype_alignment(q, prototypes, assignments,
                                                                 self.align_alpha))
        if self.uniform_weight:
            terms.append(self.uniform_weight * prototype_uniformity(q, assignments,
                                                                    self.uniform_t))
        if self.corr_weight:
            terms.append(self.corr_weight * prototype_correlation(q, assignments))
        return torch.stack(terms).sum()

    def extra_repr(self) -> str:
        extra = "".join(f", {name}={getattr(self, name)}" for name in (
            "align_weight", "uniform_weight", "corr_weight") if getattr(self, name))
        return f"temperature={self.temperature}, num_negatives={self.num_negatives}{extra}"


# ------------------------------------------------------------------ PAUC's regularizers
# Everything below is tensor algebra on fixed shapes ([N, N] same-cluster masks instead of
# boolean indexing): no host synchronization, so a training step never waits for the device.

def alignment(x: Tensor, y: Tensor, alpha: float = 2.0) -> Tensor:
    r"""Wang and Isola's alignment of positive pairs, :math:`\frac1N\sum_i \|x_i - y_i\|_2^\alpha`
    (``x, y`` ``[N, D]``); 0 for perfectly aligned pairs, 4 at most for unit vectors and
    :math:`\alpha = 2`."""
    return (x - y).norm(dim=1).pow(alpha).mean()


def uniformity(x: Tensor, t: float = 2.0, pair_weights: Optional[Tensor] = None) -> Tensor:
    r"""Wang and Isola's uniformity, :math:`\log \frac{\sum_{ij} w_{ij} e^{-t\|x_i - x_j\|^2}}
    {\sum_{ij} w_{ij}}` over the rows of ``x`` ``[N, D]``.

    ``pair_weights`` ``[N, N]`` (default: 1 off the diagonal, i.e. the mean over all pairs of
    distinct rows, their ``torch.pdist`` form). Lower is more uniform: about :math:`-2t` for
    unit vectors spread over a high-dimensional sphere, 0 when all rows coincide. 0 when no
    pair has weight.
    """
    n = x.shape[0]
    if pair_weights is None:
        pair_weights = 1 - torch.eye(n, dtype=x.dtype, device=x.device)
    sq_norm = x.square().sum(1)
    sq_dist = (sq_norm[:, None] + sq_norm[None, :] - 2 * x @ x.t()).clamp_min(0)   # N x N
    total = (pair_weights * torch.exp(-t * sq_dist)).sum()
    weight = pair_weights.sum()
    none = (weight == 0).to(x.dtype)  # no pair: log(1) - log(1) = 0 without a branch
    return torch.log(total + none) - torch.log(weight + none)


def prototype_features(q: Tensor, assignments: Tensor) -> tuple[Tensor, Tensor]:
    r"""The batch's prototype-level features at one granularity: row ``i`` gets
    :math:`u_i = \operatorname{normalize}\big(\frac{1}{n_i}\sum_{j: a_j = a_i} q_j\big)`,
    the L2-normalized mean of the batch's embeddings in its cluster (``n_i`` of them), and the
    weight :math:`w_i = 1/n_i`, so that each cluster present in the batch counts once.

    Unlike the E-step's prototypes (constants during an epoch), these carry gradients to
    ``q``. Returns ``u`` ``[N, D]`` and ``w`` ``[N]``.
    """
    same = (assignments[:, None] == assignments[None, :]).to(q.dtype)           # N x N
    count = same.sum(1)                                                          # N, >= 1
    return F.normalize(same @ q / count[:, None], dim=1), 1 / count


def prototype_alignment(q: Tensor, prototypes: Sequence[Tensor], assignments: Sequence[Tensor],
                        alpha: float = 2.0) -> Tensor:
    r"""PAUC's alignment as read here: each embedding against its positive prototype,
    :math:`\ell_{align} = \frac1M\sum_m \frac1N\sum_i \|q_i - C^m_{a^m_i}\|_2^\alpha`
    (Wang and Isola's alignment with the prototype as the positive). ``q`` ``[N, D]``,
    ``prototypes`` ``M`` tensors ``[K_m, D]``, ``assignments`` ``M`` int64 ``[N]``."""
    return torch.stack([alignment(q, c.to(q.dtype)[a], alpha)
                        for c, a in zip(prototypes, assignments)]).mean()


def prototype_uniformity(q: Tensor, assignments: Sequence[Tensor], t: float = 2.0) -> Tensor:
    r"""PAUC's uniformity as read here: Wang and Isola's uniformity of the batch's
    prototype-level features (:func:`prototype_features`), over pairs of distinct clusters,

    .. math:: \ell_{unif} = \frac1M\sum_m \log \operatorname*{mean}_{c \ne c'}
              e^{-t\|u_c - u_{c'}\|^2}

    where :math:`c, c'` range over the clusters present in the batch (0 if only one is).
    Spreads the clusters apart without pushing a cluster's own members away from each
    other."""
    terms = []
    for a in assignments:
        u, w = prototype_features(q, a)
        other = (a[:, None] != a[None, :]).to(q.dtype)
        terms.append(uniformity(u, t, w[:, None] * w[None, :] * other))
    return torch.stack(terms).mean()


def prototype_correlation(q: Tensor, assignments: Sequence[Tensor], eps: float = 1e-5) -> Tensor:
    r"""PAUC's correlation term as read here: decorrelation of the dimensions of the batch's
    prototype-level features. With :math:`R` the ``D x D`` correlation matrix of the features
    :math:`u_c` of the ``P`` clusters present in the batch (each weighted once),
    :math:`R_{ab} = \Sigma_{ab} / \sqrt{(\Sigma_{aa} + \epsilon)(\Sigma_{bb} + \epsilon)}`,

    .. math:: \ell_{corr} = \frac1M\sum_m \frac{1}{D(D-1)}\sum_{a \ne b} R_{ab}^2

    in [0, 1): 0 when the dimensions carry unrelated information, so that prototypes differ
    along many directions instead of a few (a Barlow Twins-like redundancy penalty)."""
    terms = []
    d = q.shape[1]
    for a in assignments:
        u, w = prototype_features(q, a)
        w = w / w.sum()                                       # each cluster 1 / P
        z = u - w @ u                                         # N x D, centred
        cov = (z * w[:, None]).t() @ z                        # D x D
        scale = (cov.diagonal() + eps).rsqrt()
        corr = cov * scale[:, None] * scale[None, :]
        off = corr.square().sum() - corr.diagonal().square().sum()
        terms.append(off / max(d * (d - 1), 1))
    return torch.stack(terms).mean()
