"""The pure-PyTorch ProtoNCE: PCL's original semantics, short and obviously right.

This is the test oracle and the benchmark baseline. It materializes every logit matrix,
exactly as PCL's ``pcl/builder.py`` and ``main_pcl.py`` do (minus their host-side sampling:
sampled-mode negatives are passed in). It knows nothing of the kernels.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def proto_nce(q: Tensor, k: Tensor, queue: Tensor, prototypes: Sequence[Tensor],
              phi: Sequence[Tensor], assignments: Sequence[Tensor],
              negatives: Optional[Sequence[Tensor]] = None, *,
              temperature: float = 0.2) -> Tensor:
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
