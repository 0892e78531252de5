"""Typed wrappers of the pcl_ext custom ops, with their fake kernels and autograd."""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["proto_nce"]


def proto_nce(q: Tensor, k: Tensor, queue: Tensor, prototypes: Sequence[Tensor] = (),
              phi: Sequence[Tensor] = (), assignments: Sequence[Tensor] = (),
              negatives: Optional[Sequence[Tensor]] = None, *, temperature: float = 0.2,
              check_values: bool = True) -> Tensor:
    r"""Fused multi-granularity ProtoNCE loss of PCL (Li et al., ICLR 2021), forward and backward.

    .. math::
        L = \frac1N\sum_i \Big[\operatorname{lse}\big(\tfrac{q_i\cdot k_i}{T},
              \tfrac{q_i\cdot \mathrm{queue}_j}{T}\big) - \tfrac{q_i\cdot k_i}{T}\Big]
          + \frac1M\sum_{m=1}^{M}\frac1N\sum_i\Big[\operatorname{lse}_j s^{m}_{ij}
              - s^{m}_{i,t_i}\Big],\qquad s^{m}_{ij} = \frac{q_i\cdot C^m_{c_j}}{\phi^m_{c_j}}

    The first term is MoCo's InfoNCE (positive key ``k_i``, ``Q`` queue negatives). For each
    of the ``M`` clusterings the columns ``c_j`` are

    * all-prototype mode (``negatives=None``): every prototype ``j = 0..K-1``, target
      ``t_i = assignments[m][i]``;
    * sampled mode: PCL's layout ``[assignments[m][0..N-1], negatives[m][0..r-1]]``, target
      ``t_i = i`` (another row's positive is a negative of row ``i``, even when it is the
      same cluster, exactly as in PCL).

    No ``N x K`` logits are materialized: the columns are streamed once and dL/dq, dL/dk are
    accumulated during the forward pass, so backward costs one scale.

    Args:
        q, k: ``[N, D]`` embeddings of two views (PCL L2-normalizes them; not required here).
            The loss is differentiable w.r.t. ``q`` and ``k`` (first order only).
        queue: ``[Q, D]`` negative keys, ``Q >= 1``.
        prototypes: ``M`` tensors ``[K_m, D]``; ``phi``: ``M`` positive concentrations ``[K_m]``;
            ``assignments``: ``M`` int64 tensors ``[N]`` (cluster of each row's sample).
        negatives: ``None`` or ``M`` int64 tensors ``[r_m]`` of cluster ids.
        temperature: ``T`` of the instance term.
        check_values: verify ``phi > 0`` finite and ids in range. On the CPU the kernel always
            does; on CUDA this costs one host synchronization and is skipped during CUDA-graph
            capture and ``torch.compile`` tracing (the kernel then yields NaN, never reads out
            of bounds).

    Dtypes: CPU float32/float64 (half precision is computed in float32); CUDA float32 (TF32
    tensor cores only when ``torch.get_float32_matmul_precision()`` allows), float16, bfloat16
    with float32 accumulation. Deterministic on both devices.
    """
    prototypes, phi, assignments = list(prototypes), list(phi), list(assignments)
    negs = [] if negatives is None else list(negatives)
    if negatives is not None and len(negs) != len(prototypes):
        raise ValueError(f"proto_nce: `negatives` must hold one tensor per clustering "
                         f"({len(prototypes)}), got {len(negs)}")
    if torch.is_grad_enabled():
        for name, ts in (("queue", [queue]), ("prototypes", prototypes), ("phi", phi)):
            if any(t.requires_grad for t in ts):
                raise ValueError(f"proto_nce: `{name}` requires grad, but the loss is "
                                 "differentiable only w.r.t. `q` and `k`; pass it detached")
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        loss = proto_nce(q.float(), k.float(), queue.float(), [c.float() for c in prototypes],
                         phi, assignments, negatives, temperature=temperature)
        return loss.to(q.dtype)
    if check_values and q.device.type != "cpu" and not _tracing():
        _check_values(prototypes, phi, assignments, negs)
    loss, _, _ = torch.ops.pcl_ext.proto_nce.default(q, k, queue, prototypes, phi, assignments,
                                                     negs, float(temperature))
    return loss


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_values(prototypes, phi, assignments, negatives) -> None:
    """Device-side value checks gathered into one host synchronization."""
    flags, names = [], []
    for m, (c, p, a) in enumerate(zip(prototypes, phi, assignments)):
        if p.shape != (c.shape[0],) or not p.is_floating_point():
            continue  # a structural error: the op's own checks name it
        flags.append(((p > 0) & torch.isfinite(p)).all())
        names.append(f"`phi[{m}]` must be positive and finite")
        for name, ids in (("assignments", a), ("negatives", negatives[m] if negatives else None)):
            if ids is None or ids.numel() == 0 or ids.dtype != torch.long:
                continue
            flags.append((ids.min() >= 0) & (ids.max() < c.shape[0]))
            names.append(f"`{name}[{m}]` holds cluster ids outside [0, {c.shape[0]})")
    if flags:
        ok = torch.stack(flags).tolist()
        bad = [n for n, good in zip(names, ok) if not good]
        if bad:
            raise ValueError("proto_nce: " + "; ".join(bad))


@torch.library.register_fake("pcl_ext::proto_nce")
def _proto_nce_fake(q, k, queue, prototypes, phi, assignments, negatives, temperature):
    return q.new_empty(()), q.new_empty(q.shape), q.new_empty(q.shape)


def _proto_nce_setup_context(ctx, inputs, output):
    _, dq, dk = output
    ctx.save_for_backward(dq, dk)
    ctx.list_lengths = [len(inputs[i]) for i in range(3, 7)]


def _proto_nce_backward(ctx, grad_loss, _grad_dq, _grad_dk):
    if torch.is_grad_enabled():
        raise RuntimeError("proto_nce: double backward (create_graph=True) is not supported; "
                           "the gradient is accumulated during the forward pass")
    dq, dk = ctx.saved_tensors
    no_grads = [[None] * n for n in ctx.list_lengths]
    return grad_loss * dq, grad_loss * dk, None, *no_grads, None


torch.library.register_autograd("pcl_ext::proto_nce", _proto_nce_backward,
                                setup_context=_proto_nce_setup_context)
