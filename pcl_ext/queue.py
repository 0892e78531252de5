"""RingQueue: MoCo's queue of negative keys as a ring buffer with a device-side pointer."""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import ring_enqueue_

_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


class RingQueue(nn.Module):
    """The ``size`` most recent keys (MoCo's and PCL's negatives), kept in a ring buffer.

    Args:
        size: number of keys kept, ``>= 1`` (MoCo and PCL: 16384).
        dim: key dimension, ``>= 1`` (MoCo and PCL: 128).
        dtype: dtype of the queue: float32, float64, float16 or bfloat16. Keys must have it.
        device: where the queue and its pointer live (default: torch's default device).
        gather: all-gather the keys of every rank before enqueueing them, in rank order like
            MoCo's ``concat_all_gather``, so that every rank holds the same queue. Takes effect
            only while ``torch.distributed`` is initialized with more than one rank (a no-op
            otherwise); every rank must then enqueue the same number of keys.
        group: process group of the gather (default: the whole world).

    Buffers (both in the ``state_dict``, so a checkpoint resumes exactly):
        buffer: ``[size, dim]``, initialized like MoCo's queue: random rows of unit L2 norm.
        ptr: 0-dim int64 on the same device, the row the next key goes to.

    Ranks draw their initial rows from their own random state; seed them alike (or overwrite
    ``size`` rows) for identical queues from the first step.
    """

    def __init__(self, size: int, dim: int, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device | str] = None, *, gather: bool = True,
                 group: Optional[dist.ProcessGroup] = None) -> None:
        super().__init__()
        for name, value in (("size", size), ("dim", dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RingQueue: `{name}` must be a positive int, got {value!r}")
        if dtype not in _DTYPES:
            raise TypeError(f"RingQueue: `dtype` must be one of {_DTYPES}, got {dtype}")
        self.size, self.dim, self.gather, self.group = size, dim, gather, group
        noise = torch.randn(size, dim, device=device,
                            dtype=torch.promote_types(dtype, torch.float32))
        self.register_buffer("buffer", F.normalize(noise, dim=1).to(dtype))  # size x dim
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=noise.device))
        self.register_load_state_dict_post_hook(_check_loaded_ptr)

    def enqueue_(self, keys: Tensor, gather: Optional[bool] = None) -> None:
        """Append ``keys`` ``[B, dim]`` in place of the oldest rows, wrapping around the end.

        Row ``j`` of the (gathered) keys lands in row ``(ptr + j) mod size``, as if the rows
        were enqueued one by one: for ``B > size`` only the last ``size`` rows remain. Keys are
        used without gradient. One kernel launch; on CUDA no host synchronization (capturable
        in a CUDA graph). ``gather`` overrides the constructor's flag for this call.
        """
        if not isinstance(keys, Tensor):
            raise TypeError(f"RingQueue.enqueue_: `keys` must be a Tensor, got "
                            f"{type(keys).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"RingQueue.enqueue_: `keys` must be [B, {self.dim}], got shape "
                             f"{tuple(keys.shape)}")
        if keys.dtype != self.buffer.dtype:
            raise TypeError(f"RingQueue.enqueue_: `keys` must have the queue's dtype "
                            f"{self.buffer.dtype}, got {keys.dtype}; cast them first")
        if keys.device != self.buffer.device:
            raise ValueError(f"RingQueue.enqueue_: `keys` must be on the queue's device "
                             f"{self.buffer.device}, got {keys.device}")
        keys = keys.detach()  # cheaper than a no_grad context: the op itself records nothing
        if (self.gather if gather is None else gather) and _world_size(self.group) > 1:
            keys = _concat_all_gather(keys, self.group)
        ring_enqueue_(self.buffer, self.ptr, keys)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.buffer.dtype}, gather={self.gather}"


def _world_size(group: Optional[dist.ProcessGroup]) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def _concat_all_gather(keys: Tensor, group: Optional[dist.ProcessGroup]) -> Tensor:
    """Every rank's keys, in rank order: ``[world * B, dim]``."""
    world = dist.get_world_size(group)
    keys = keys.contiguous()
    out = keys.new_empty((world * keys.shape[0], keys.shape[1]))
    # all_gather_single is the newer name of all_gather_into_tensor (deprecated since).
    gather_into = getattr(dist, "all_gather_single", None) or getattr(
        dist, "all_gather_into_tensor", None)
    if gather_into is not None:
        gather_into(out, keys, group=group)
    else:  # older torch: one tensor per rank, gathered straight into out's row blocks
        dist.all_gather(list(out.chunk(world)), keys, group=group)
    return out


def _check_loaded_ptr(module: RingQueue, incompatible_keys) -> None:
    # The CUDA kernel cannot check the pointer without a host sync: check it once, on load.
    ptr = int(module.ptr)
    if not 0 <= ptr < module.size:
        raise ValueError(f"RingQueue.load_state_dict: `ptr` = {ptr} is outside [0, "
                         f"{module.size})")
