"""The contrastive losses PCL grew out of, on the fused InfoNCE op: SimCLR's NT-Xent, MoCo v3's
and CLIP's symmetric InfoNCE, and CPC's InfoNCE over the patches of a batch.

Each is a cross-entropy over ``N x K`` similarities that :func:`pcl_ext.info_nce` streams
without materializing them, with gradients to both the rows and the columns. With
``gather=True`` under ``torch.distributed`` the columns are every rank's keys
(:func:`pcl_ext.distributed.all_gather_with_grad`), so each row meets the global batch's
negatives, and the gradients are those of one process on the concatenated batch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .distributed import all_gather_with_grad, rank_and_world
from .loss import _finite
from .ops import info_nce, info_nce_with_accuracy

__all__ = ["NTXentLoss", "SymmetricInfoNCELoss", "cpc_info_nce"]


def _pair(owner: str, names: tuple[str, str], a: Tensor, b: Tensor) -> None:
    """ValueError naming the arguments unless ``a`` and ``b`` are ``[N, D]`` of one shape."""
    for name, t in zip(names, (a, b)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: `{name}` must be a tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ValueError(f"{owner}: `{name}` must be 2-D [N, D], got shape {tuple(t.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{owner}: `{names[0]}` and `{names[1]}` must have the same shape, "
                         f"got {tuple(a.shape)} and {tuple(b.shape)}")


def _columns(keys: Tensor, gather: bool) -> tuple[Tensor, int]:
    """The loss's columns: ``keys``, or every rank's (in rank order) with ``gather``; and the
    column of this rank's first row."""
    if not gather:
        return keys, 0
    rank, _ = rank_and_world()
    return all_gather_with_grad(keys), rank * keys.shape[0]


class NTXentLoss(nn.Module):
    r"""SimCLR's NT-Xent (Chen et al., ICML 2020) on two views of a batch.

    With :math:`z = [z^1; z^2] \in \mathbb R^{2N\times D}` (rows L2-normalized if
    ``normalize``) and :math:`p(i) = i \pm N` the other view of row :math:`i`:

    .. math:: L = \frac1{2N}\sum_{i=1}^{2N} -\log
              \frac{\exp(z_i\cdot z_{p(i)}/T)}{\sum_{j\ne i}\exp(z_i\cdot z_j/T)}

    every row against the other ``2N - 1`` rows: its positive and ``2N - 2`` negatives, one
    :func:`pcl_ext.info_nce` call (``exclude_self=True``) with gradients through both views.

    Args:
        temperature: ``T`` (SimCLR: 0.5 at batch 256, 0.1 at batch 4096 with LARS).
        normalize: L2-normalize ``z1``, ``z2`` first (SimCLR's cosine similarity).
        gather: under ``torch.distributed``, every rank's ``2N`` rows are columns of each
            rank's loss (SimCLR's global negatives: ``2 N W - 2`` per row); equal to one process
            on the concatenated batch, gradients included (:mod:`pcl_ext.distributed`).

    ``forward(z1, z2)``: ``[N, D]`` embeddings of the two views; returns the scalar ``L``.
    After each call ``acc_inst`` holds the top-1 accuracy (percent, a 0-dim tensor, no host
    synchronization) of the rows' positives among the same columns, from the same pass (a
    positive tied for the largest logit counts as found).
    """

    def __init__(self, temperature: float = 0.5, normalize: bool = True,
                 gather: bool = False) -> None:
        super().__init__()
        self.temperature = _finite("temperature", temperature, zero_ok=False, owner="NTXentLoss")
        self.normalize, self.gather = normalize, gather
        self.acc_inst: Optional[Tensor] = None

    def forward(self, z1: Tensor, z2: Tensor) -> Tensor:
        _pair("NTXentLoss", ("z1", "z2"), z1, z2)
        n = z1.shape[0]
        z = torch.cat([z1, z2])                                             # 2N x D
        if self.normalize:
            z = F.normalize(z, dim=1)
        keys, offset = _columns(z, self.gather)                             # 2NW x D
        # This rank's rows first: column i is row i itself (exclude_self), the order of the
        # columns does not change the loss.
        keys = torch.cat([keys[offset:], keys[:offset]]) if offset else keys
        targets = torch.arange(2 * n, device=z.device).roll(n)             # i <-> i + N
        loss, correct = info_nce_with_accuracy(  # valid targets: no check (a sync on CUDA)
            z, keys, targets, temperature=self.temperature, exclude_self=True,
            check_values=False)
        self.acc_inst = correct.float().mean() * 100
        return loss

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature}, normalize={self.normalize}, "
                f"gather={self.gather}")


class SymmetricInfoNCELoss(nn.Module):
    r"""InfoNCE in both directions between two batches of paired embeddings: CLIP's loss
    (Radford et al., 2021) and MoCo v3's (Chen, Xie and He, ICCV 2021).

    With rows :math:`a_i, b_i` (L2-normalized if ``normalize``), columns :math:`a'_j, b'_j`
    (``keys_a``, ``keys_b``; by default :math:`a, b` themselves) and
    :math:`\ell(x, y) = \frac1N\sum_i -\log\frac{\exp(x_i\cdot y_i/T)}{\sum_j\exp(x_i\cdot y_j/T)}`:

    .. math:: L = \tfrac12\,\big(\ell(a, b') + \ell(b, a')\big),\quad
              \text{times } 2T \text{ with scale\_by\_2t}

    * CLIP: ``forward(image_emb, text_emb)``, ``learnable_temperature=True``: the parameter
      ``logit_scale`` is :math:`\log(1/T)` (initialized from ``temperature``; CLIP: 0.07) and
      the scale :math:`1/T` is clamped at ``max_logit_scale`` (CLIP: 100; its gradient is 0
      there). The scale multiplies the rows before the fused op (``info_nce(a / T, b',
      temperature=1)``), so autograd gets :math:`\partial L/\partial\log(1/T)` exactly from
      the op's row gradients, without ``N x N`` logits.
    * MoCo v3: ``forward(q1, q2, keys_a=k1, keys_b=k2)`` with ``q`` the base encoder's
      predictions and ``k`` the momentum encoder's keys of views 1 and 2 (no gradient), and
      ``scale_by_2t=True``. MoCo v3 sums the two directions: its loss is twice this one (the
      same gradients up to that factor, which scale-invariant optimizers such as LARS and
      AdamW do not see).

    Args:
        temperature: ``T`` (MoCo v3: 0.2 for ViT, 1.0 for ResNet-50; CLIP: 0.07 initially).
        learnable_temperature: learn ``log(1/T)`` (CLIP).
        max_logit_scale: the largest ``1/T`` when learnable (CLIP: 100).
        normalize: L2-normalize rows and columns first.
        scale_by_2t: multiply by ``2T`` (MoCo v3's ``ctr``; not with a learnable ``T``).
        gather: under ``torch.distributed``, the columns are every rank's (targets offset by
            rank x local batch): one process's loss on the concatenated batch. A learnable
            ``logit_scale`` is then a replicated parameter: put the loss inside the module DDP
            wraps, or all-reduce its gradient as DDP does the others'.
    """

    def __init__(self, temperature: float = 0.2, learnable_temperature: bool = False,
                 max_logit_scale: float = 100.0, normalize: bool = True,
                 scale_by_2t: bool = False, gather: bool = False) -> None:
        super().__init__()
        owner = "SymmetricInfoNCELoss"
        temperature = _finite("temperature", temperature, zero_ok=False, owner=owner)
        self.max_logit_scale = _finite("max_logit_scale", max_logit_scale, zero_ok=False,
                                       owner=owner)
        if learnable_temperature and scale_by_2t:
            raise ValueError(f"{owner}: `scale_by_2t` (MoCo v3) needs a fixed temperature, "
                             "not `learnable_temperature`")
        self.logit_scale = (nn.Parameter(torch.tensor(math.log(1 / temperature)))
                            if learnable_temperature else None)
        self._temperature = temperature
        self.normalize, self.scale_by_2t, self.gather = normalize, scale_by_2t, gather

    @property
    def temperature(self) -> float:
        """``T``: the fixed one, or ``1 / min(exp(logit_scale), max_logit_scale)``."""
        if self.logit_scale is None:
            return self._temperature
        return 1.0 / min(math.exp(self.logit_scale.item()), self.max_logit_scale)

    def forward(self, a: Tensor, b: Tensor, keys_a: Optional[Tensor] = None,
                keys_b: Optional[Tensor] = None) -> Tensor:
        owner = "SymmetricInfoNCELoss"
        _pair(owner, ("a", "b"), a, b)
        keys_a = a if keys_a is None else keys_a
        keys_b = b if keys_b is None else keys_b
        _pair(owner, ("a", "keys_a"), a, keys_a)
        _pair(owner, ("b", "keys_b"), b, keys_b)
        if self.normalize:
            own_a, own_b = keys_a is a, keys_b is b
            a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
            keys_a = a if own_a else F.normalize(keys_a, dim=1)
            keys_b = b if own_b else F.normalize(keys_b, dim=1)
        t = self._temperature
        if self.logit_scale is not None:
            scale = self.logit_scale.exp().clamp(max=self.max_logit_scale)
            a, b, t = a * scale, b * scale, 1.0
        cols_b, offset = _columns(keys_b, self.gather)                      # NW x D
        cols_a, _ = _columns(keys_a, self.gather)
        targets = torch.arange(offset, offset + a.shape[0], device=a.device)
        # targets valid by construction: no value check (a host sync on CUDA)
        loss = (info_nce(a, cols_b, targets, temperature=t, check_values=False)
                + info_nce(b, cols_a, targets, temperature=t, check_values=False)) / 2
        return loss * (2 * self._temperature) if self.scale_by_2t else loss

    def extra_repr(self) -> str:
        kind = "learnable" if self.logit_scale is not None else "fixed"
        return (f"temperature={self.temperature:.4g} ({kind}), normalize={self.normalize}, "
                f"scale_by_2t={self.scale_by_2t}, gather={self.gather}")


def cpc_info_nce(predictions: Tensor, embeddings: Tensor, *, temperature: float = 1.0,
                 gather: bool = False) -> Tensor:
    r"""CPC's InfoNCE over every patch of the batch (van den Oord et al., 2018; Hénaff et al.,
    2020): each prediction against all patch embeddings, its own patch the positive.

    ``predictions`` and ``embeddings`` are ``[B, P, D]``: :math:`\hat z_{b,p}` is the
    context network's prediction of patch (or time step) :math:`p` of sample :math:`b`,
    :math:`z_{b,p}` that patch's encoding. With the :math:`BP` pairs flattened to rows
    :math:`i`:

    .. math:: L = \frac1{BP}\sum_i -\log\frac{\exp(\hat z_i\cdot z_i/T)}
              {\sum_{j=1}^{BP}\exp(\hat z_i\cdot z_j/T)}

    the ``BP - 1`` other patches of the batch (other positions of the same sample included)
    are the negatives. CPC scores raw dot products: ``T = 1``, no normalization. Select the
    rows to predict (one offset ``k``, the valid positions) before the call: any ``[B, P, D]``
    pair works. ``gather``: the columns are every rank's patches, as in the modules above.
    """
    owner = "cpc_info_nce"
    for name, t in (("predictions", predictions), ("embeddings", embeddings)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{owner}: `{name}` must be a 3-D tensor [B, P, D], got "
                             f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    if predictions.shape != embeddings.shape:
        raise ValueError(f"{owner}: `predictions` and `embeddings` must have the same shape, "
                         f"got {tuple(predictions.shape)} and {tuple(embeddings.shape)}")
    temperature = _finite("temperature", temperature, zero_ok=False, owner=owner)
    rows = predictions.flatten(0, 1)                                        # BP x D
    cols, offset = _columns(embeddings.flatten(0, 1), gather)               # BPW x D
    targets = torch.arange(offset, offset + rows.shape[0], device=rows.device)
    return info_nce(rows, cols, targets, temperature=temperature, check_values=False)
