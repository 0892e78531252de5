"""pcl_ext.proto_nce against the float64 reference, plus autograd, opcheck, compile, bad input."""
import contextlib
import os

import pytest
import torch
import torch.nn.functional as F

import pcl_ext
from pcl_ext import reference

from conftest import cuda_only, two_gpus_only


@contextlib.contextmanager
def float32_matmul(precision):
    """torch.set_float32_matmul_precision(precision) ("highest": IEEE float32, "high": TF32,
    which the CUDA kernel follows) for the block, or "3xtf32": "highest" with the CUDA kernel's
    PCL_EXT_FLOAT32_MATH=3xtf32; the previous global and CUDA settings after."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
              os.environ.get("PCL_EXT_FLOAT32_MATH"))
    torch.set_float32_matmul_precision("highest" if precision == "3xtf32" else precision)
    os.environ.pop("PCL_EXT_FLOAT32_MATH", None)
    if precision == "3xtf32":
        os.environ["PCL_EXT_FLOAT32_MATH"] = "3xtf32"
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before[0])
        torch.backends.cuda.matmul.fp32_precision = before[1]
        os.environ.pop("PCL_EXT_FLOAT32_MATH", None)
        if before[2] is not None:
            os.environ["PCL_EXT_FLOAT32_MATH"] = before[2]


def sample_inputs(device="cpu", dtype=torch.float32, n=6, d=13, q_len=11, ks=(5, 9, 4),
                  r=3, sampled=True, k_grad=True, phi_range=(0.05, 0.5), seed=None):
    """Unit-norm embeddings like PCL's; fresh random values unless a seed is given."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)

    def unit(*shape):
        return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1)

    def cast(t):
        return t.to(device=device, dtype=dtype)

    q = cast(unit(n, d)).requires_grad_()
    k = cast(unit(n, d)).requires_grad_(k_grad)
    queue = cast(unit(q_len, d))
    protos = [cast(unit(kk, d)) for kk in ks]
    lo, hi = phi_range
    phi = [(lo + (hi - lo) * torch.rand(kk, generator=gen, dtype=torch.float64)).to(device)
           .float() for kk in ks]
    assign = [torch.randint(0, kk, (n,), generator=gen).to(device) for kk in ks]
    negs = None
    if sampled:
        negs = [torch.randperm(kk, generator=gen)[:min(r, kk)].to(device) for kk in ks]
    return q, k, queue, protos, phi, assign, negs


def reference_f64(q, k, queue, protos, phi, assign, negs, temperature=0.2):
    """Loss and (dq, dk) of the reference evaluated in float64 on the same values."""
    q64 = q.detach().double().requires_grad_()
    k64 = k.detach().double().requires_grad_()
    loss = reference.proto_nce(q64, k64, queue.double(), [c.double() for c in protos],
                               [p.double() for p in phi], assign, negs, temperature=temperature)
    dq, dk = torch.autograd.grad(loss, (q64, k64))
    return loss.detach(), dq, dk


def reference_terms(q, k, queue, protos, phi, assign, negs, temperature=0.2):
    """Each softmax term in float64, materialized: (weight, logits [N, C], target column [N],
    scaled columns x_j s_j [C, D], column ids [C]). The instance term's columns are
    [k_0 .. k_{N-1}, queue]: row i sees only its own key (the other keys' logits are -inf)."""
    q, k = q.detach().double().cpu(), k.detach().double().cpu()
    n = q.shape[0]
    rows = torch.arange(n)
    cols = torch.cat([k, queue.double().cpu()]) / temperature
    logits = q @ cols.t()
    own = torch.ones(n, n, dtype=torch.bool)
    own[rows, rows] = False
    logits[:, :n][own] = -torch.inf
    yield 1.0, logits, rows, cols, torch.arange(len(cols))
    for m, (c, p, a) in enumerate(zip(protos, phi, assign)):
        c, p, a = c.double().cpu(), p.double().cpu(), a.cpu()
        ids = torch.arange(len(c)) if negs is None else torch.cat([a, negs[m].cpu()])
        cols = c[ids] / p[ids, None]
        yield 1.0 / len(protos), q @ cols.t(), a if negs is None else rows, cols, ids


def kernel_units(device, dtype):
    """The kernel's arithmetic on this device: unit roundoffs of the GEMM inputs (u_in: TF32
    rounds q and the columns; 3xTF32 leaves 2^-22 of each and drops a product as small), of
    the float32 or float64 accumulators (u_acc, doubled on tensor cores, whose adders may
    truncate), of P = softmax * scale as the second GEMM reads it (u_p) and of the output
    dtype (u_out); and whether each row's target column is kept out of P (CUDA) or inside it
    (the CPU, which computes half precision in float32)."""
    u_out = torch.finfo(dtype).eps / 2
    u32 = torch.finfo(torch.float32).eps / 2
    if torch.device(device).type == "cpu":
        u = torch.finfo(torch.float64).eps / 2 if dtype == torch.float64 else u32
        return dict(u_in=0.0, u_acc=u, u_p=u, u_out=u_out, target_apart=False)
    units = dict(u_in=0.0, u_acc=u32, u_p=u32, u_out=u_out, target_apart=True)
    if torch.cuda.get_device_capability(device)[0] < 8:  # FFMA in float32 for every dtype
        return units
    if dtype != torch.float32:
        return dict(units, u_acc=2 * u32, u_p=u_out)
    if torch.backends.cuda.matmul.fp32_precision == "tf32":
        return dict(units, u_in=2.0**-11, u_acc=2 * u32, u_p=2.0**-11)
    if os.environ.get("PCL_EXT_FLOAT32_MATH") == "3xtf32":
        return dict(units, u_in=2.0**-21, u_acc=2 * u32, u_p=2.0**-21)
    return units


def error_bound(inputs, temperature=0.2):
    """(reference, tolerance) for the loss, dq and dk: the float64 reference and a bound on
    |kernel - reference|, to first order in the roundings of kernel_units. For each term (C
    columns, p = softmax, t = target, weight w / N):

    * a logit (q.x_j) s_j is off by at most (2 u_in + (D + 2) u_acc) |q| |x_j| s_j (D products
      and sums, then the scale; Cauchy-Schwarz bounds sum_c |q_c x_jc|), and its exp by a few
      ulps (4 u_acc): together e_j, in log p_j's units;
    * so log p_j moves by at most r_j = sum_{k != j} p_k (e_j + e_k), and lse - s_t by r_t;
    * dq = sum_{j != t} p_j x_j s_j - (1 - p_t) x_t s_t with the target apart (CUDA): rounding
      P and X for the second GEMM and summing C columns costs (u_p + u_in + (C + 2) u_acc)
      A(p), the logits' errors A(p r), where A(w) = sum_{j != t} w_j (|x_j| s_j + |x_t| s_t);
      dq = sum_j p_j x_j s_j - x_t s_t with the target inside P (the CPU, autograd on the
      reference): the same over every column, plus the subtraction's rounding of x_t s_t;
    * dk = -(1 - p_t) q / T moves with 1 - p_t = sum_{j != t} p_j;
    * each output is rounded once to its dtype (u_out), with the dtype's subnormal spacing as
      the absolute floor;
    * and the reference has its own float64 rounding, by the same model."""
    q = inputs[0]
    kernel = rounding_bounds(inputs, kernel_units(q.device, q.dtype), temperature)
    ref_own = rounding_bounds(inputs, kernel_units("cpu", torch.float64), temperature)
    floor = torch.finfo(q.dtype).tiny * torch.finfo(q.dtype).eps
    u_out = kernel_units(q.device, q.dtype)["u_out"]
    return [(ref, tol + own + u_out * ref.abs() + floor)
            for ref, tol, own in zip(reference_f64(*inputs, temperature=temperature), kernel,
                                     ref_own)]


def rounding_bounds(inputs, units, temperature):
    """error_bound's first-order bounds on (loss, dq, dk) computed with kernel_units' `units`,
    each row's target column apart or inside P."""
    q = inputs[0]
    n, d = q.shape
    u_acc = units["u_acc"]
    q64 = q.detach().double().cpu()
    loss_tol, dq_tol, dk_tol = 0.0, 0.0, 0.0
    terms = reference_terms(*inputs, temperature=temperature)
    for term, (weight, logits, target, cols, _) in enumerate(terms):
        coef, c = weight / n, logits.shape[1]
        sums = units["u_p"] + units["u_in"] + (c + 2) * u_acc
        p = torch.softmax(logits, dim=1)
        e = (2 * units["u_in"] + (d + 2) * u_acc) * q64.norm(dim=1, keepdim=True) * cols.norm(dim=1)
        e = e + 4 * u_acc
        r = e * (1 - 2 * p) + (p * e).sum(1, keepdim=True)
        x_t = cols[target].abs()
        loss_tol += coef * float((r.gather(1, target[:, None]) + (c + 2) * u_acc).sum())
        if units["target_apart"]:
            others = p.scatter(1, target[:, None], 0.0)

            def spread(w):
                return coef * (w @ cols.abs() + w.sum(1, keepdim=True) * x_t)

            dq_tol = dq_tol + sums * spread(others) + spread(others * r)
            dp_t = (others * r).sum(1, keepdim=True) + (c + 2) * u_acc * others.sum(1, keepdim=True)
        else:
            dq_tol = dq_tol + coef * (sums * (p @ cols.abs() + x_t) + (p * r) @ cols.abs())
            p_t = p.gather(1, target[:, None])
            dp_t = p_t * r.gather(1, target[:, None]) + (c + 3) * u_acc
        if term == 0:  # the instance term: dk = -(1 - p_t) q / T
            dk_tol = coef / temperature * dp_t * q64.abs()
    return loss_tol, dq_tol, dk_tol


def fused(q, k, queue, protos, phi, assign, negs, temperature=0.2):
    loss = pcl_ext.proto_nce(q, k, queue, protos, phi, assign, negs, temperature=temperature)
    grads = torch.autograd.grad(loss, (q, k) if k.requires_grad else (q,))
    return loss.detach(), grads[0], grads[1] if k.requires_grad else None


def assert_matches(inputs, atol, rtol, temperature=0.2):
    loss, dq, dk = fused(*inputs, temperature=temperature)
    ref_loss, ref_dq, ref_dk = reference_f64(*inputs, temperature=temperature)
    torch.testing.assert_close(loss.double(), ref_loss, atol=atol, rtol=rtol)
    torch.testing.assert_close(dq.double(), ref_dq, atol=atol, rtol=rtol)
    if dk is not None:
        torch.testing.assert_close(dk.double(), ref_dk, atol=atol, rtol=rtol)


# Measured on the CPU (float32 / float64 arithmetic), tighter than error_bound's worst case.
CPU_TOL = {torch.float64: (1e-12, 1e-10), torch.float32: (2e-6, 1e-5)}


def assert_accurate(inputs, temperature=0.2):
    """The kernel's loss, dq and dk against the float64 reference: within error_bound on every
    device, and within CPU_TOL on the CPU in float32 / float64."""
    got = fused(*inputs, temperature=temperature)
    device, dtype = inputs[0].device, inputs[0].dtype
    fixed = CPU_TOL.get(dtype) if device.type == "cpu" else None
    for name, value, (want, tol) in zip(("loss", "dq", "dk"), got,
                                        error_bound(inputs, temperature=temperature)):
        if value is None:
            continue
        assert value.device == device and value.dtype == dtype
        value = value.double().cpu()
        err = (value - want).abs()
        worst = int((err - tol).argmax())
        assert bool((err <= tol).all()), (
            f"{name}: error {float(err.flatten()[worst]):.3g} > bound "
            f"{float(tol.flatten()[worst]):.3g} at flat index {worst}")
        if fixed is not None:
            torch.testing.assert_close(value, want, atol=fixed[0], rtol=fixed[1])


# (device, dtype, torch's float32 matmul precision): every arithmetic each device has.
CASES = [pytest.param("cpu", torch.float64, "highest", id="cpu-float64"),
         pytest.param("cpu", torch.float32, "highest", id="cpu-float32"),
         pytest.param("cuda", torch.float32, "highest", id="cuda-float32", marks=cuda_only),
         pytest.param("cuda", torch.float32, "high", id="cuda-tf32", marks=cuda_only),
         pytest.param("cuda", torch.float32, "3xtf32", id="cuda-3xtf32", marks=cuda_only),
         pytest.param("cuda", torch.float16, "highest", id="cuda-float16", marks=cuda_only),
         pytest.param("cuda", torch.bfloat16, "highest", id="cuda-bfloat16", marks=cuda_only)]
DEVICES = ["cpu", pytest.param("cuda", marks=cuda_only)]
SHAPES = [  # n, d, q_len, ks, r; the CUDA tiles (rows bm x columns bn, 8-column acc tiles per
    # warp) in the comments
    dict(n=6, d=13, q_len=11, ks=(5, 9, 4), r=3),
    dict(n=1, d=8, q_len=1, ks=(1, 3, 2), r=1),            # N=1, Q=1, K=1
    dict(n=40, d=7, q_len=300, ks=(3, 17, 1000), r=200),   # K < N, duplicated assignments
    dict(n=33, d=130, q_len=1500, ks=(700, 2100, 64), r=0),  # several tiles and chunks, r=0
    dict(n=150, d=128, q_len=700, ks=(300, 90, 2000), r=64),  # 3 row blocks of bm = 64
    dict(n=40, d=300, q_len=500, ks=(200, 50, 700), r=30),   # D > 256: bm = 16, 3 row blocks
    dict(n=40, d=1000, q_len=300, ks=(100, 40, 260), r=16),  # D > 512: bm = bn = 16, 16 acc tiles
]


@pytest.mark.parametrize("device,dtype,precision", CASES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
@pytest.mark.parametrize("m", [0, 1, 3])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_matches_reference(shape, m, sampled, device, dtype, precision):
    kw = dict(SHAPES[shape])
    kw["ks"] = kw["ks"][:m]
    with float32_matmul(precision):
        assert_accurate(sample_inputs(device, dtype, sampled=sampled, **kw))


@pytest.mark.parametrize("device,dtype,precision", CASES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_duplicated_ids_and_shared_clusters(sampled, device, dtype, precision):
    # Every row in one cluster, negatives repeating positives: PCL's layout keeps them all.
    q, k, queue, protos, phi, assign, negs = sample_inputs(device, dtype, n=5, ks=(4, 6),
                                                           sampled=sampled)
    assign = [torch.full((5,), 2, device=device), torch.tensor([0, 0, 1, 1, 0], device=device)]
    if sampled:
        negs = [torch.tensor([2, 2, 3], device=device), torch.tensor([0, 5], device=device)]
    with float32_matmul(precision):
        assert_accurate((q, k, queue, protos, phi, assign, negs))


def test_large_logits_are_stable():
    # phi = 1e-3 makes logits ~1e3: the online softmax must not overflow.
    inputs = sample_inputs(dtype=torch.float64, n=9, ks=(50, 7), phi_range=(1e-3, 2e-3))
    assert_matches(inputs, 1e-9, 1e-9)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_non_contiguous_inputs(sampled):
    q, k, queue, protos, phi, assign, negs = sample_inputs(n=7, d=9, ks=(6, 10), r=4,
                                                           sampled=sampled)
    # Same values, other strides: transposed copies and every-other-element views.
    q2 = q.detach().t().contiguous().t().requires_grad_()
    k2 = k.detach().t().contiguous().t().requires_grad_()
    queue2 = torch.stack([queue, queue], dim=2)[..., 0]
    protos2 = [c.t().contiguous().t() for c in protos]
    phi2 = [torch.stack([p, p], dim=1)[:, 1] for p in phi]
    assign2 = [torch.stack([a, a], dim=1)[:, 0] for a in assign]
    negs2 = None if negs is None else [torch.stack([g, g], dim=1)[:, 1] for g in negs]
    assert not q2.is_contiguous() and not queue2.is_contiguous() and not phi2[0].is_contiguous()
    got = fused(q2, k2, queue2, protos2, phi2, assign2, negs2)
    want = fused(q, k, queue, protos, phi, assign, negs)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_k_without_grad_and_temperature():
    inputs = sample_inputs(dtype=torch.float64, k_grad=False)
    assert_matches(inputs, *CPU_TOL[torch.float64], temperature=0.07)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu_computes_in_float32(dtype):
    # error_bound's CPU units: float32 arithmetic, one rounding to `dtype` at the end.
    assert_accurate(sample_inputs(dtype=dtype, n=8, ks=(6, 12)))


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_gradcheck(sampled):
    q, k, queue, protos, phi, assign, negs = sample_inputs(dtype=torch.float64, n=4, d=5,
                                                           ks=(3, 6), r=2, sampled=sampled)
    phi = [p.double() for p in phi]

    def loss_fn(q_, k_):
        return pcl_ext.proto_nce(q_, k_, queue, protos, phi, assign, negs, temperature=0.3)

    assert torch.autograd.gradcheck(loss_fn, (q, k))


def test_deterministic_across_thread_counts():
    inputs = sample_inputs(n=64, d=128, q_len=4000, ks=(3000, 5000), r=1500)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 2):
            torch.set_num_threads(threads)
            results.append(fused(*inputs))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
@pytest.mark.parametrize("m", [0, 2])
def test_opcheck(sampled, m):
    q, k, queue, protos, phi, assign, negs = sample_inputs(n=5, ks=(4, 7)[:m], sampled=sampled)
    args = (q, k, queue, protos, phi, assign, negs if negs is not None else [], 0.2)
    torch.library.opcheck(torch.ops.pcl_ext.proto_nce.default, args)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(backend):
    inputs = sample_inputs(n=6, ks=(5, 8))

    def step(q, k, queue, protos, phi, assign, negs):
        return pcl_ext.proto_nce(F.normalize(q, dim=1), k, queue, protos, phi, assign, negs) * 2

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    q = inputs[0]
    got = compiled(*inputs)
    (g_got,) = torch.autograd.grad(got, q)
    want = step(*inputs)
    (g_want,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(g_got, g_want)


def test_double_backward_is_refused():
    q, k, queue, protos, phi, assign, negs = sample_inputs(dtype=torch.float64)
    loss = pcl_ext.proto_nce(q, k, queue, protos, phi, assign, negs)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, q, create_graph=True)


def test_gradient_wrt_queue_is_refused():
    q, k, queue, protos, phi, assign, negs = sample_inputs()
    with pytest.raises(ValueError, match="`queue` requires grad"):
        pcl_ext.proto_nce(q, k, queue.requires_grad_(), protos, phi, assign, negs)


def _mutate(inputs, name, fn):
    q, k, queue, protos, phi, assign, negs = inputs
    d = dict(q=q, k=k, queue=queue, protos=list(protos), phi=list(phi), assign=list(assign),
             negs=None if negs is None else list(negs), temperature=0.2)
    fn(d)
    return d


BAD_INPUTS = [  # (what, mutation, exception, message fragment)
    ("q rank", lambda d: d.update(q=d["q"][0]), ValueError, "`q`"),
    ("k shape", lambda d: d.update(k=d["k"][:-1]), ValueError, "`k`"),
    ("queue dim", lambda d: d.update(queue=d["queue"][:, :-1]), ValueError, "`queue`"),
    ("queue dtype", lambda d: d.update(queue=d["queue"].double()), TypeError, "`queue`"),
    ("empty queue", lambda d: d.update(queue=d["queue"][:0]), ValueError, "`queue`"),
    ("int q", lambda d: d.update(q=d["q"].long(), k=d["k"].long()), TypeError, "`q`"),
    ("prototype dim", lambda d: d["protos"].__setitem__(1, d["protos"][1][:, :3]),
     ValueError, "`prototypes[1]`"),
    ("phi length", lambda d: d["phi"].__setitem__(0, d["phi"][0][:-1]), ValueError, "`phi[0]`"),
    ("phi zero", lambda d: d["phi"][2].__setitem__(1, 0.0), ValueError, "`phi[2]`"),
    ("phi nan", lambda d: d["phi"][0].__setitem__(0, float("nan")), ValueError, "`phi[0]`"),
    ("phi negative", lambda d: d["phi"][1].__setitem__(0, -0.1), ValueError, "`phi[1]`"),
    ("assignment dtype", lambda d: d["assign"].__setitem__(1, d["assign"][1].int()),
     TypeError, "`assignments[1]`"),
    ("assignment length", lambda d: d["assign"].__setitem__(0, d["assign"][0][1:]),
     ValueError, "`assignments[0]`"),
    ("assignment too large", lambda d: d["assign"][0].__setitem__(2, 5), IndexError,
     "`assignments[0]`"),
    ("assignment negative", lambda d: d["assign"][2].__setitem__(0, -1), IndexError,
     "`assignments[2]`"),
    ("negative too large", lambda d: d["negs"][2].__setitem__(0, 4), IndexError,
     "`negatives[2]`"),
    ("negative rank", lambda d: d["negs"].__setitem__(1, d["negs"][1][None]), ValueError,
     "`negatives[1]`"),
    ("list lengths", lambda d: d["phi"].pop(), ValueError, "`phi`"),
    ("negatives length", lambda d: d["negs"].pop(), ValueError, "`negatives`"),
    ("temperature", lambda d: d.update(temperature=0.0), ValueError, "`temperature`"),
    ("temperature inf", lambda d: d.update(temperature=float("inf")), ValueError,
     "`temperature`"),
]


@pytest.mark.parametrize("what,mutation,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(what, mutation, exc, fragment):
    d = _mutate(sample_inputs(ks=(5, 9, 4)), what, mutation)
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        pcl_ext.proto_nce(d["q"], d["k"], d["queue"], d["protos"], d["phi"], d["assign"],
                          d["negs"], temperature=d["temperature"])


# -------------------------------------------------------------------- every device: edge cases


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_fp16_with_tiny_phi(device, sampled):
    # phi = 1e-5 scales its logits by 1e5, past fp16's largest value (65504). Every row leans
    # by 1/3 or more towards or away from that cluster, so that its logit (>= 3e4 in size)
    # either dominates the row's softmax or drops out of it: p stays well conditioned. Row 0's
    # target is that cluster (p_t -> 1); it is nobody else's target nor a negative (no ties).
    n, d, ks = 12, 16, (10, 7)
    q, k, queue, protos, phi, assign, negs = sample_inputs(device, torch.float16, n=n, d=d,
                                                           q_len=30, ks=ks, r=4, sampled=sampled)
    phi[0][0] = 1e-5
    c0 = protos[0][0].double().cpu()
    side = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).double()[:, None]
    lean = F.normalize(side * c0 + 0.5 * F.normalize(torch.randn(n, d).double(), dim=1), dim=1)
    q = lean.to(device, torch.float16).requires_grad_()
    assign[0] = torch.cat([torch.zeros(1, dtype=torch.long),
                           torch.randint(1, ks[0], (n - 1,))]).to(device)
    if sampled:
        negs[0] = (torch.randperm(ks[0] - 1)[:4] + 1).to(device)
    assert_accurate((q, k, queue, protos, phi, assign, negs))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_bf16_peaked_softmax(device, sampled):
    # q_i is its target prototype and phi ~ 0.005: the target logit ~200 beats the others by
    # ~100, so p_t = 1 - O(e^-100). dq's prototype part, sum_{j != t} p_j x_j s_j -
    # (1 - p_t) x_t s_t, is then tiny; a target column rounded to bf16 inside P would leave an
    # error of 2^-8 x_t s_t / (N M), far above error_bound. Distinct assignments: no ties.
    n, d, ks = 16, 32, (24,)
    q, k, queue, protos, phi, assign, negs = sample_inputs(device, torch.bfloat16, n=n, d=d,
                                                           q_len=40, ks=ks, r=5, sampled=sampled,
                                                           phi_range=(0.004, 0.006))
    assign = [torch.randperm(ks[0])[:n].to(device)]
    if sampled:
        free = torch.tensor(reference.free_clusters(assign[0], ks[0]))
        negs = [free[torch.randperm(len(free))[:5]].to(device)]
    q = protos[0][assign[0]].clone().requires_grad_()
    assert_accurate((q, k, queue, protos, phi, assign, negs))


@pytest.mark.parametrize("device,dtype,precision", CASES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_unaligned_slices(device, dtype, precision, sampled):
    # The same values, each tensor starting one element past a 16-byte boundary: CUDA then
    # loads its column tiles element by element instead of by 16-byte cp.async, which must
    # change nothing, not even a bit.
    inputs = sample_inputs(device, dtype, n=70, d=64, q_len=600, ks=(300, 40), r=50,
                           sampled=sampled)

    def shifted(t):
        buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
        out = buf[1:].view(t.shape).copy_(t.detach()).requires_grad_(t.requires_grad)
        assert out.data_ptr() % 16 != 0 and out.is_contiguous()
        return out

    q, k, queue, protos, phi, assign, negs = inputs
    moved = (shifted(q), shifted(k), shifted(queue), [shifted(c) for c in protos],
             [shifted(p) for p in phi], [shifted(a) for a in assign],
             None if negs is None else [shifted(g) for g in negs])
    with float32_matmul(precision):
        assert_accurate(moved)
        if device == "cuda":
            for got, want in zip(fused(*moved), fused(*inputs)):
                assert torch.equal(got, want)


@pytest.mark.parametrize("device,dtype,precision", CASES)
def test_31_clusterings(device, dtype, precision):
    # The CUDA kernel's limit (its term table travels in the kernel parameters).
    ks = tuple(3 + m % 7 for m in range(31))
    with float32_matmul(precision):
        assert_accurate(sample_inputs(device, dtype, n=9, d=16, q_len=20, ks=ks, r=2))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bad", [-1, 2**40])
def test_bad_negative_id_with_checks_off(device, bad):
    # Without the value checks, a bad id gives NaN on CUDA (its column reads as 0 with a NaN
    # scale) and never a read out of bounds (2**40 elements past would fault); the CPU kernel
    # checks ids always.
    q, k, queue, protos, phi, assign, negs = sample_inputs(device, ks=(5, 9), r=3)
    negs[1][0] = bad

    def run():
        loss = pcl_ext.proto_nce(q, k, queue, protos, phi, assign, negs, check_values=False)
        return loss, torch.autograd.grad(loss, q)[0]

    if device == "cpu":
        with pytest.raises(IndexError, match=r"`negatives\[1\]` holds cluster id"):
            run()
    else:
        loss, dq = run()
        assert torch.isnan(loss).item() and bool(torch.isnan(dq).all())


# ---------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_deterministic_and_graph_capturable(dtype):
    q, k, queue, protos, phi, assign, negs = sample_inputs("cuda", dtype, n=64, d=128,
                                                           q_len=5000, ks=(4000, 900), r=700)
    q, k = q.detach(), k.detach()
    args = (q, k, queue, protos, phi, assign, negs, 0.2)
    first = torch.ops.pcl_ext.proto_nce(*args)
    second = torch.ops.pcl_ext.proto_nce(*args)
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.ops.pcl_ext.proto_nce(*args)  # warm-up on the side stream
        with torch.cuda.graph(graph, stream=stream):
            captured = torch.ops.pcl_ext.proto_nce(*args)
    graph.replay()
    torch.cuda.synchronize()
    for a, b in zip(first, captured):
        assert torch.equal(a, b)


@cuda_only
def test_cuda_opcheck_and_compile():
    q, k, queue, protos, phi, assign, negs = sample_inputs("cuda", n=5, ks=(4, 7))
    torch.library.opcheck(torch.ops.pcl_ext.proto_nce.default,
                          (q, k, queue, protos, phi, assign, negs, 0.2))
    compiled = torch.compile(pcl_ext.proto_nce, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, queue, protos, phi, assign, negs),
                               pcl_ext.proto_nce(q, k, queue, protos, phi, assign, negs))


@cuda_only
def test_cuda_bad_values_and_devices():
    q, k, queue, protos, phi, assign, negs = sample_inputs("cuda", ks=(5, 9))
    with pytest.raises(ValueError, match=r"`queue` must be on cuda"):
        pcl_ext.proto_nce(q, k, queue.cpu(), protos, phi, assign, negs)
    bad = [a.clone() for a in assign]
    bad[1][0] = 9
    with pytest.raises(ValueError, match=r"`assignments\[1\]`"):
        pcl_ext.proto_nce(q, k, queue, protos, phi, bad, negs)
    bad_phi = [p.clone() for p in phi]
    bad_phi[0][3] = 0
    with pytest.raises(ValueError, match=r"`phi\[0\]`"):
        pcl_ext.proto_nce(q, k, queue, protos, bad_phi, assign, negs)
    # Unchecked (as under graph capture): a bad id gives NaN, never an out-of-bounds read.
    loss = pcl_ext.proto_nce(q, k, queue, protos, phi, bad, negs, check_values=False)
    assert torch.isnan(loss).item()


@cuda_only
def test_cuda_takes_at_most_31_clusterings():
    inputs = sample_inputs("cuda", n=4, d=8, ks=(3,) * 32, r=1)
    with pytest.raises(ValueError, match="at most 31 clusterings"):
        fused(*inputs)


@two_gpus_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_second_device(dtype):
    # Every tensor on cuda:1 while cuda:0 is current: the kernel runs there and reads nothing
    # from the current device.
    assert torch.cuda.current_device() == 0
    inputs = sample_inputs("cuda:1", dtype, n=70, d=128, q_len=900, ks=(500, 60), r=40)
    assert_accurate(inputs)
    q, k, queue, protos, phi, assign, negs = inputs
    with pytest.raises(ValueError, match=r"`prototypes\[1\]` must be on cuda:1"):
        pcl_ext.proto_nce(q, k, queue, [protos[0], protos[1].to("cuda:0")], phi, assign, negs)


def expected_hits(inputs, temperature=0.2):
    """[1 + M, N] (must_hit, must_miss) from the float64 logits, by proto_nce_with_accuracy's
    rule: the target against the columns that differ from it (identical columns, such as a
    duplicate id, tie with it and count as hits); a hit if it is their argmax, a miss if it
    trails it by more than 2 tol, where the kernel's own rounding (tol / 2 per logit) may
    decide either way."""
    q = inputs[0]
    units = kernel_units(q.device, q.dtype)
    factor = 2 * (2 * units["u_in"] + (q.shape[1] + 2) * units["u_acc"])
    q64 = q.detach().double().cpu()
    must_hit, must_miss = [], []
    for _, logits, target, cols, _ in reference_terms(*inputs, temperature=temperature):
        same = (cols[None, :, :] == cols[target][:, None, :]).all(dim=2)   # [N, C]
        gap = logits.gather(1, target[:, None])[:, 0] - logits.masked_fill(same, -torch.inf).amax(1)
        tol = factor * (q64 * cols[target]).abs().sum(1)
        must_hit.append(gap >= 0)
        must_miss.append(gap < -2 * tol)
    return torch.stack(must_hit), torch.stack(must_miss)


@pytest.mark.parametrize("device,dtype,precision", CASES)
@pytest.mark.parametrize("sampled", [True, False], ids=["sampled", "all"])
def test_accuracy_flags_match_argmax(device, dtype, precision, sampled):
    # Clustering 0: rows 0-5 in cluster 1, whose prototype and phi cluster 0 copies (an exact
    # tie that argmax, taking the first column, would call a miss; in sampled mode rows 1-5's
    # positives tie too), pulled hard towards it with the smallest phi so that the tie is their
    # top; the other rows in distinct clusters, pulled less (hits and misses).
    n, ks = 24, (40, 64)
    q, k, queue, protos, phi, assign, negs = sample_inputs(device, dtype, n=n, d=16, q_len=50,
                                                           ks=ks, r=10, sampled=sampled)
    protos[0][0] = protos[0][1]
    phi[0][:2] = phi[0].min()
    assign = [torch.cat([torch.ones(6, dtype=torch.long), 2 + torch.randperm(ks[0] - 2)[:n - 6]]),
              torch.randint(0, ks[1], (n,))]
    pull = torch.cat([torch.full((6, 1), 2.0), torch.full((n - 6, 1), 1.2)]).to(device, dtype)
    q = F.normalize(q.detach() + pull * protos[0][assign[0].to(device)], dim=1)
    if sampled:
        free = [torch.tensor(reference.free_clusters(a, kk)) for kk, a in zip(ks, assign)]
        negs = [f[torch.randperm(len(f))[:10]] for f in free]
        negs[0][0] = 0  # the copy of cluster 1 is a column
        negs = [g.to(device) for g in negs]
    assign = [a.to(device) for a in assign]
    inputs = (q, k.detach(), queue, protos, phi, assign, negs)
    with float32_matmul(precision):
        loss, correct = pcl_ext.ops.proto_nce_with_accuracy(*inputs)
        must_hit, must_miss = expected_hits(inputs)
        torch.testing.assert_close(loss, pcl_ext.proto_nce(*inputs))
    assert correct.dtype == torch.bool and correct.shape == (3, n)
    correct = correct.cpu()
    assert bool((correct | ~must_hit).all()), "a hit flagged as a miss"
    assert bool((~correct | ~must_miss).all()), "a miss flagged as a hit"
    assert bool(must_hit[1, :6].all())  # the ties were their rows' top and counted as hits
    assert 0 < int(must_hit[1, 6:].sum()) and int(must_miss[1, 6:].sum()) > 0  # hits and misses


@pytest.mark.parametrize("precision", ["highest", "high", "3xtf32"])
def test_float32_matmul_restores_the_settings(precision):
    def settings():
        return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.fp32_precision,
                torch.backends.cuda.matmul.allow_tf32, os.environ.get("PCL_EXT_FLOAT32_MATH"))

    before = settings()
    with float32_matmul(precision):
        assert torch.backends.cuda.matmul.allow_tf32 == (precision == "high")
        assert (os.environ.get("PCL_EXT_FLOAT32_MATH") == "3xtf32") == (precision == "3xtf32")
    assert settings() == before


@cuda_only
def test_cuda_float32_math_setting_is_checked():
    inputs = sample_inputs("cuda", n=4, ks=(5,))
    with float32_matmul("highest"):
        os.environ["PCL_EXT_FLOAT32_MATH"] = "fast"
        with pytest.raises(ValueError, match="PCL_EXT_FLOAT32_MATH"):
            fused(*inputs)
