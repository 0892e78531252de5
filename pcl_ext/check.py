"""Self-check of an installed pcl_ext, for the machine it will run on.

    python -m pcl_ext.check                  # every op, CPU and (if present) CUDA
    python -m pcl_ext.check --quick          # small shapes and the review's cases only
    python -m pcl_ext.check --device cuda --bench

It prints how pcl_ext was built (its version, the torch it was compiled against, the torch
running, CUDA toolkit and architectures, the visible GPUs), then runs every op on every
available device against ``pcl_ext.reference`` evaluated in float64 on the same input values,
on fresh random inputs (``--seed`` repeats a run), and prints one line per case::

    PASS  cpu    proto_nce         all peaked softmax float32       dk: err 5.30e-10, tol 2.00e-08

``err`` and ``tol`` are taken at the output element with the largest err/tol. A case that
cannot run on a device says SKIP and why. The exit status is 1 if any case failed, 2 if none
ran, else 0. ``--bench`` adds one speed ratio per op against the eager reference.

Tolerances are derived per output element from the inputs and the arithmetic, never chosen to
fit. With ``u`` the unit roundoff of the arithmetic that forms the logits and sums (float32:
2^-24 for float32, float16 and bfloat16 inputs; float64: 2^-53):

* A length-``D`` dot product errs by at most ``(LAMBDA sqrt(D) + KAPPA) u sum|q_c x_c|``:
  Higham and Mary's probabilistic bound (SIAM J. Sci. Comput. 41, 2019), which holds with
  probability >= 1 - 2D exp(-LAMBDA^2 / 2) (1 - 4e-6 for LAMBDA = 6, D = 128), plus KAPPA = 8
  roundings for the few scalar steps around it (the 1/phi scaling, exp -- the CPU kernel's
  polynomial exp errs by < 2e-7 = 3.4 u --, the division by the sum, log, the subtraction).
  TF32 rounds both operands to 11 bits first: ``+ 2 * 2^-11 sum|q_c x_c|``.
* Those logit errors ``e_j`` move the softmax weights by at most
  ``exp(2 max e) p_j (e_j + sum_k p_k e_k - 2 p_j e_j)`` and the log-sum-exp by at most
  ``min(max e, exp(2 max e) sum_j p_j e_j)``; a sum over ``n`` terms adds
  ``(LAMBDA sqrt(n) + KAPPA) u`` relative to the sum of the terms' magnitudes.
* Half-precision kernels store the softmax weights in the input dtype before the second
  product: ``+ u_p sum_{j != target} p_j |x_j|`` (the target is added exactly), plus for
  float16 an absolute 2^-25 per weight (subnormals) times the term's largest 1/phi. TF32
  rounds weights and columns: ``+ 2 * 2^-11 (sum_j p_j |x_j| + |x_t|)``.
* Outputs are rounded to the input dtype: ``+ u_out (|reference| + smallest normal)`` (the
  second term: half the spacing of the subnormals).

``correct`` (top-1 hit) must be True where the target logit is the row's largest in float64
(exact ties count as hits) and False where it falls below the largest by more than the tie
tolerance ``16 eps D max(1, |s_max|)`` (eps of the logits' arithmetic; TF32: 2^-10) plus both
logits' error bounds; in between either answer is right. Exact copies (the ring queue, the
sampled ids) have tolerance 0; momentum_update_ allows 4 roundings of ``m|k| + (1-m)|q|`` in
its arithmetic dtype; concentration's float64 reduction allows ``(LAMBDA sqrt(n) + KAPPA) u``
relative to the largest phi, 4 times (mean, log, quantile, rescale).
"""
from __future__ import annotations

import argparse
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

import pcl_ext
from pcl_ext import ops, reference

LAMBDA = 6.0  # probabilistic rounding-error bound: failure probability <= 2n exp(-LAMBDA^2/2)
KAPPA = 8.0   # roundings allowed for the scalar steps around each dot product or sum
TEMPERATURE = 0.2
CUDA_MAX_CLUSTERINGS = 31  # the CUDA kernel's term table holds the instance term + 31


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def rounding(dtype: torch.dtype, x: Tensor) -> Tensor:
    """The largest error of rounding the values ``x`` to ``dtype``: relative ``u``, and half
    the spacing of the subnormals (``u`` times the smallest normal) near zero."""
    info = torch.finfo(dtype)
    return info.eps / 2 * (x.abs() + info.smallest_normal)


TF32_U = 2.0**-11  # TF32 keeps 10 explicit mantissa bits, like float16


# ------------------------------------------------------------------------------- the modes
@dataclass(frozen=True)
class Mode:
    """How one device computes proto_nce for one input dtype: what the error bounds need."""
    name: str
    dtype: torch.dtype
    u_acc: float            # the logits' and sums' arithmetic
    eps_tie: float          # epsilon of the logits' arithmetic, for the tie rule
    tf32: bool = False
    u_in: float = 0.0       # both operands rounded before the products (TF32)
    u_p: float = 0.0        # softmax weights rounded before the second product
    p_target_exact: bool = False  # the target's weight is kept out of that rounding
    u_sub: float = 0.0      # absolute floor of a stored weight (float16 subnormals)


def proto_nce_modes(device: torch.device) -> list[Mode]:
    f32 = unit_roundoff(torch.float32)
    if device.type == "cpu":  # the CPU kernel computes float16/bfloat16 inputs in float32
        return [Mode("float64", torch.float64, unit_roundoff(torch.float64),
                     2 * unit_roundoff(torch.float64)),
                Mode("float32", torch.float32, f32, 2 * f32),
                Mode("float16", torch.float16, f32, 2 * f32),
                Mode("bfloat16", torch.bfloat16, f32, 2 * f32)]
    half = dict(p_target_exact=True, eps_tie=2 * f32)
    return [Mode("float32", torch.float32, f32, 2 * f32),
            Mode("float32+tf32", torch.float32, f32, 2 * TF32_U, tf32=True, u_in=TF32_U,
                 u_p=2 * TF32_U),
            Mode("float16", torch.float16, f32, u_p=unit_roundoff(torch.float16),
                 u_sub=2.0**-25, **half),
            Mode("bfloat16", torch.bfloat16, f32, u_p=unit_roundoff(torch.bfloat16), **half)]


@contextmanager
def float32_matmul(tf32: bool) -> Iterator[None]:
    """torch's float32 matmul precision for the block (TF32 allowed or not), then restored."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


# ------------------------------------------------------------------------ verdicts and lines
@dataclass
class Verdict:
    """The outputs of one case, each against its reference and elementwise tolerance."""
    worst: Optional[tuple[float, str, float, float]] = None  # ratio, name, err, tol
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def close(self, name: str, got: Tensor, want: Tensor, tol: Tensor | float) -> None:
        got = got.detach()
        if got.shape != want.shape:
            self.problems.append(f"{name} has shape {tuple(got.shape)}, want {tuple(want.shape)}")
            return
        got, want = got.double(), want.detach().double().to(got.device)
        tol = torch.as_tensor(tol, dtype=torch.float64, device=got.device).expand_as(want)
        nonfinite = ~torch.isfinite(got) & torch.isfinite(want)
        if nonfinite.any():
            self.problems.append(f"{name} has {int(nonfinite.sum())} non-finite values")
        err = torch.where(torch.isfinite(got), (got - want).abs(), torch.inf)
        ratio = torch.where(tol > 0, err / tol, torch.where(err > 0, torch.inf, 0.0))
        i = int(ratio.argmax()) if ratio.numel() else 0
        if ratio.numel():
            r, e, t = ratio.flatten()[i].item(), err.flatten()[i].item(), tol.flatten()[i].item()
            if self.worst is None or r > self.worst[0]:
                self.worst = (r, name, e, t)
            if r > 1 and not nonfinite.any():
                self.problems.append(f"{name} off by {e:.2e} > tol {t:.2e} at element {i}")

    def equal(self, name: str, got: Tensor, want: Tensor) -> None:
        """Bitwise equality (exact copies, determinism)."""
        self.close(name, got, want, 0.0)

    def flags(self, name: str, got: Tensor, must_true: Tensor, must_false: Tensor) -> None:
        got = got.cpu()
        wrong = (must_true.cpu() & ~got) | (must_false.cpu() & got)
        undecided = int((~must_true & ~must_false).sum())
        if wrong.any():
            self.problems.append(f"{name}: {int(wrong.sum())} of {got.numel()} flags wrong")
        elif undecided:
            self.notes.append(f"{name}: {undecided} of {got.numel()} within the tie tolerance")

    def fail(self, message: str) -> None:
        self.problems.append(message)

    def line(self) -> tuple[str, str]:
        status = "FAIL" if self.problems else "PASS"
        parts = list(self.problems)
        if self.worst is not None and not self.problems:
            _, name, e, t = self.worst
            parts.append(f"{name}: err {e:.2e}, tol {t:.2e}" if t else f"{name}: bit-identical")
        return status, "; ".join(parts + self.notes)


@dataclass
class Case:
    device: str
    op: str
    name: str
    run: Optional[Callable[[torch.Generator], Verdict]]  # None: SKIP
    skip_reason: str = ""


# ----------------------------------------------------------------------------- proto_nce
@dataclass(frozen=True)
class Shape:
    n: int
    d: int
    q: int
    ks: tuple[int, ...]
    r: int

    def __str__(self) -> str:
        return f"N={self.n} D={self.d} Q={self.q} K={self.ks if len(self.ks) < 4 else '...'}"


SMALL = Shape(6, 13, 11, (5, 9, 4), 3)
MEDIUM = Shape(96, 128, 3000, (2000, 500, 900), 700)
PCL = Shape(256, 128, 16384, (25000, 50000, 100000), 16384)  # PCL's ImageNet setting


@dataclass
class ProtoInputs:
    """proto_nce's arguments as float64 values on the CPU (phi as float32 values, the
    precision the kernels read it in, except for float64 inputs)."""
    q: Tensor
    k: Tensor
    queue: Tensor
    protos: list[Tensor]
    phi: list[Tensor]
    assign: list[Tensor]
    negs: Optional[list[Tensor]]


def make_proto_inputs(shape: Shape, sampled: bool, gen: torch.Generator, *,
                      tiny_phi: int = 0, peaked: bool = False, pull: float = 0.0,
                      duplicates: bool = False) -> ProtoInputs:
    """Unit-norm embeddings and prototypes like PCL's; phi uniform in [0.05, 0.5].

    tiny_phi: that many clusters per clustering get phi = 1e-5 (the smallest positive phi
    that concentration's zero fix can produce). peaked: q_i is its target prototype and every
    phi is 0.05, so the target's softmax weight is ~1 - 1e-4. pull: q_i moves that far towards
    its target prototype (a mix of top-1 hits and misses). duplicates: few clusters, ids
    repeated within and across the assignments and negatives."""
    n, d = shape.n, shape.d

    def unit(rows: int) -> Tensor:
        return F.normalize(torch.randn(rows, d, generator=gen, dtype=torch.float64), dim=1)

    protos = [unit(k) for k in shape.ks]
    phi = [(0.05 + 0.45 * torch.rand(k, generator=gen, dtype=torch.float64)).float()
           for k in shape.ks]
    assign = [torch.randint(0, k, (n,), generator=gen) for k in shape.ks]
    if duplicates:
        assign = [a % max(1, k // 3) for a, k in zip(assign, shape.ks)]
    negs = None
    if sampled:
        negs = [torch.randperm(k, generator=gen)[:min(shape.r, k)] for k in shape.ks]
        if duplicates:  # repeat ids and the batch's own positives: PCL's layout keeps them
            negs = [torch.cat([g, g[:2], a[:3]]) for g, a in zip(negs, assign)]
    for p, a, g in zip(phi, assign, negs or [None] * len(phi)):
        if tiny_phi:  # some assigned clusters and, in sampled mode, some negatives
            ids = torch.cat([a[:tiny_phi], g[:tiny_phi] if g is not None else a[-tiny_phi:]])
            p[ids] = 1e-5
    q = unit(n)
    if peaked:
        q = protos[0][assign[0]].clone()
        phi = [torch.full_like(p, 0.05) for p in phi]
    elif pull:
        q = F.normalize(q + pull * protos[0][assign[0]], dim=1)
    return ProtoInputs(q, unit(n), unit(shape.q), protos, phi, assign, negs)


def _place(t: Tensor, device: torch.device, dtype: torch.dtype, unaligned: bool) -> Tensor:
    if not unaligned:
        return t.to(device, dtype)
    # One element into a fresh buffer: the data start is not 16-byte aligned.
    buf = torch.empty(t.numel() + 1, device=device, dtype=dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


@dataclass
class Term:
    """One softmax cross-entropy of proto_nce, in float64: row i scores the columns
    ``[first_i] + cols`` (x_j already divided by T or phi_j) against ``target[i]``."""
    weight: float
    cols: Tensor             # [C, D]
    scale: Tensor            # [C]: 1/T or 1/phi_j
    target: Tensor           # [N] position among [first] + cols
    first: Optional[Tensor]  # [N, D]: the instance term's positive k_i / T


def terms_of(q: Tensor, k: Tensor, queue: Tensor, protos: Sequence[Tensor],
             phi: Sequence[Tensor], assign: Sequence[Tensor],
             negs: Optional[Sequence[Tensor]]) -> list[Term]:
    """The terms of proto_nce's documented maths (see its docstring), float64 inputs."""
    n = q.shape[0]
    inv_t = torch.full((queue.shape[0],), 1 / TEMPERATURE, dtype=q.dtype, device=q.device)
    terms = [Term(1.0, queue * inv_t[:, None], inv_t, torch.zeros(n, dtype=torch.long,
                                                                  device=q.device),
                  k / TEMPERATURE)]
    for m, (c, p, a) in enumerate(zip(protos, phi, assign)):
        ids = torch.arange(c.shape[0], device=q.device) if negs is None else torch.cat([a, negs[m]])
        target = a if negs is None else torch.arange(n, device=q.device)
        scale = 1 / p.double()[ids]
        terms.append(Term(1 / len(protos), c[ids] * scale[:, None], scale, target, None))
    return terms


@dataclass
class ProtoBounds:
    loss: float
    dq: Tensor
    dk: Tensor
    must_true: Tensor   # [terms, N]
    must_false: Tensor
    decisive: tuple[int, int]  # prototype-term flags that must be True / False


def proto_nce_bounds(q: Tensor, terms: Sequence[Term], mode: Mode, ref_loss: float,
                     ref_dq: Tensor, ref_dk: Tensor) -> ProtoBounds:
    """Elementwise error bounds of loss, dq, dk and the decided top-1 flags (module docstring)."""
    n, d = q.shape
    u = mode.u_acc
    dot_err = (LAMBDA * math.sqrt(d) + KAPPA) * u + 2 * mode.u_in
    absq = q.abs()
    rows = torch.arange(n, device=q.device)
    loss_tol, loss_abs = 0.0, 0.0
    dq_tol, dk_tol = torch.zeros_like(q), torch.zeros_like(q)
    must_true, must_false = [], []
    for t in terms:
        cols_abs = t.cols.abs()
        s = q @ t.cols.T                                         # N x C logits
        e = dot_err * (absq @ cols_abs.T)                        # N x C their error bounds
        if t.first is not None:
            s = torch.cat([(q * t.first).sum(1, keepdim=True), s], 1)
            e = torch.cat([dot_err * (absq * t.first.abs()).sum(1, keepdim=True), e], 1)
        off = 0 if t.first is None else 1

        def spread(w: Tensor) -> Tensor:  # sum_j w_ij |x_j|: N x D
            out = w[:, off:] @ cols_abs
            return out if t.first is None else out + w[:, :1] * t.first.abs()

        p = s.softmax(1)
        s_t, e_t, e_max = s[rows, t.target], e[rows, t.target], e.amax(1)
        e_bar = (p * e).sum(1)
        grow = torch.exp(2 * e_max)
        sum_err = (LAMBDA * math.sqrt(s.shape[1]) + KAPPA) * u
        lse = s.logsumexp(1)
        row = (torch.minimum(e_max, grow * e_bar) + e_t + sum_err
               + KAPPA * u * (lse.abs() + s_t.abs()))
        loss_tol += t.weight * row.mean().item()
        loss_abs += t.weight * (lse - s_t).abs().mean().item()

        dp = grow[:, None] * p * (e + e_bar[:, None] - 2 * p * e)  # |change of each weight|
        x_t = t.first.abs() if t.first is not None else cols_abs[t.target]
        a_all = spread(p) + x_t
        if mode.p_target_exact:
            p_rest = p.clone()
            p_rest[rows, t.target] = 0
            a_round = spread(p_rest)
        else:
            a_round = a_all
        floor = (cols_abs / t.scale[:, None]).sum(0) * max(1.0, t.scale.max().item())
        dq_tol += t.weight / n * (spread(dp) + (sum_err + len(terms) * u) * a_all
                                  + mode.u_p * a_round + mode.u_sub * floor)
        if t.first is not None:  # dk_i = w/N (p_i0 - 1) q_i / T
            dk_tol += t.weight / n * (dp[:, 0] + sum_err)[:, None] * absq / TEMPERATURE

        others = s.clone()
        others[rows, t.target] = -torch.inf
        s_max = others.amax(1)
        tie = 16 * mode.eps_tie * d * s_max.abs().clamp(min=1)
        must_true.append(s_t >= s_max)
        must_false.append(s_t < s_max - tie - e_t - e_max)
    loss_tol += (LAMBDA * math.sqrt(n * len(terms)) + KAPPA) * u * loss_abs
    loss_tol += rounding(mode.dtype, torch.tensor(ref_loss)).item()
    mt, mf = torch.stack(must_true), torch.stack(must_false)
    return ProtoBounds(loss_tol, dq_tol + rounding(mode.dtype, ref_dq),
                       dk_tol + rounding(mode.dtype, ref_dk), mt, mf,
                       (int(mt[1:].sum()), int(mf[1:].sum())))


def run_proto_nce(x: ProtoInputs, device: torch.device, mode: Mode, *,
                  unaligned: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The op on ``device`` in ``mode``: loss, dq, dk, correct."""
    def put(t: Tensor) -> Tensor:
        return _place(t, device, mode.dtype, unaligned)

    phi_dtype = torch.float64 if mode.dtype == torch.float64 else torch.float32
    q, k = put(x.q).requires_grad_(), put(x.k).requires_grad_()
    args = (put(x.queue), [put(c) for c in x.protos], [p.to(device, phi_dtype) for p in x.phi],
            [a.to(device) for a in x.assign],
            None if x.negs is None else [g.to(device) for g in x.negs])
    with float32_matmul(mode.tf32):
        loss, correct = ops.proto_nce_with_accuracy(q, k, *args, temperature=TEMPERATURE)
        dq, dk = torch.autograd.grad(loss, (q, k))
    return loss.detach(), dq, dk, correct


def check_proto_nce(x: ProtoInputs, device: torch.device, mode: Mode, *,
                    unaligned: bool = False, need_hits_and_misses: bool = False) -> Verdict:
    loss, dq, dk, correct = run_proto_nce(x, device, mode, unaligned=unaligned)
    # The reference on the values the kernel saw (inputs rounded to the dtype), in float64.
    vals = [t.to(device, mode.dtype).double() for t in (x.q, x.k, x.queue, *x.protos)]
    q64, k64 = vals[0].requires_grad_(), vals[1].requires_grad_()
    phi = [p.to(device).double() for p in x.phi]
    assign = [a.to(device) for a in x.assign]
    negs = None if x.negs is None else [g.to(device) for g in x.negs]
    ref = reference.proto_nce(q64, k64, vals[2], vals[3:], phi, assign, negs,
                              temperature=TEMPERATURE)
    ref_dq, ref_dk = torch.autograd.grad(ref, (q64, k64))
    with torch.no_grad():
        terms = terms_of(q64.detach(), k64.detach(), vals[2], vals[3:], phi, assign, negs)
        b = proto_nce_bounds(q64.detach(), terms, mode, ref.item(), ref_dq, ref_dk)
    v = Verdict()
    v.close("loss", loss, ref.detach(), b.loss)
    v.close("dq", dq, ref_dq, b.dq)
    v.close("dk", dk, ref_dk, b.dk)
    v.flags("correct", correct, b.must_true, b.must_false)
    if need_hits_and_misses and min(b.decisive) == 0:
        v.fail(f"inconclusive: {b.decisive[0]} decided hits and {b.decisive[1]} decided "
               "misses among the prototype terms")
    return v


def check_proto_nce_deterministic(x: ProtoInputs, device: torch.device, mode: Mode) -> Verdict:
    """Two runs on the same inputs give the same bits (on the CPU: 1 thread, then all)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        first = run_proto_nce(x, device, mode)
    finally:
        torch.set_num_threads(threads)
    second = run_proto_nce(x, device, mode)
    v = Verdict()
    for name, a, b in zip(("loss", "dq", "dk", "correct"), first, second):
        v.equal(name, b.double() if b.dtype == torch.bool else b,
                a.double() if a.dtype == torch.bool else a)
    return v


def check_proto_nce_limit(x: ProtoInputs, device: torch.device, mode: Mode) -> Verdict:
    """More clusterings than the CUDA kernel takes: a ValueError naming `prototypes`, or (if
    the limit was lifted) the right numbers."""
    try:
        return check_proto_nce(x, device, mode)
    except ValueError as exc:
        v = Verdict()
        if "prototypes" not in str(exc):
            v.fail(f"ValueError without the argument's name: {exc}")
        else:
            v.notes.append(f"refused: ValueError ({str(exc)[:60]}...)")
        return v


def proto_nce_cases(device: torch.device, quick: bool) -> list[Case]:
    dev = str(device)
    modes = proto_nce_modes(device)
    cases: list[Case] = []

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "proto_nce", name, run))

    grid = [("small", SMALL)] + ([] if quick else [("medium", MEDIUM)])
    for label, shape in grid:
        for m in (0, 1, 3):
            for sampled in (True, False):
                for mode in modes:
                    s = replace(shape, ks=shape.ks[:m])
                    add(f"{'sampled' if sampled else 'all'} M={m} {label} {mode.name}",
                        lambda g, s=s, sampled=sampled, mode=mode:
                        check_proto_nce(make_proto_inputs(s, sampled, g), device, mode))

    # The review's cases, every mode, both column layouts.
    review = [
        ("D=300 (>256)", Shape(20, 300, 64, (40, 90), 16), {}, {}),
        ("N=200 (4 row blocks)", Shape(200, 24, 64, (50, 300), 32), {}, {}),
        ("unaligned slices", Shape(10, 64, 40, (30, 50), 12), {}, dict(unaligned=True)),
        ("duplicate ids", Shape(12, 16, 20, (6, 9), 4), dict(duplicates=True), {}),
        ("correct vs argmax", Shape(48, 32, 60, (64, 128), 20), dict(pull=0.8),
         dict(need_hits_and_misses=True)),
        ("phi=1e-5", Shape(64, 64, 64, (40, 60), 16), dict(tiny_phi=2), {}),
        ("peaked softmax", Shape(32, 64, 128, (64, 256), 32), dict(peaked=True), {}),
        (f"M={CUDA_MAX_CLUSTERINGS}", Shape(8, 16, 16, tuple(3 + i % 7 for i in range(31)), 2),
         {}, {}),
    ]
    for label, shape, make_kw, check_kw in review:
        for sampled in (True, False):
            for mode in modes:
                add(f"{'sampled' if sampled else 'all'} {label} {mode.name}",
                    lambda g, shape=shape, sampled=sampled, mode=mode, mk=make_kw, ck=check_kw:
                    check_proto_nce(make_proto_inputs(shape, sampled, g, **mk), device,
                                    mode, **ck))
    if device.type == "cuda":
        cases.append(Case(dev, "proto_nce", "float64", None, "the CUDA kernel takes float32, "
                          "float16 and bfloat16"))
        limit = Shape(8, 16, 16, (4,) * (CUDA_MAX_CLUSTERINGS + 1), 2)
        add(f"all M={CUDA_MAX_CLUSTERINGS + 1} (over the limit) float32",
            lambda g: check_proto_nce_limit(make_proto_inputs(limit, False, g), device,
                                          modes[0]))
        if torch.cuda.device_count() > 1:
            other = torch.device("cuda", 1)
            add("sampled M=3 small float32 on cuda:1",
                lambda g: check_proto_nce(make_proto_inputs(SMALL, True, g), other, modes[0]))
        else:
            cases.append(Case(dev, "proto_nce", "sampled M=3 small float32 on cuda:1", None,
                              "one GPU visible"))
    for mode in modes:
        add(f"same bits twice: sampled M=3 medium {mode.name}",
            lambda g, mode=mode: check_proto_nce_deterministic(
                make_proto_inputs(MEDIUM, True, g), device, mode))
    if not quick:
        for sampled in (True, False):
            for mode in modes:
                name = f"{'sampled' if sampled else 'all'} M=3 PCL-size {mode.name}"
                if device.type == "cpu" and mode.dtype != torch.float32:
                    cases.append(Case(dev, "proto_nce", name, None, "PCL-size shapes run in "
                                      "float32 only on the CPU (minutes of float64 reference)"))
                    continue
                add(name, lambda g, sampled=sampled, mode=mode:
                    check_proto_nce(make_proto_inputs(PCL, sampled, g), device, mode))
    return cases


# ------------------------------------------------------------------------------ info_nce
@dataclass(frozen=True)
class NCEShape:
    n: int                  # rows (queries)
    k: int                  # columns (keys); ignored for SimCLR, where keys are the queries
    d: int
    simclr: bool = False    # queries is keys, 2 views: targets i +- n/2, exclude_self
    exclude_self: bool = False
    scale: float = 1.0      # the embeddings' norm: larger means more peaked softmaxes
    duplicates: bool = False  # every row's target is column 0

    def __str__(self) -> str:
        if self.simclr:
            return f"SimCLR 2N={self.n} D={self.d}"
        return f"N={self.n} K={self.k} D={self.d}" + (" no-self" if self.exclude_self else "")


def make_nce_inputs(shape: NCEShape, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Queries, keys (float64, CPU; the same tensor for SimCLR) and int64 targets."""
    def unit(rows: int) -> Tensor:
        return shape.scale * F.normalize(torch.randn(rows, shape.d, generator=gen,
                                                     dtype=torch.float64), dim=1)

    if shape.simclr:
        z = unit(shape.n)
        half = shape.n // 2
        return z, z, (torch.arange(shape.n) + half) % shape.n
    q, keys = unit(shape.n), unit(shape.k)
    if shape.duplicates:
        return q, keys, torch.zeros(shape.n, dtype=torch.long)
    if shape.exclude_self:  # any column but the row's own
        return q, keys, (torch.arange(shape.n) + torch.randint(1, shape.k, (shape.n,),
                                                                generator=gen)) % shape.k
    return q, keys, torch.randint(0, shape.k, (shape.n,), generator=gen)


def run_info_nce(q: Tensor, keys: Tensor, targets: Tensor, grad: Tensor, shape: NCEShape,
                 device: torch.device, mode: Mode):
    """The op on ``device`` in ``mode``: losses [N], the gradients of sum_i grad_i losses_i
    (queries, keys; for SimCLR one gradient, in both places) and correct."""
    qd = q.to(device, mode.dtype).requires_grad_()
    kd = qd if shape.simclr else keys.to(device, mode.dtype).requires_grad_()
    with float32_matmul(mode.tf32):
        losses, correct = ops.info_nce_with_accuracy(
            qd, kd, targets.to(device), temperature=TEMPERATURE,
            exclude_self=shape.simclr or shape.exclude_self, reduction="none")
        inputs = (qd,) if shape.simclr else (qd, kd)
        grads = torch.autograd.grad(losses, inputs, grad.to(device, losses.dtype))
    dq, dk = (grads[0], grads[0]) if shape.simclr else grads
    return losses.detach(), dq, dk, correct


def check_info_nce(shape: NCEShape, device: torch.device, mode: Mode,
                   gen: torch.Generator) -> Verdict:
    """Losses, both gradients and correct against reference.info_nce in float64, on the values
    the kernel saw, with the module docstring's bounds for s_ij = q_i k_j / T: per row,
    E_i = (LAMBDA sqrt(D) + KAPPA) u |q_i| max_j |k_j| / T (+ TF32's 2 u_in) bounds every
    logit's error; P_ij then errs by at most rel_i = exp(2 E_i) 3 E_i (the logit and the
    log-sum-exp it is shifted by) plus the sums' and the stored weights' roundings, relative.
    """
    q, keys, targets = make_nce_inputs(shape, gen)
    # The incoming gradient as the op sees it: in the losses' dtype, the inputs' one.
    g = torch.rand(shape.n, generator=gen, dtype=torch.float64).to(mode.dtype).double()
    losses, dq, dk, correct = run_info_nce(q, keys, targets, g, shape, device, mode)
    q64 = q.to(mode.dtype).double().requires_grad_()
    k64 = q64 if shape.simclr else keys.to(mode.dtype).double().requires_grad_()
    exclude = shape.simclr or shape.exclude_self
    ref = reference.info_nce(q64, k64, targets, TEMPERATURE, exclude, reduction="none")
    grads = torch.autograd.grad(ref, (q64,) if shape.simclr else (q64, k64), g)
    with torch.no_grad():
        qa, ka = q64.detach(), k64.detach()
        n, kk, d = qa.shape[0], ka.shape[0], qa.shape[1]
        u = mode.u_acc
        logits = qa @ ka.t() / TEMPERATURE
        if exclude:
            logits.fill_diagonal_(-torch.inf)
        p = torch.softmax(logits, dim=1)
        e = ((LAMBDA * math.sqrt(d) + KAPPA) * u + 2 * mode.u_in) * \
            qa.norm(dim=1, keepdim=True) * ka.norm(dim=1).max() / TEMPERATURE  # N x 1
        sums = lambda m: (LAMBDA * math.sqrt(m) + KAPPA) * u  # noqa: E731
        rel = torch.exp(2 * e) * 3 * e + sums(kk) + mode.u_p + 2 * mode.u_in  # N x 1
        k_t = ka[targets].abs() / TEMPERATURE
        spread_q = p @ ka.abs() / TEMPERATURE  # sum_j p_ij |k_j| / T: N x D
        s_t = logits.gather(1, targets[:, None])[:, 0]
        loss_tol = (2 * e[:, 0] + sums(kk) + rounding(mode.dtype, ref.detach())
                    + sums(1) * (ref.detach().abs() + s_t.abs()))
        dq_tol = g[:, None] * (rel * spread_q + (sums(1) + 2 * mode.u_in) * k_t)
        onehot = torch.zeros_like(p).scatter_(1, targets[:, None], 1.0)
        weight = g[:, None] * (rel * p + sums(n) * (p + onehot))  # N x K
        dk_tol = weight.t() @ qa.abs() / TEMPERATURE
        # correct: ties (within 16 eps D max(1, |s_max|)) and both logits' bounds are free.
        s_max = logits.max(dim=1).values
        slack = 16 * mode.eps_tie * d * s_max.abs().clamp(min=1) + 2 * e[:, 0]
    v = Verdict()
    v.close("losses", losses, ref.detach(), loss_tol)
    if shape.simclr:
        v.close("dz", dq, grads[0], dq_tol + dk_tol + rounding(mode.dtype, grads[0]))
    else:
        v.close("dq", dq, grads[0], dq_tol + rounding(mode.dtype, grads[0]))
        v.close("dk", dk, grads[1], dk_tol + rounding(mode.dtype, grads[1]))
    v.flags("correct", correct, s_t >= s_max, s_t < s_max - slack)
    return v


def check_info_nce_deterministic(shape: NCEShape, device: torch.device, mode: Mode,
                                 gen: torch.Generator) -> Verdict:
    """Two runs on the same inputs give the same bits (on the CPU: 1 thread, then all)."""
    q, keys, targets = make_nce_inputs(shape, gen)
    g = torch.rand(shape.n, generator=gen, dtype=torch.float64)
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        first = run_info_nce(q, keys, targets, g, shape, device, mode)
    finally:
        torch.set_num_threads(threads)
    second = run_info_nce(q, keys, targets, g, shape, device, mode)
    v = Verdict()
    for name, a, b in zip(("losses", "dq", "dk", "correct"), first, second):
        v.equal(name, b.double(), a.double())
    return v


def info_nce_cases(device: torch.device, quick: bool) -> list[Case]:
    dev, cases = str(device), []

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "info_nce", name, run))

    shapes = [NCEShape(6, 9, 13), NCEShape(1, 1, 8), NCEShape(64, 1, 32, simclr=True),
              NCEShape(40, 3000, 16), NCEShape(300, 320, 24, exclude_self=True),
              NCEShape(20, 50, 300), NCEShape(30, 200, 16, duplicates=True),
              NCEShape(32, 256, 64, scale=4.0)]
    if not quick:
        shapes += [NCEShape(2048, 1, 128, simclr=True), NCEShape(256, 65536, 128)]
    for shape in shapes:
        label = f"{shape}{' peaked' if shape.scale > 1 else ''}" + \
            (" same target" if shape.duplicates else "")
        for mode in proto_nce_modes(device):
            if (shape.n * max(shape.k, shape.n) > 10**7 and device.type == "cpu"
                    and mode.dtype != torch.float32):
                continue  # large shapes: float32 only on the CPU (the float64 reference)
            add(f"{label} {mode.name}",
                lambda g, shape=shape, mode=mode: check_info_nce(shape, device, mode, g))
    if device.type == "cuda":
        cases.append(Case(dev, "info_nce", "float64", None, "the CUDA kernel takes float32, "
                          "float16 and bfloat16"))
    for mode in proto_nce_modes(device):
        add(f"same bits twice: SimCLR 2N=600 D=64 {mode.name}",
            lambda g, mode=mode: check_info_nce_deterministic(
                NCEShape(600, 1, 64, simclr=True), device, mode, g))
    return cases


# ------------------------------------------------------------------------ momentum_update_
SHAPES_MOMENTUM = [(7, 3), (5,), (4, 3, 2, 2), (1,), (33, 17)]


def check_momentum(device: torch.device, dtypes: Sequence[torch.dtype], m: float, *,
                   module: bool = False, strided_key: bool = False,
                   shapes: Sequence[tuple[int, ...]] = SHAPES_MOMENTUM,
                   gen: torch.Generator) -> Verdict:
    """momentum_update_ on pairs of tensors (dtype i % len(dtypes) for pair i) against MoCo's
    loop in float64: key <- m key + (1 - m) query."""
    keys64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    queries64 = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    dts = [dtypes[i % len(dtypes)] for i in range(len(shapes))]
    keys = [k.to(device, dt) for k, dt in zip(keys64, dts)]
    if strided_key:  # the same values in transposed storage: updated where they lie
        keys = [k.t().contiguous().t() if k.dim() == 2 else k for k in keys]
    queries = [q.to(device, dt) for q, dt in zip(queries64, dts)]
    k0 = [k.double() for k in keys]  # the values the op starts from
    where = [k.data_ptr() for k in keys]
    q0 = [q.double() for q in queries]
    want = [k.clone() for k in k0]
    reference.moco_momentum_update_(want, q0, m)
    if module:
        key_mod, query_mod = torch.nn.ParameterList(keys), torch.nn.ParameterList(queries)
        ops_args = (key_mod, query_mod)
    else:
        ops_args = (keys, queries)
    pcl_ext.momentum_update_(*ops_args, m)
    got = list(key_mod.parameters()) if module else keys
    v = Verdict()
    for i, (g, w, k, q, dt) in enumerate(zip(got, want, k0, q0, dts)):
        u_c = unit_roundoff(torch.float64 if dt == torch.float64 else torch.float32)
        tol = rounding(dt, w) + 4 * u_c * (m * k.abs() + (1 - m) * q.abs())
        v.close(f"key[{i}]", g, w, tol)
    if [g.data_ptr() for g in got] != where:  # dense keys are updated where they lie
        v.fail("a key tensor was moved instead of updated in place")
    return v


def momentum_cases(device: torch.device, quick: bool) -> list[Case]:
    dev, cases = str(device), []
    dtypes = (torch.float64, torch.float32, torch.float16, torch.bfloat16)

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "momentum_update_", name, run))

    for dt in dtypes:
        add(f"m=0.999 5 tensors {str(dt)[6:]}",
            lambda g, dt=dt: check_momentum(device, [dt], 0.999, gen=g))
    for m in (0.0, 1.0, 0.9):
        add(f"m={m} 5 tensors float32", lambda g, m=m: check_momentum(device, [torch.float32], m,
                                                                    gen=g))
    add("m=0.99 mixed dtypes per pair", lambda g: check_momentum(device, dtypes, 0.99, gen=g))
    add("m=0.999 nn.Module", lambda g: check_momentum(device, [torch.float32], 0.999,
                                                   module=True, gen=g))
    add("m=0.999 transposed keys", lambda g: check_momentum(device, [torch.float32], 0.999,
                                                         strided_key=True, gen=g))
    if not quick:
        add("m=0.999 3M params float32", lambda g: check_momentum(
            device, [torch.float32], 0.999, shapes=[(1024, 1024), (2048, 1000), (1000,)],
            gen=g))
    return cases


# ----------------------------------------------------------------------- ring_enqueue_
def check_ring(device: torch.device, dtype: torch.dtype, size: int, dim: int, ptr: int,
               batches: Sequence[int], *, strided_keys: bool = False, module: bool = False,
               gen: torch.Generator) -> Verdict:
    """Enqueue batches one after the other; the buffer and pointer must be exactly those of
    enqueueing the rows one at a time (pcl_ext.reference.enqueue_rows)."""
    start = torch.randn(size, dim, generator=gen, dtype=torch.float64).to(dtype)
    want, want_ptr = start.double(), ptr
    if module:
        queue = pcl_ext.RingQueue(size, dim, dtype=dtype, device=device)
        queue.buffer.copy_(start)
        queue.ptr.fill_(ptr)
        buffer, ptr_t = queue.buffer, queue.ptr
    else:
        buffer = start.to(device)
        ptr_t = torch.tensor(ptr, device=device)
    for b in batches:
        keys = torch.randn(b, dim, generator=gen, dtype=torch.float64).to(dtype)
        want, want_ptr = reference.enqueue_rows(want, want_ptr, keys.double())
        keys = keys.to(device)
        if strided_keys:
            keys = keys.t().contiguous().t()
        if module:
            queue.enqueue_(keys)
        else:
            ops.ring_enqueue_(buffer, ptr_t, keys)
    v = Verdict()
    v.equal("buffer", buffer, want)
    v.equal("ptr", ptr_t.reshape(()), torch.tensor(want_ptr, dtype=torch.float64))
    return v


def ring_cases(device: torch.device, quick: bool) -> list[Case]:
    dev, cases = str(device), []

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "ring_enqueue_", name, run))

    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        add(f"wrap: size 7 ptr 5, B=4,7,17,0,3 {str(dt)[6:]}",
            lambda g, dt=dt: check_ring(device, dt, 7, 5, 5, (4, 7, 17, 0, 3), gen=g))
    add("size 7 ptr 2, transposed keys float32",
        lambda g: check_ring(device, torch.float32, 7, 5, 2, (6, 9), strided_keys=True, gen=g))
    add("RingQueue.enqueue_ size 10 ptr 8 float32",
        lambda g: check_ring(device, torch.float32, 10, 4, 8, (3, 12, 5), module=True, gen=g))
    if not quick:
        add("size 16384x128 ptr 16300, B=256 x3 float32",
            lambda g: check_ring(device, torch.float32, 16384, 128, 16300, (256, 256, 256),
                               gen=g))
    return cases


# --------------------------------------------------------------------------- concentration
def check_concentration(device: torch.device, dtype: torch.dtype, n: int, k: int, *,
                        column: bool = False, gen: torch.Generator) -> Verdict:
    """concentration against PCL's loop (pcl_ext.reference.pcl_concentration) in float64 on the
    same values. Distances are positive, so PCL's phi is positive and finite."""
    ids = torch.randint(0, k, (n,), generator=gen)
    dist = (0.01 + torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)
    want = torch.from_numpy(reference.pcl_concentration(
        dist.double().numpy()[:, None], ids.numpy()[:, None], k, TEMPERATURE))
    shape = (n, 1) if column else (n,)
    args = (dist.reshape(shape).to(device), ids.reshape(shape).to(device), k)
    got = pcl_ext.concentration(*args, temperature=TEMPERATURE)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    u64 = unit_roundoff(torch.float64)
    tol = (rounding(out, want)
           + 4 * (LAMBDA * math.sqrt(n) + KAPPA) * u64 * want.abs().max())
    v = Verdict()
    if got.dtype != out:
        v.fail(f"dtype {got.dtype}, documented {out}")
    v.close("phi", got, want, tol)
    v.equal("second run", pcl_ext.concentration(*args, temperature=TEMPERATURE), got)
    return v


def concentration_cases(device: torch.device, quick: bool) -> list[Case]:
    dev, cases = str(device), []

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "concentration", name, run))

    for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        add(f"n=2000 K=100 {str(dt)[6:]}",
            lambda g, dt=dt: check_concentration(device, dt, 2000, 100, gen=g))
    add("n=30 K=50 (empty, 1-point clusters) float32",
        lambda g: check_concentration(device, torch.float32, 30, 50, gen=g))
    add("n=500 K=40 faiss-shaped [n, 1] float32",
        lambda g: check_concentration(device, torch.float32, 500, 40, column=True, gen=g))
    if not quick:
        add("n=200000 K=10000 float32",
            lambda g: check_concentration(device, torch.float32, 200_000, 10_000, gen=g))
    return cases


# ------------------------------------------------------------------------ sample_negatives
def check_sample_negatives(device: torch.device, n: int, k: int, r: Optional[int], *,
                           duplicates: bool = False, gen: torch.Generator) -> Verdict:
    """r ids: int64 on the device, distinct, free (no row's cluster), in [0, K), increasing;
    the same generator state gives the same ids. r=None: every free cluster."""
    assign = torch.randint(0, max(1, k // 4) if duplicates else k, (n,), generator=gen)
    free = sorted(set(range(k)) - set(assign.tolist()))
    r = len(free) if r is None else r
    seed = int(torch.randint(0, 2**62, (1,), generator=gen))
    draws = []
    for _ in range(2):
        g = torch.Generator(device).manual_seed(seed)
        draws.append(pcl_ext.sample_negatives(assign.to(device), k, r, generator=g))
    ids = draws[0]
    v = Verdict()
    if ids.dtype != torch.long or ids.device.type != device.type or ids.shape != (r,):
        v.fail(f"got {ids.dtype} {tuple(ids.shape)} on {ids.device}, want int64 ({r},) "
               f"on {device}")
        return v
    got = ids.cpu().tolist()
    taken = set(assign.tolist())
    checks = {"distinct": len(set(got)) == r, "in range": all(0 <= i < k for i in got),
              "free": not (set(got) & taken), "increasing": got == sorted(got)}
    for what, ok in checks.items():
        if not ok:
            v.fail(f"ids not {what}")
    if r == len(free) and got != free:
        v.fail("r = every free cluster, but the ids are not all of them")
    v.equal("second draw, same seed", draws[1], ids)
    v.notes.append(f"{r} ids distinct, free, in range, increasing")
    return v


def check_sample_negatives_uniform(device: torch.device, draws: int,
                                   gen: torch.Generator) -> Verdict:
    """Each free cluster is drawn with probability r / F: its count over the draws is
    Binomial(draws, r / F); every z-score must stay within 6 (p < 2e-9 per cluster)."""
    k, n, r = 30, 10, 5
    assign = torch.randint(0, k, (n,), generator=gen)
    free = sorted(set(range(k)) - set(assign.tolist()))
    g = torch.Generator(device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
    a = assign.to(device)
    counts = torch.zeros(k, dtype=torch.float64, device=device)
    for _ in range(draws):
        counts.index_add_(0, pcl_ext.sample_negatives(a, k, r, generator=g),
                          torch.ones(r, dtype=torch.float64, device=device))
    pi = r / len(free)
    z = (counts[free].cpu() - draws * pi) / math.sqrt(draws * pi * (1 - pi))
    v = Verdict()
    v.close("z-score", z, torch.zeros_like(z), 6.0)
    return v


def sample_negatives_cases(device: torch.device, quick: bool) -> list[Case]:
    dev, cases = str(device), []

    def add(name: str, run: Callable[[torch.Generator], Verdict]) -> None:
        cases.append(Case(dev, "sample_negatives", name, run))

    add("N=6 K=20 r=5", lambda g: check_sample_negatives(device, 6, 20, 5, gen=g))
    add("N=6 K=20 r=every free", lambda g: check_sample_negatives(device, 6, 20, None, gen=g))
    add("N=6 K=20 r=0", lambda g: check_sample_negatives(device, 6, 20, 0, gen=g))
    add("N=40 K=20 duplicate ids r=every free",
        lambda g: check_sample_negatives(device, 40, 20, None, duplicates=True, gen=g))
    draws = 2000 if quick else 20000
    add(f"uniform over {draws} draws (K=30 N=10 r=5)",
        lambda g: check_sample_negatives_uniform(device, draws, g))
    if not quick:
        add("N=256 K=25000 r=16384 (PCL)",
            lambda g: check_sample_negatives(device, 256, 25000, 16384, gen=g))
    return cases


OPS = {"proto_nce": proto_nce_cases, "info_nce": info_nce_cases,
       "momentum_update_": momentum_cases,
       "ring_enqueue_": ring_cases, "concentration": concentration_cases,
       "sample_negatives": sample_negatives_cases}


# ---------------------------------------------------------------------------------- --bench
def median_seconds(fn: Callable[[], object], device: torch.device, repeats: int = 5,
                   calls: int = 1) -> float:
    """Median over ``repeats`` of the seconds per call of ``calls`` back-to-back calls, after
    one untimed call; the device is synchronized around each repeat."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        times.append((time.perf_counter() - start) / calls)
    return float(np.median(times))


def bench_lines(device: torch.device, gen: torch.Generator) -> Iterator[str]:
    """One speed ratio per op against its eager reference, same inputs, same device."""
    x = make_proto_inputs(PCL, True, gen)
    q = x.q.float().to(device).requires_grad_()
    args = (x.k.float().to(device), x.queue.float().to(device),
            [c.float().to(device) for c in x.protos], [p.to(device) for p in x.phi],
            [a.to(device) for a in x.assign], [g.to(device) for g in x.negs])

    def step(loss_fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            q.grad = None
            loss_fn(q, *args, temperature=TEMPERATURE).backward()
        return run

    with float32_matmul(False):
        yield _ratio("proto_nce", "sampled M=3 PCL-size float32, forward+backward",
                     median_seconds(step(pcl_ext.proto_nce), device),
                     median_seconds(step(reference.proto_nce), device))

    z = F.normalize(torch.randn(2048, 128, generator=gen), dim=1).to(device).requires_grad_()
    views = ((torch.arange(2048) + 1024) % 2048).to(device)

    def nt_xent(loss_fn: Callable[..., Tensor]) -> Callable[[], None]:
        def run() -> None:
            z.grad = None
            loss_fn(z, z, views, temperature=0.5, exclude_self=True).backward()
        return run

    with float32_matmul(False):
        yield _ratio("info_nce", "SimCLR batch 1024 (2N=2048) D=128 float32, fwd+bwd",
                     median_seconds(nt_xent(pcl_ext.info_nce), device),
                     median_seconds(nt_xent(reference.info_nce), device))

    keys = [torch.randn(64, 1024, generator=gen).to(device) for _ in range(160)]  # 10.5M
    queries = [torch.randn(64, 1024, generator=gen).to(device) for _ in range(160)]
    yield _ratio("momentum_update_", "160 tensors, 10.5M float32 params",
                 median_seconds(lambda: pcl_ext.momentum_update_(keys, queries, 0.999), device),
                 median_seconds(lambda: reference.moco_momentum_update_(keys, queries, 0.999),
                                device), "MoCo's loop")

    buffer = torch.randn(16384, 128, generator=gen).to(device)
    moco_queue = buffer.t().contiguous()  # MoCo's [dim, size] layout
    ptr, batch = torch.zeros((), dtype=torch.long, device=device), buffer[:256].clone()
    yield _ratio("ring_enqueue_", "16384 x 128, B=256",
                 median_seconds(lambda: ops.ring_enqueue_(buffer, ptr, batch), device, calls=100),
                 median_seconds(lambda: reference.moco_dequeue_and_enqueue_(moco_queue, 0, batch),
                                device, calls=100), "MoCo's _dequeue_and_enqueue")

    ids = torch.randint(0, 10_000, (100_000,), generator=gen)
    dist = torch.rand(100_000, generator=gen)
    ids_d, dist_d = ids.to(device), dist.to(device)
    yield _ratio("concentration", "n=100k K=10k",
                 median_seconds(lambda: pcl_ext.concentration(dist_d, ids_d, 10_000), device),
                 median_seconds(lambda: reference.pcl_concentration(
                     dist.numpy()[:, None], ids.numpy()[:, None], 10_000), device, repeats=3),
                 "PCL's loop")

    pos = x.assign[0].to(device)
    g_dev = torch.Generator(device).manual_seed(0)
    rng = random.Random(0)
    yield _ratio("sample_negatives", "N=256 K=25000 r=16384",
                 median_seconds(lambda: pcl_ext.sample_negatives(pos, 25000, 16384, g_dev),
                                device),
                 median_seconds(lambda: reference.pcl_sample_negatives(pos, 25000, 16384, rng),
                                device), "PCL's set difference")


def _ratio(op: str, what: str, ours: float, ref: float, ref_name: str = "eager reference"
           ) -> str:
    return (f"{op:17} {what}: {ours * 1e3:.3g} ms vs {ref_name} {ref * 1e3:.3g} ms, "
            f"{ref / ours:.2f}x")


# ------------------------------------------------------------------------------ build info
def find_cuobjdump() -> Optional[str]:
    """cuobjdump from PATH, CUDA_HOME, /usr/local/cuda or Triton's package (which ships one)."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    places = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"]
    try:
        import triton  # noqa: PLC0415  (optional: only its bundled tool is wanted)
        places.append(str(Path(triton.__file__).parent / "backends" / "nvidia"))
    except ImportError:
        pass
    for place in places:
        tool = Path(place) / "bin" / "cuobjdump"
        if place and tool.is_file() and os.access(tool, os.X_OK):
            return str(tool)
    return None


def built(name: str, default: object = None) -> object:
    """A field of the build record setup.py writes (pcl_ext/_build_info.py), or ``default``."""
    return getattr(getattr(pcl_ext, "_build_info", None), name, default)


def compiled_archs(library: Optional[str]) -> tuple[str, Optional[tuple[list[int], list[int]]]]:
    """The GPU code in pcl_ext's library, read with cuobjdump: a description, and the sm
    numbers of its cubins and PTX (None when unknown)."""
    if not built("WITH_CUDA", True):
        return "none (built without the CUDA kernels)", ([], [])
    tool = find_cuobjdump()
    if library is None or tool is None:
        return f"unknown ({'library not found' if library is None else 'no cuobjdump'})", None
    found = []
    for kind, suffix in (("elf", "cubin"), ("ptx", "ptx")):
        out = subprocess.run([tool, f"--list-{kind}", library], capture_output=True, text=True,
                             timeout=120)
        found.append(sorted({int(a) for a in re.findall(rf"\.sm_(\d+)a?\.{suffix}", out.stdout)}))
    cubins, ptx = found
    text = (f"cubin {' '.join(f'sm_{a}' for a in cubins) or 'none'}; "
            f"PTX {' '.join(f'sm_{a}' for a in ptx) or 'none'} (cuobjdump {tool})")
    return text, (cubins, ptx)


def runs_on(archs: Optional[tuple[list[int], list[int]]], major: int, minor: int) -> str:
    """Which of the library's GPU code a device of compute capability major.minor runs."""
    if archs is None:
        return "unknown"
    cubins, ptx = archs
    cc = 10 * major + minor
    # A cubin runs on its own major version at an equal or higher minor one; PTX is compiled
    # by the driver for any equal or newer device.
    same = [a for a in cubins if a // 10 == major and a <= cc]
    if same:
        return f"runs sm_{max(same)} machine code"
    older = [a for a in ptx if a <= cc]
    return (f"runs PTX of sm_{max(older)}, compiled by the driver at load" if older
            else "NO CODE FOR THIS GPU: rebuild with TORCH_CUDA_ARCH_LIST including "
            f"{major}.{minor}")


def library_path() -> Optional[str]:
    path = getattr(getattr(pcl_ext, "_C", None), "__file__", None)
    if path:
        return path
    found = sorted(Path(pcl_ext.__file__).parent.glob("_C*.so"))
    return str(found[0]) if found else None


def build_lines() -> list[str]:
    archs_text, archs = compiled_archs(library_path())
    lines = [f"pcl_ext {pcl_ext.__version__} ({Path(pcl_ext.__file__).parent})",
             f"built against torch {built('TORCH_VERSION', 'unknown')}, CUDA kernels: "
             f"{'yes' if built('WITH_CUDA') else 'no'}",
             f"running torch {torch.__version__}, CUDA toolkit {torch.version.cuda or 'none'}, "
             f"torch's archs: {' '.join(torch.cuda.get_arch_list()) or 'none'}",
             f"pcl_ext's GPU code: {archs_text}",
             f"CPU: {_cpu_name()}, {torch.get_num_threads()} torch threads"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"cuda:{i}: {p.name}, compute capability {p.major}.{p.minor}, "
                         f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs; "
                         f"pcl_ext {runs_on(archs, p.major, p.minor)}")
    else:
        lines.append("GPUs: none visible")
    return lines


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        return f"{names[0]} ({len(names)} logical cores)"
    except (OSError, IndexError):
        import platform  # noqa: PLC0415
        return platform.processor() or "unknown"


def cuda_unavailable() -> Optional[str]:
    """Why the CUDA cases cannot run here, or None."""
    if not built("WITH_CUDA", True):
        return "pcl_ext was built without its CUDA kernels"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    if not torch.cuda.is_available():
        return "no CUDA device visible"
    return None


# ------------------------------------------------------------------------------------ main
def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pcl_ext.check",
                                description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small shapes and the review's cases only (the default also runs "
                   "medium and PCL-size shapes)")
    p.add_argument("--device", choices=("cpu", "cuda", "all"), default="all")
    p.add_argument("--op", action="append", choices=sorted(OPS),
                   help="only this op (repeatable; default: all)")
    p.add_argument("--only", metavar="REGEX", help="only the cases whose line (device, op, "
                   "name) matches, e.g. 'cuda.*proto_nce.*peaked'")
    p.add_argument("--bench", action="store_true",
                   help="also time each op against its eager reference")
    p.add_argument("--seed", type=int, help="inputs' seed (default: a fresh one, printed)")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    seed = args.seed if args.seed is not None else int.from_bytes(os.urandom(4), "little")
    for line in build_lines():
        print(f"# {line}")
    print(f"# seed {seed}; tolerances: LAMBDA={LAMBDA}, KAPPA={KAPPA} (see the module docstring)")
    start = time.perf_counter()
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}

    def report(status: str, device: str, op: str, name: str, detail: str) -> None:
        counts[status] += 1
        print(f"{status}  {device:6} {op:17} {name:44} {detail}", flush=True)

    devices = [torch.device("cpu")] if args.device in ("cpu", "all") else []
    if args.device in ("cuda", "all"):
        reason = cuda_unavailable()
        if reason:
            report("SKIP", "cuda", "*", "every CUDA case", reason)
        else:
            devices.append(torch.device("cuda"))
    bench = []
    for device in devices:
        for op in args.op or list(OPS):
            for case in OPS[op](device, args.quick):
                if args.only and not re.search(args.only, f"{case.device} {case.op} {case.name}"):
                    continue
                if case.run is None:
                    report("SKIP", case.device, case.op, case.name, case.skip_reason)
                    continue
                key = f"{seed}/{case.device}/{case.op}/{case.name}".encode()
                gen = torch.Generator().manual_seed(zlib.crc32(key))
                try:
                    status, detail = case.run(gen).line()
                except Exception as exc:  # a crash is a failure of this case, not of the check
                    status, detail = "FAIL", f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                report(status, case.device, case.op, case.name, detail)
        if args.bench:
            bench += [f"{device.type:6} {line}"
                      for line in bench_lines(device, torch.Generator().manual_seed(seed))]
    if bench:
        print("# speed, median of 5 (ring_enqueue_: of 5 x 100 calls), same inputs, this machine:")
        for line in bench:
            print(f"BENCH {line}")
    ran = counts["PASS"] + counts["FAIL"]
    print(f"# pcl_ext.check: {counts['PASS']} passed, {counts['FAIL']} failed, {counts['SKIP']} "
          f"skipped in {time.perf_counter() - start:.1f} s; repeat with --seed {seed}")
    return 1 if counts["FAIL"] else (0 if ran else 2)


if __name__ == "__main__":
    sys.exit(main())
