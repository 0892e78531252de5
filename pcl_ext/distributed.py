"""A differentiable all-gather: every rank's keys as columns of each rank's loss, with the
gradients of those columns flowing back to the rank that owns them (SimCLR's and MoCo v3's
multi-GPU practice)."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_with_grad", "rank_and_world"]


def rank_and_world() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        rank, world = rank_and_world()
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format)
                 for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.world = rank, world
        return torch.cat(parts)                                   # (world * n) x D

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Each rank's loss put gradients on every rank's rows: the owner's gradient is their
        # sum over the ranks. A reduce-scatter would move half the bytes, but gloo has none;
        # the keys' gradient is small beside the parameters' all-reduce, so one path for all.
        n = grad.shape[0] // ctx.world
        total = grad.clone(memory_format=torch.contiguous_format)  # never reduce it in place
        dist.all_reduce(total)
        return total[ctx.rank * n:(ctx.rank + 1) * n]


def all_gather_with_grad(x: Tensor) -> Tensor:
    """``torch.cat`` of ``x`` from every rank in rank order, ``[world * n, ...]``; ``x``
    itself without a process group or with one process.

    Differentiable: the gradient of rank ``r``'s rows is summed over the ranks and returned
    to rank ``r``. With DDP averaging the parameters' gradients, each rank's loss being the
    mean over its own rows, the gradients equal a single process's on the concatenated batch.
    Every rank must pass the same shape (a ``DataLoader`` with ``drop_last=True``). Any
    backend (gloo, NCCL): the backward all-reduces the gathered gradient.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    return _AllGather.apply(x)
