"""ProtoNCELoss: PCL's training loss as an nn.Module on top of the fused op."""
from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence

import torch
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
    """

    def __init__(self, temperature: float = 0.2, num_negatives: Optional[int] = 16384,
                 generator: Optional[torch.Generator] = None) -> None:
        super().__init__()
        if num_negatives is not None and num_negatives < 0:
            raise ValueError(f"ProtoNCELoss: `num_negatives` must be >= 0 or None, "
                             f"got {num_negatives}")
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

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, num_negatives={self.num_negatives}"
