"""Typed wrappers of the pcl_ext custom ops, with their fake kernels and autograd."""
from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Optional, Sequence

import torch
from torch import Tensor

__all__ = ["proto_nce", "proto_nce_with_accuracy", "info_nce", "info_nce_with_accuracy",
           "momentum_update_", "ring_enqueue_", "concentration", "sample_negatives"]

# One section per op: the typed wrapper, its value checks, the fake kernel (and autograd).

# The kernels' dtypes. The C++ ops check dtypes too, but a kernel on the LibTorch stable ABI can
# raise only ValueError, IndexError or RuntimeError: the wrappers check first, for TypeError.
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_FLOATING_SET = frozenset(_FLOATING)
_CUDA_FLOATING = (torch.float32, torch.float16, torch.bfloat16)
_LONG = (torch.int64,)


def _check_dtype(op: str, name: str, t: Tensor, allowed: tuple[torch.dtype, ...],
                 like: Optional[str] = None) -> None:
    """TypeError naming ``name`` unless ``t.dtype`` is one of ``allowed`` (the dtype of the
    argument ``like``, if given). Non-tensors are left to the op's own checks."""
    if isinstance(t, Tensor) and t.dtype not in allowed:
        names = [str(d) for d in allowed]
        want = (f"have dtype {names[0]} like `{like}`" if like is not None else
                "be " + (names[0] if len(names) == 1 else
                         ", ".join(names[:-1]) + " or " + names[-1]))
        raise TypeError(f"{op}: `{name}` must {want}, got {t.dtype}")


# ------------------------------------------------------------------------------- proto_nce
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
    return proto_nce_with_accuracy(q, k, queue, prototypes, phi, assignments, negatives,
                                   temperature=temperature, check_values=check_values)[0]


def proto_nce_with_accuracy(q: Tensor, k: Tensor, queue: Tensor,
                            prototypes: Sequence[Tensor] = (), phi: Sequence[Tensor] = (),
                            assignments: Sequence[Tensor] = (),
                            negatives: Optional[Sequence[Tensor]] = None, *,
                            temperature: float = 0.2,
                            check_values: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`proto_nce` and, from the same pass, ``correct`` [1 + M, N] (bool): whether row
    ``i``'s target logit is its largest in the instance term (row 0) and in each clustering
    (PCL's top-1 accuracies). Ties count as correct, up to rounding, by one rule on every
    device: ``s_t >= max_{j != t} s_j - tol``, ``tol = 2 (2 u_in + (D + 2) u_acc) B``,
    ``B = s_t sum_c |q_c x_tc|`` (``s`` the scaled logits, ``x_t`` the target column): twice
    the rounding bound of one computed logit (D products and sums, then the scale), which a
    tied column such as a duplicate id in sampled mode shares. ``u_in`` is the unit roundoff
    of the GEMM inputs (2^-11 for TF32, 2^-21 for 3xTF32, else 0: exact) and ``u_acc`` that
    of the accumulators (2^-53 for float64, 2^-24 for float32, 2^-23 on tensor cores, whose
    adders may truncate; half precision computes in float32)."""
    prototypes, phi, assignments = list(prototypes), list(phi), list(assignments)
    negs = [] if negatives is None else list(negatives)
    if negatives is not None and len(negs) != len(prototypes):
        raise ValueError(f"proto_nce: `negatives` must hold one tensor per clustering "
                         f"({len(prototypes)}), got {len(negs)}")
    # Half precision is computed in float32 on the CPU (below); CUDA has no float64 kernel.
    _check_dtype("proto_nce", "q", q, _FLOATING if q.device.type == "cpu" else _CUDA_FLOATING)
    _check_dtype("proto_nce", "k", k, (q.dtype,), like="q")
    _check_dtype("proto_nce", "queue", queue, (q.dtype,), like="q")
    for name, ts, allowed in (("prototypes", prototypes, (q.dtype,)), ("phi", phi, _FLOATING),
                              ("assignments", assignments, _LONG), ("negatives", negs, _LONG)):
        for m, t in enumerate(ts):
            _check_dtype("proto_nce", f"{name}[{m}]", t, allowed,
                         like="q" if name == "prototypes" else None)
    if torch.is_grad_enabled():
        for name, ts in (("queue", [queue]), ("prototypes", prototypes), ("phi", phi)):
            if any(t.requires_grad for t in ts):
                raise ValueError(f"proto_nce: `{name}` requires grad, but the loss is "
                                 "differentiable only w.r.t. `q` and `k`; pass it detached")
    if q.device.type == "cpu" and q.dtype in (torch.float16, torch.bfloat16):
        loss, correct = proto_nce_with_accuracy(
            q.float(), k.float(), queue.float(), [c.float() for c in prototypes], phi,
            assignments, negatives, temperature=temperature)
        return loss.to(q.dtype), correct
    if check_values and q.device.type != "cpu" and not _tracing():
        _check_values(prototypes, phi, assignments, negs)
    allow_tf32 = q.device.type == "cuda" and q.dtype == torch.float32 and _cuda_allows_tf32()
    loss, _, _, correct = torch.ops.pcl_ext.proto_nce.default(
        q, k, queue, prototypes, phi, assignments, negs, float(temperature),
        allow_tf32=allow_tf32)
    return loss, correct


@torch.compiler.assume_constant_result  # a setting, not data: torch.compile bakes it in
def _cuda_allows_tf32() -> bool:
    """Whether torch's float32 CUDA matmuls may use TF32 (the precision setting as resolved from
    ``torch.backends.cuda.matmul.fp32_precision``, ``allow_tf32`` and
    ``torch.set_float32_matmul_precision``): the op's ``allow_tf32``, which its kernel cannot
    read from torch itself through the stable ABI. A change of the setting recompiles a
    compiled caller (torch.compile guards on it)."""
    return torch.backends.cuda.matmul.fp32_precision == "tf32"


def _tracing() -> bool:
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _check_values(prototypes, phi, assignments, negatives) -> None:
    """Device-side value checks gathered into one host synchronization."""
    checks = []
    for m, (c, p, a) in enumerate(zip(prototypes, phi, assignments)):
        if p.shape != (c.shape[0],) or not p.is_floating_point():
            continue  # a structural error: the op's own checks name it
        checks.append((_positive_finite(p), f"`phi[{m}]` must be positive and finite"))
        for name, ids in (("assignments", a), ("negatives", negatives[m] if negatives else None)):
            if ids is None or ids.numel() == 0 or ids.dtype != torch.long:
                continue
            checks.append((_ids_in_range(ids, c.shape[0]),
                           f"`{name}[{m}]` holds cluster ids outside [0, {c.shape[0]})"))
    _raise_failed("proto_nce", checks)


def _positive_finite(t: Tensor) -> Tensor:
    return ((t > 0) & torch.isfinite(t)).all()


def _ids_in_range(ids: Tensor, num_clusters: int) -> Tensor:
    return (ids.min() >= 0) & (ids.max() < num_clusters)


def _raise_failed(caller: str, checks: list[tuple[Tensor, str]]) -> None:
    """ValueError listing the message of every check whose 0-dim bool flag is false. The
    flags are read in one host synchronization, whatever their number."""
    if not checks:
        return
    device = checks[0][0].device
    ok = torch.stack([flag.to(device) for flag, _ in checks]).tolist()
    bad = [message for (_, message), good in zip(checks, ok) if not good]
    if bad:
        raise ValueError(f"{caller}: " + "; ".join(bad))


@torch.library.register_fake("pcl_ext::proto_nce")
def _proto_nce_fake(q, k, queue, prototypes, phi, assignments, negatives, temperature, *,
                    allow_tf32=False):
    return (q.new_empty(()), q.new_empty(q.shape), q.new_empty(q.shape),
            q.new_empty((1 + len(prototypes), q.shape[0]), dtype=torch.bool))


def _proto_nce_setup_context(ctx, inputs, keyword_only_inputs, output):
    _, dq, dk, correct = output
    ctx.save_for_backward(dq, dk)
    ctx.mark_non_differentiable(correct)
    ctx.list_lengths = [len(inputs[i]) for i in range(3, 7)]


def _proto_nce_backward(ctx, grad_loss, _grad_dq, _grad_dk, _grad_correct):
    if torch.is_grad_enabled():
        raise RuntimeError("proto_nce: double backward (create_graph=True) is not supported; "
                           "the gradient is accumulated during the forward pass")
    dq, dk = ctx.saved_tensors
    no_grads = [[None] * n for n in ctx.list_lengths]
    return grad_loss * dq, grad_loss * dk, None, *no_grads, None


torch.library.register_autograd("pcl_ext::proto_nce", _proto_nce_backward,
                                setup_context=_proto_nce_setup_context)


# -------------------------------------------------------------------------------- info_nce
_REDUCTIONS = ("mean", "sum", "none")


def info_nce(queries: Tensor, keys: Tensor, targets: Optional[Tensor] = None, *,
             temperature: float, exclude_self: bool = False, reduction: str = "mean",
             check_values: bool = True) -> Tensor:
    r"""Fused InfoNCE (softmax cross-entropy over every key), forward and backward: the loss of
    SimCLR (NT-Xent), MoCo v3, CLIP and CPC.

    .. math::
        \ell_i = \operatorname{lse}_{j \in C_i} s_{ij} - s_{i,t_i},\qquad
        s_{ij} = \frac{q_i\cdot k_j}{T},\qquad
        C_i = \{0..K-1\} \setminus (\{i\} \text{ if exclude\_self})

    reduced over the rows by ``reduction`` (``"mean"``: :math:`\frac1N\sum_i \ell_i`, as
    ``F.cross_entropy``; ``"sum"``; ``"none"``: the ``[N]`` losses). The gradients are

    .. math::
        \frac{\partial \ell_i}{\partial q_i} = \frac1T\Big(\sum_j P_{ij} k_j - k_{t_i}\Big),
        \qquad
        \frac{\partial L}{\partial k_j} = \frac1T \sum_i g_i\,(P_{ij} - [j = t_i])\,q_i,

    :math:`P_{ij} = e^{s_{ij} - \operatorname{lse}_i}` (0 for an excluded column), :math:`g_i`
    the incoming gradient of :math:`\ell_i`. No ``N x K`` logits are materialized: the keys
    are streamed in tiles once in the forward pass, which also accumulates the query gradient,
    and once more in the backward pass for the key gradient (FlashAttention's scheme, four
    ``N x K x D`` products where eager autograd does three); the memory is ``O(N D)``.

    Args:
        queries: ``[N, D]``, differentiable (or not).
        keys: ``[K, D]``, the same dtype and device, differentiable (or not); may be
            ``queries`` itself (SimCLR: the ``2N`` embeddings of both views, with
            ``exclude_self=True``), in which case autograd adds the two gradients.
        targets: ``[N]`` int64 column of each row's positive key, in ``[0, K)``; ``None``:
            ``arange(N)`` (key ``i`` is row ``i``'s positive, MoCo v3 / CLIP).
        temperature: ``T > 0``.
        exclude_self: leave column ``i`` out of row ``i``'s softmax (needs ``N <= K`` and
            ``targets[i] != i``).
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.
        check_values: verify the targets (range, and ``targets[i] != i`` under
            ``exclude_self``). The CPU kernel always does; on CUDA this costs one host
            synchronization and is skipped during CUDA-graph capture and ``torch.compile``
            tracing.

    Dtypes: CPU float32/float64 (half precision is computed in float32); CUDA float32 (TF32
    tensor cores only when ``torch.get_float32_matmul_precision()`` allows), float16, bfloat16
    with float32 accumulation. The result has ``queries``' dtype. Deterministic on the CPU
    (independent of the thread count). First-order gradients only.
    """
    return info_nce_with_accuracy(queries, keys, targets, temperature=temperature,
                                  exclude_self=exclude_self, reduction=reduction,
                                  check_values=check_values)[0]


def info_nce_with_accuracy(queries: Tensor, keys: Tensor, targets: Optional[Tensor] = None, *,
                           temperature: float, exclude_self: bool = False,
                           reduction: str = "mean",
                           check_values: bool = True) -> tuple[Tensor, Tensor]:
    """:func:`info_nce` and, from the same pass, ``correct`` [N] (bool): whether row ``i``'s
    target logit is its largest (top-1 accuracy), ties counted as correct by
    :func:`proto_nce_with_accuracy`'s rule."""
    if reduction not in _REDUCTIONS:
        raise ValueError(f"info_nce: `reduction` must be one of {_REDUCTIONS}, got {reduction!r}")
    on_cpu = queries.device.type == "cpu"
    _check_dtype("info_nce", "queries", queries, _FLOATING if on_cpu else _CUDA_FLOATING)
    _check_dtype("info_nce", "keys", keys, (queries.dtype,), like="queries")
    if targets is None:
        targets = torch.arange(queries.shape[0] if queries.dim() > 0 else 0,
                               device=queries.device)
    _check_dtype("info_nce", "targets", targets, _LONG)
    if on_cpu and queries.dtype in (torch.float16, torch.bfloat16):
        q32 = queries.float()  # one cast for queries-is-keys: one float32 gradient, rounded once
        loss, correct = info_nce_with_accuracy(
            q32, q32 if keys is queries else keys.float(), targets, temperature=temperature,
            exclude_self=exclude_self, reduction=reduction)
        return loss.to(queries.dtype), correct
    if check_values and not on_cpu and not _tracing():
        _check_targets(targets, keys, exclude_self)
    allow_tf32 = queries.device.type == "cuda" and queries.dtype == torch.float32 and \
        _cuda_allows_tf32()
    grad_q = torch.is_grad_enabled() and queries.requires_grad
    losses, _, _, correct = torch.ops.pcl_ext.info_nce.default(
        queries, keys, targets, float(temperature), bool(exclude_self), grad_q,
        allow_tf32=allow_tf32)
    if reduction == "mean":
        losses = losses.mean()
    elif reduction == "sum":
        losses = losses.sum()
    return losses.to(queries.dtype), correct


def _check_targets(targets: Tensor, keys: Tensor, exclude_self: bool) -> None:
    """The CUDA value checks of info_nce's targets, in one host synchronization."""
    if (targets.dim() != 1 or targets.numel() == 0 or keys.dim() != 2
            or targets.device != keys.device):
        return  # a structural error that the op names
    flags = [_ids_in_range(targets, keys.shape[0])]
    if exclude_self:
        flags.append((targets != torch.arange(len(targets), device=targets.device)).all())
    ok = torch.stack(flags).tolist()
    if not ok[0]:
        raise IndexError(f"info_nce: `targets` holds columns outside [0, {keys.shape[0]}) "
                         "(the rows of `keys`)")
    if not all(ok):
        raise ValueError("info_nce: `targets[i]` is i for some row i, its own column, which "
                         "`exclude_self` removes")


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("pcl_ext::info_nce")
def _info_nce_fake(queries, keys, targets, temperature, exclude_self, compute_grad_queries, *,
                   allow_tf32=False):
    n, acc = queries.shape[0], _acc_dtype(queries.dtype)
    return (queries.new_empty((n,), dtype=acc), queries.new_empty((n,), dtype=acc),
            queries.new_empty(queries.shape if compute_grad_queries else (0,)),
            queries.new_empty((n,), dtype=torch.bool))


@torch.library.register_fake("pcl_ext::info_nce_backward")
def _info_nce_backward_fake(grad_losses, queries, keys, targets, lse, temperature, exclude_self,
                            *, allow_tf32=False):
    return keys.new_empty(keys.shape)


def _info_nce_setup_context(ctx, inputs, keyword_only_inputs, output):
    queries, keys, targets, temperature, exclude_self, compute_grad_queries = inputs
    _, lse, dq, correct = output
    ctx.mark_non_differentiable(lse, dq, correct)
    ctx.set_materialize_grads(False)  # no zero [N, D] gradient for dq, which nothing uses
    ctx.save_for_backward(queries, keys, targets, lse, dq)
    ctx.temperature, ctx.exclude_self = temperature, exclude_self
    ctx.compute_grad_queries = compute_grad_queries
    ctx.queries_is_keys = queries is keys
    ctx.allow_tf32 = keyword_only_inputs.get("allow_tf32", False)


def _info_nce_backward(ctx, grad_losses, _grad_lse, _grad_dq, _grad_correct):
    if torch.is_grad_enabled():
        raise RuntimeError("info_nce: double backward (create_graph=True) is not supported; "
                           "the kernels compute first-order gradients only")
    if grad_losses is None:  # undefined: no gradient flows (gradcheck checks this case)
        return None, None, None, None, None, None
    queries, keys, targets, lse, dq = ctx.saved_tensors
    if ctx.needs_input_grad[0] and not ctx.compute_grad_queries:
        raise RuntimeError("info_nce: the gradient of `queries` was not accumulated "
                           "(the op ran with compute_grad_queries=False)")
    grad_q = grad_k = None
    if ctx.needs_input_grad[1]:
        grad_k = torch.ops.pcl_ext.info_nce_backward.default(
            grad_losses, queries, keys, targets, lse, ctx.temperature, ctx.exclude_self,
            allow_tf32=ctx.allow_tf32)
    if ctx.needs_input_grad[0] and ctx.queries_is_keys:
        # One tensor, one gradient: add g_i dq_i into the fresh key gradient, in place,
        # rather than allocating the scaled copy and letting autograd allocate the sum.
        # dq itself stays as saved (retain_graph may call this again).
        grad_k.addcmul_(grad_losses[:, None], dq)
    elif ctx.needs_input_grad[0]:
        grad_q = (grad_losses[:, None] * dq).to(queries.dtype)
    return grad_q, grad_k, None, None, None, None


torch.library.register_autograd("pcl_ext::info_nce", _info_nce_backward,
                                setup_context=_info_nce_setup_context)


# ------------------------------------------------------------------------ momentum_update_


def momentum_update_(key: torch.nn.Module | Iterable[Tensor],
                     query: torch.nn.Module | Iterable[Tensor], m: float) -> None:
    r"""MoCo's momentum update of the key encoder, in place: for every parameter pair

    .. math:: \theta_k \leftarrow m\,\theta_k + (1 - m)\,\theta_q

    Args:
        key: the key (momentum) encoder, updated in place: an ``nn.Module`` (its
            ``parameters()``; buffers such as BatchNorm statistics are not averaged, as in
            MoCo and PCL), an iterable of tensors, or one tensor.
        query: the query encoder, the same kind of object; pairwise the same count, shape,
            dtype and device as ``key`` (dtypes may differ from pair to pair).
        m: the momentum, in ``[0, 1]`` (PCL: 0.999). ``m = 1`` keeps ``key``, ``m = 0``
            copies ``query``.

    Works on the tensors' data, outside autograd (like MoCo's ``@torch.no_grad()``). One
    pass over memory (12 bytes per float32 parameter): one multi-threaded loop on the CPU,
    one multi-tensor kernel per dtype on CUDA, no host synchronization. Half precision is
    computed in float32. Deterministic. Dense tensors of any layout are updated where they
    lie, other ``key`` tensors through a contiguous copy. Not capturable in a CUDA graph (the
    CUDA kernel's tensor table is copied from host memory at every call).
    """
    keys = _tensor_list(key, "key")
    queries = _tensor_list(query, "query")
    key_dtypes = [k.dtype for k in keys]  # one pass first: ResNet-50 has 161 pairs
    if key_dtypes != [q.dtype for q in queries] or not _FLOATING_SET.issuperset(key_dtypes):
        for i, (k, q) in enumerate(zip(keys, queries)):
            _check_dtype("momentum_update_", f"key[{i}]", k, _FLOATING)
            _check_dtype("momentum_update_", f"query[{i}]", q, (k.dtype,), like=f"key[{i}]")
    m = float(m)
    if not (keys or queries):  # nothing to dispatch on; the op checks `m` otherwise
        if not 0.0 <= m <= 1.0:
            raise ValueError(f"momentum_update_: `m` must be a finite number in [0, 1], got {m}")
        return
    # no_grad rather than .detach() per tensor: the same effect (the kernel writes the data,
    # autograd records nothing) at a third of the Python cost for ResNet-50's 161 pairs.
    with torch.no_grad():
        torch.ops.pcl_ext.momentum_update_.default(keys, queries, m)


def _tensor_list(obj, name: str) -> list[Tensor]:
    if isinstance(obj, torch.nn.Module):
        return list(obj.parameters())
    if isinstance(obj, Tensor):
        return [obj]
    if not isinstance(obj, Iterable):
        raise TypeError(f"momentum_update_: `{name}` must be an nn.Module or an iterable of "
                        f"tensors, got {type(obj).__name__}")
    out = list(obj)
    for i, t in enumerate(out):
        if not isinstance(t, Tensor):
            raise TypeError(f"momentum_update_: `{name}[{i}]` must be a Tensor, got "
                            f"{type(t).__name__}")
    return out


@torch.library.register_fake("pcl_ext::momentum_update_")
def _momentum_update_fake(key, query, momentum):
    return None


# ---------------------------------------------------------------------------- ring_enqueue_


def ring_enqueue_(buffer: Tensor, ptr: Tensor, keys: Tensor) -> None:
    r"""Write ``keys`` into the ring buffer ``buffer`` at ``ptr`` and advance ``ptr``, in place.

    Row ``j`` of ``keys`` goes to row ``(ptr + j) mod size`` of ``buffer`` and then
    ``ptr <- (ptr + B) mod size``: exactly what enqueueing the rows one at a time does. For
    ``B > size`` later rows overwrite earlier ones, so only the last ``size`` rows of ``keys``
    remain, each where sequential enqueueing leaves it. ``B = 0`` changes nothing.

    Args:
        buffer: ``[size, dim]``, ``size >= 1``, float32, float64, float16 or bfloat16, any
            strides; updated in place.
        ptr: int64 tensor of one element in ``[0, size)``, on ``buffer``'s device; advanced in
            place.
        keys: ``[B, dim]`` with ``buffer``'s dtype and device, any strides, not sharing memory
            with ``buffer``; read without gradient.

    One kernel launch on either device. On CUDA the pointer never leaves device memory: no host
    synchronization, capturable in a CUDA graph. The CPU kernel raises IndexError for a ``ptr``
    outside ``[0, size)``; the CUDA kernel cannot check it without synchronizing (it still
    never writes out of bounds, but the result is then unspecified). Exact copies, so
    deterministic.
    """
    _check_dtype("ring_enqueue_", "buffer", buffer, _FLOATING)
    _check_dtype("ring_enqueue_", "ptr", ptr, _LONG)
    _check_dtype("ring_enqueue_", "keys", keys, (buffer.dtype,), like="buffer")
    torch.ops.pcl_ext.ring_enqueue_.default(buffer, ptr, keys.detach())


@torch.library.register_fake("pcl_ext::ring_enqueue_")
def _ring_enqueue_fake(buffer, ptr, keys):
    return None


# ---------------------------------------------------------------------------- concentration


def concentration(sq_dist: Tensor, im2cluster: Tensor, num_clusters: int, *,
                  temperature: float = 0.2, alpha: float = 10.0) -> Tensor:
    r"""PCL's concentration estimate :math:`\phi` of every cluster (the E-step's "density").

    For cluster ``c`` with members :math:`Z_c` at squared distances :math:`d_z` from its
    centroid (before the centroids are normalized into prototypes),

    .. math::
        \phi_c = \frac{\frac{1}{|Z_c|}\sum_{z\in Z_c}\sqrt{d_z}}{\log(|Z_c| + \alpha)}
        \qquad (|Z_c| > 1).

    Clusters with at most one member (empty ones too) take :math:`\max_c \phi_c`; then
    :math:`\phi` is clipped to its 10th and 90th percentiles (NumPy's default linear
    interpolation) and scaled so that its mean is ``temperature``. This is ``run_kmeans`` of
    PCL's ``main_pcl.py`` without its Python loops. Where every :math:`\phi_c` is zero after the
    clipping (no cluster has two members, or every point sits on its centroid) PCL divides zero
    by zero and gets NaN; this returns the constant ``temperature`` instead. Where only some
    are zero (more than 10% of the clusters have every member on their centroid, as duplicated
    images do), PCL's loss divides by zero; here those clusters take the smallest positive
    :math:`\phi` before the rescaling, so every :math:`\phi_c > 0`.

    Args:
        sq_dist: ``[n]`` or faiss's ``[n, 1]`` squared L2 distance of each point to its own
            centroid (``D`` of ``index.search(x, 1)``), finite and ``>= 0``, any float dtype.
        im2cluster: ``[n]`` or ``[n, 1]`` int64 cluster of each point, in
            ``[0, num_clusters)``, on ``sq_dist``'s device.
        num_clusters: ``K >= 1`` (may exceed ``n``).
        temperature: the mean of the result (PCL's ``--temperature``), ``> 0``.
        alpha: the smoothing :math:`\alpha`, ``> -1``.

    Returns:
        ``[K]`` concentrations on ``sq_dist``'s device: float64 for float64 ``sq_dist``, else
        float32.

    The per-cluster reduction (op ``pcl_ext::cluster_stats``) accumulates in float64 and is
    deterministic on both devices: one pass in index order on the CPU; on CUDA a stable sort by
    cluster, then one warp per cluster adds its points in a fixed order (no float atomics). The
    rest is a few vectorized float64 ops. The CPU kernel checks the values; on CUDA they are
    checked here with one host synchronization, skipped during CUDA-graph capture and
    ``torch.compile`` tracing (unchecked, ids outside ``[0, K)`` are ignored and bad distances
    give NaN).
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"concentration: `temperature` must be a positive finite number, "
                         f"got {temperature}")
    _check_dtype("concentration", "sq_dist", sq_dist, _FLOATING)
    _check_dtype("concentration", "im2cluster", im2cluster, _LONG)
    if sq_dist.device.type != "cpu" and not _tracing():
        _check_concentration_values(sq_dist, im2cluster, num_clusters)
    phi, count = torch.ops.pcl_ext.cluster_stats.default(sq_dist.detach(), im2cluster,
                                                         num_clusters, float(alpha))  # K, K
    phi = torch.where(count > 1, phi, phi.max())  # the max over all K, zeros included, as PCL
    # numpy.percentile's default method ('linear', as torch.quantile's): the order statistics
    # around rank q (K - 1), interpolated. Written out because torch.quantile checks q with a
    # data-dependent op, which breaks a torch.compile(fullgraph=True) graph on torch 2.11.
    ranks = torch.linspace(0.1, 0.9, 2, dtype=phi.dtype, device=phi.device) * (num_clusters - 1)
    below = ranks.long()  # floor: ranks >= 0
    ordered = phi.sort().values
    lo, hi = ordered[below].lerp(ordered[ranks.ceil().long()], ranks - below)
    phi = phi.clamp(lo, hi)
    # Zeros left after the clipping would divide a prototype's logits by zero (PCL: inf, then
    # NaN); they take the smallest positive value instead. No host synchronization.
    smallest = torch.where(phi > 0, phi, torch.inf).amin()  # inf where every phi is zero
    phi = torch.where((phi > 0) | smallest.isinf(), phi, smallest)
    mean = phi.mean()
    phi = torch.where(mean > 0, temperature * phi / mean, temperature)
    return phi.to(torch.float64 if sq_dist.dtype == torch.float64 else torch.float32)


def _check_concentration_values(sq_dist: Tensor, im2cluster: Tensor, num_clusters: int) -> None:
    """The CUDA value checks of concentration, in one host synchronization."""
    if (im2cluster.dtype != torch.long or not sq_dist.is_floating_point()
            or im2cluster.numel() != sq_dist.numel() or sq_dist.numel() == 0
            or im2cluster.device != sq_dist.device or num_clusters < 1):
        return  # nothing to read, or a structural error that the op names
    ids_ok, dist_ok = torch.stack([
        (im2cluster.min() >= 0) & (im2cluster.max() < num_clusters),
        ((sq_dist >= 0) & torch.isfinite(sq_dist)).all()]).tolist()
    if not ids_ok:
        raise IndexError(f"concentration: `im2cluster` holds cluster ids outside "
                         f"[0, {num_clusters})")
    if not dist_ok:
        raise ValueError("concentration: `sq_dist` must be finite and >= 0")


@torch.library.register_fake("pcl_ext::cluster_stats")
def _cluster_stats_fake(sq_dist, im2cluster, num_clusters, alpha):
    return (sq_dist.new_empty((num_clusters,), dtype=torch.float64),
            im2cluster.new_empty((num_clusters,)))


# ------------------------------------------------------------------------- sample_negatives


def sample_negatives(assignments: Tensor, num_clusters: int, r: int,
                     generator: Optional[torch.Generator] = None) -> Tensor:
    r"""``r`` distinct clusters, uniform among those that no row of the batch is assigned to.

    PCL's ``random.sample(set(range(K)) - set(assignments), r)`` (``pcl/builder.py``): the
    negatives of sampled-mode :func:`proto_nce`, made on ``assignments``' device without host
    synchronization. ``K`` i.i.d. uniform keys are drawn with
    ``torch.rand(K, generator=generator, device=assignments.device)``; the op
    ``pcl_ext::sample_negatives`` returns the ``r`` free clusters with the smallest keys, so the
    set is a uniform random ``r``-subset of the free clusters (ties of keys, rare in float32,
    go to the smaller id). The ids come in increasing order, which makes gathering their
    prototypes a forward sweep; the same generator state gives the same ids, and the same keys
    give the same ids on either device.

    The ids are drawn from ``range(K)``, every prototype; PCL draws from
    ``range(im2cluster.max() + 1)``, the largest id assigned to any sample of the data set.
    The two differ only when the highest-numbered clusters are empty (k-means can end with
    empty clusters). Then PCL never samples those, while it samples the empty clusters
    with smaller ids: which empty prototypes may be negatives depends on their numbering,
    not on them. Here every prototype that is no row's positive is equally likely (an empty
    cluster still has a prototype and, by PCL's rule, the largest ``phi``), the same set
    that all-prototype mode scores, and no reduction over the data set's assignments is
    needed (PCL's ``.max()`` of a GPU tensor is a host synchronization per step).

    Args:
        assignments: ``[N]`` int64 cluster of each row, in ``[0, num_clusters)``.
        num_clusters: ``K >= 1``.
        r: how many, from 0 to the number of free clusters; ``r <= K - N`` always works.
        generator: a ``torch.Generator`` on ``assignments``' device, or None for the default.

    Returns:
        ``[r]`` int64 on ``assignments``' device.

    The CPU kernel raises IndexError for ids outside ``[0, K)`` and ValueError when ``r``
    exceeds the free clusters. On CUDA, counting the free clusters needs a synchronization, so
    it is done (with the id range check) only when ``r > K - N``, and skipped during CUDA-graph
    capture and ``torch.compile`` tracing, where too large an ``r`` yields assigned clusters
    too. Otherwise the ids are not checked on CUDA (:func:`proto_nce` checks the same
    assignments): an id outside ``[0, K)`` excludes nothing.
    """
    if r < 0:
        raise ValueError(f"sample_negatives: `r` must be >= 0, got {r}")
    if num_clusters < 1:
        raise ValueError(f"sample_negatives: `num_clusters` must be >= 1, got {num_clusters}")
    _check_dtype("sample_negatives", "assignments", assignments, _LONG)
    if (assignments.device.type != "cpu" and r > num_clusters - assignments.numel()
            and assignments.numel() > 0 and assignments.dtype == torch.long
            and assignments.dim() == 1 and not _tracing()):
        _check_free_clusters(assignments, num_clusters, r)
    keys = torch.rand(num_clusters, generator=generator, device=assignments.device)
    return torch.ops.pcl_ext.sample_negatives.default(assignments, keys, r)


def _check_free_clusters(assignments: Tensor, num_clusters: int, r: int) -> None:
    """Id range and free-cluster count on CUDA, in one host synchronization."""
    in_range = (assignments.min() >= 0) & (assignments.max() < num_clusters)
    taken = torch.zeros(num_clusters, dtype=torch.bool, device=assignments.device)
    taken.index_fill_(0, assignments.clamp(0, num_clusters - 1), True)  # clamped: see in_range
    ok, n_taken = torch.stack([in_range.long(), taken.sum()]).tolist()
    if not ok:
        raise IndexError(f"sample_negatives: `assignments` holds cluster ids outside "
                         f"[0, {num_clusters})")
    if r > num_clusters - n_taken:
        raise ValueError(f"sample_negatives: `r` = {r} exceeds the {num_clusters - n_taken} "
                         "clusters that no row of `assignments` is assigned to")


@torch.library.register_fake("pcl_ext::sample_negatives")
def _sample_negatives_fake(assignments, keys, r):
    return assignments.new_empty((r,), dtype=torch.long)
