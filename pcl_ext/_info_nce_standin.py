"""TEMPORARY eager stand-in for ``pcl_ext.ops.info_nce`` (branch ``nce``), same signature.
Delete this file and import the fused op in contrastive.py once ``nce`` is merged."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def info_nce(queries: Tensor, keys: Tensor, targets: Optional[Tensor] = None, *,
             temperature: float, exclude_self: bool = False, reduction: str = "mean",
             check_values: bool = True) -> Tensor:
    n = queries.shape[0]
    if targets is None:
        targets = torch.arange(n, device=queries.device)
    logits = queries @ keys.t() / temperature                 # N x K
    if exclude_self:
        eye = torch.zeros_like(logits, dtype=torch.bool)
        eye[:, :n].fill_diagonal_(True)
        logits = logits.masked_fill(eye, float("-inf"))
    return F.cross_entropy(logits, targets, reduction=reduction)
