"""pcl_ext.info_nce against the float64 reference: values and both gradients, autograd,
opcheck, compile, edge cases and bad input."""
import pytest
import torch
import torch.nn.functional as F

import pcl_ext
from pcl_ext import check, reference

from conftest import HAS_CUDA, cuda_only

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# float64 only where a kernel computes in it (the CPU); half precision is tested apart.
DTYPES = {"cpu": (torch.float64, torch.float32), "cuda": (torch.float32,)}
DEVICE_DTYPES = [(dev, dt) for dev in DEVICES for dt in DTYPES[dev]]
# (rtol, atol) against the float64 reference, on values of order 1 (measured margin ~10x).
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-4, 2e-5)}


def sample_inputs(device="cpu", dtype=torch.float32, n=6, k=9, d=5, exclude_self=False,
                  q_grad=True, k_grad=True, unit=True, seed=None):
    """Fresh random queries, keys, targets (never a row's own column under exclude_self)."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    q = torch.randn(n, d, generator=gen, dtype=torch.float64)
    keys = torch.randn(k, d, generator=gen, dtype=torch.float64)
    if unit:
        q, keys = F.normalize(q, dim=1), F.normalize(keys, dim=1)
    targets = torch.randint(0, k, (n,), generator=gen)
    if exclude_self:  # shift by 1..k-1: never i
        targets = (torch.arange(n) + torch.randint(1, k, (n,), generator=gen)) % k
    q = q.to(device, dtype).requires_grad_(q_grad)
    keys = keys.to(device, dtype).requires_grad_(k_grad)
    return q, keys, targets.to(device)


def reference_f64(q, keys, targets, temperature, exclude_self, grad_losses):
    """Losses [N] and the gradients of sum_i g_i losses_i w.r.t. (queries, keys), float64."""
    q64 = q.detach().double().cpu().requires_grad_()
    k64 = keys.detach().double().cpu().requires_grad_()
    losses = reference.info_nce(q64, k64, targets.cpu(), temperature, exclude_self,
                                reduction="none")
    dq, dk = torch.autograd.grad(losses, (q64, k64), grad_losses.double().cpu())
    return losses.detach(), dq, dk


def assert_close(got, want, dtype):
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(got.detach().double().cpu(), want, rtol=rtol, atol=atol)


CASES = {  # n, k, d, exclude_self, temperature
    "small": (6, 9, 5, False, 0.2),
    "simclr": (8, 8, 7, True, 0.5),
    "wide": (40, 3000, 16, False, 0.1),        # several column chunks
    "tall": (1100, 1200, 8, True, 0.2),        # several row blocks and row tiles
    "one_row": (1, 17, 4, False, 0.2),
    "one_key": (5, 1, 3, False, 0.3),
    "one_one": (1, 1, 3, False, 0.3),
}


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("case", list(CASES))
def test_values_and_gradients(device, dtype, case):
    n, k, d, exclude_self, temperature = CASES[case]
    q, keys, targets = sample_inputs(device, dtype, n, k, d, exclude_self)
    losses = pcl_ext.info_nce(q, keys, targets, temperature=temperature,
                              exclude_self=exclude_self, reduction="none")
    g = torch.rand(n, dtype=torch.float64).to(device, losses.dtype)
    dq, dk = torch.autograd.grad(losses, (q, keys), g)
    ref_losses, ref_dq, ref_dk = reference_f64(q, keys, targets, temperature, exclude_self, g)
    assert losses.dtype == dtype and dq.dtype == dtype and dk.dtype == dtype
    assert_close(losses, ref_losses, dtype)
    assert_close(dq, ref_dq, dtype)
    assert_close(dk, ref_dk, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_duplicated_targets_and_large_logits(device, dtype):
    """Every row on the same positive, and logits of +-40 (no unit norm): the online max."""
    q, keys, _ = sample_inputs(device, dtype, n=50, k=600, d=8, unit=False)
    q = (q.detach() * 2.5).requires_grad_()
    targets = torch.full((50,), 3, device=device)
    loss = pcl_ext.info_nce(q, keys, targets, temperature=0.2)
    dq, dk = torch.autograd.grad(loss, (q, keys))
    g = torch.full((50,), 1 / 50, dtype=torch.float64)
    ref_losses, ref_dq, ref_dk = reference_f64(q, keys, targets, 0.2, False, g)
    scale = ref_losses.abs().max().item()
    rtol, atol = TOL[dtype]
    torch.testing.assert_close(loss.double().cpu(), ref_losses.mean(), rtol=rtol,
                               atol=atol * scale)
    torch.testing.assert_close(dq.double().cpu(), ref_dq, rtol=rtol, atol=atol * scale)
    torch.testing.assert_close(dk.double().cpu(), ref_dk, rtol=rtol, atol=atol * scale)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_queries_is_keys_simclr(device, dtype):
    """NT-Xent: the 2N embeddings of both views are queries and keys, each row's positive is
    the other view, its own column is masked; autograd adds both gradients."""
    n = 12
    z, _, _ = sample_inputs(device, dtype, n=2 * n, k=1, d=6)
    targets = (torch.arange(2 * n) + n) % (2 * n)
    loss = pcl_ext.info_nce(z, z, targets.to(device), temperature=0.5, exclude_self=True)
    (dz,) = torch.autograd.grad(loss, z)
    z64 = z.detach().double().cpu().requires_grad_()
    ref = reference.info_nce(z64, z64, targets, 0.5, exclude_self=True)
    (ref_dz,) = torch.autograd.grad(ref, z64)
    assert_close(loss, ref.detach(), dtype)
    assert_close(dz, ref_dz, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("same", [False, True], ids=["two_tensors", "queries_is_keys"])
def test_repeated_backward(device, dtype, same):
    """retain_graph=True, then a second backward: the saved query gradient is not consumed,
    so the accumulated gradients are twice the reference's."""
    q, keys, targets = sample_inputs(device, dtype, n=10, k=10, d=5, exclude_self=True)
    if same:
        keys = q
    loss = pcl_ext.info_nce(q, keys, targets, temperature=0.3, exclude_self=True,
                            reduction="sum")
    loss.backward(retain_graph=True)
    first_q, first_k = q.grad.clone(), keys.grad.clone()
    loss.backward()
    _, ref_dq, ref_dk = reference_f64(q, keys, targets, 0.3, True,
                                      torch.ones(10, dtype=torch.float64))
    want_q = ref_dq + ref_dk if same else ref_dq
    want_k = want_q if same else ref_dk
    assert_close(first_q, want_q, dtype)
    assert_close(first_k, want_k, dtype)
    assert_close(q.grad, 2 * want_q, dtype)
    assert_close(keys.grad, 2 * want_k, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("which", ["queries", "keys"])
def test_one_side_without_grad(device, dtype, which):
    q, keys, targets = sample_inputs(device, dtype, n=7, k=11, d=4, q_grad=which != "queries",
                                     k_grad=which != "keys")
    loss = pcl_ext.info_nce(q, keys, targets, temperature=0.3)
    grad_of = keys if which == "queries" else q
    (got,) = torch.autograd.grad(loss, grad_of)
    g = torch.full((7,), 1 / 7, dtype=torch.float64)
    _, ref_dq, ref_dk = reference_f64(q, keys, targets, 0.3, False, g)
    assert_close(got, ref_dk if which == "queries" else ref_dq, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_non_contiguous_inputs(device, dtype):
    q, keys, targets = sample_inputs(device, dtype, n=9, k=14, d=6, q_grad=False, k_grad=False)
    q_nc = q.t().contiguous().t().requires_grad_()            # column-major
    keys_nc = torch.stack([keys, keys], dim=2)[:, :, 0].requires_grad_()  # stride 2
    t_nc = torch.stack([targets, targets], dim=1)[:, 0]
    assert not (q_nc.is_contiguous() or keys_nc.is_contiguous() or t_nc.is_contiguous())
    losses = pcl_ext.info_nce(q_nc, keys_nc, t_nc, temperature=0.2, reduction="none")
    g = torch.rand(9, dtype=torch.float64)
    dq, dk = torch.autograd.grad(losses, (q_nc, keys_nc), g.to(device, dtype))
    ref_losses, ref_dq, ref_dk = reference_f64(q, keys, targets, 0.2, False, g)
    assert_close(losses, ref_losses, dtype)
    assert_close(dq, ref_dq, dtype)
    assert_close(dk, ref_dk, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_and_default_targets(device, dtype, reduction):
    q, keys, _ = sample_inputs(device, dtype, n=5, k=8, d=3)
    got = pcl_ext.info_nce(q, keys, temperature=0.4, reduction=reduction)
    want = reference.info_nce(q.detach().double().cpu(), keys.detach().double().cpu(), None,
                              0.4, reduction=reduction)
    assert got.shape == want.shape
    assert_close(got, want, dtype)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_accuracy(device, dtype):
    """correct = the target logit is the row's largest; exact ties (duplicated keys) count."""
    q, keys, targets = sample_inputs(device, dtype, n=64, k=10, d=4)
    keys = keys.detach()
    keys[7] = keys[2]  # rows aiming at 2 or 7 tie with the other whenever either is the max
    _, correct = pcl_ext.info_nce_with_accuracy(q, keys, targets, temperature=0.2)
    s = q.detach().double().cpu() @ keys.double().cpu().t()
    best = s.max(dim=1).values
    want = s.gather(1, targets.cpu()[:, None])[:, 0] >= best
    assert correct.dtype == torch.bool and torch.equal(correct.cpu(), want)
    assert 0 < int(want.sum()) < 64  # the test can fail either way


def test_gradcheck_float64():
    for exclude_self in (False, True):
        q, keys, targets = sample_inputs("cpu", torch.float64, n=5, k=7, d=3,
                                         exclude_self=exclude_self)

        def f(q, keys):
            return pcl_ext.info_nce(q, keys, targets, temperature=0.3, exclude_self=exclude_self,
                                    reduction="none")

        assert torch.autograd.gradcheck(f, (q, keys))
    z, _, _ = sample_inputs("cpu", torch.float64, n=6, k=1, d=3)
    t = (torch.arange(6) + 3) % 6
    assert torch.autograd.gradcheck(
        lambda z: pcl_ext.info_nce(z, z, t, temperature=0.5, exclude_self=True), (z,))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
def test_opcheck(device, dtype):
    q, keys, targets = sample_inputs(device, dtype, n=6, k=8, d=4, exclude_self=True)
    torch.library.opcheck(torch.ops.pcl_ext.info_nce.default,
                          (q, keys, targets, 0.3, True, True))
    lse = torch.ops.pcl_ext.info_nce.default(q, keys, targets, 0.3, True, False)[1]
    g = torch.rand(6, device=device, dtype=lse.dtype)
    torch.library.opcheck(torch.ops.pcl_ext.info_nce_backward.default,
                          (g, q.detach(), keys.detach(), targets, lse.detach(), 0.3, True))


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPES)
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compile_fullgraph(device, dtype, backend):
    """A compiled SimCLR step (normalize, then queries is keys) against eager."""
    z, _, _ = sample_inputs(device, dtype, n=10, k=1, d=4, unit=False)
    targets = ((torch.arange(10) + 5) % 10).to(device)

    def step(z, targets):
        z = F.normalize(z, dim=1)
        return pcl_ext.info_nce(z, z, targets, temperature=0.25, exclude_self=True) * 2

    got = torch.compile(step, fullgraph=True, backend=backend)(z, targets)
    (dz,) = torch.autograd.grad(got, z)
    want = step(z, targets)
    (want_dz,) = torch.autograd.grad(want, z)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(dz, want_dz)


def test_cpu_bits_independent_of_threads():
    q, keys, targets = sample_inputs("cpu", torch.float32, n=600, k=2500, d=300)
    threads = torch.get_num_threads()
    outs = []
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        loss = pcl_ext.info_nce(q, keys, targets, temperature=0.2)
        outs.append((loss, *torch.autograd.grad(loss, (q, keys))))
    torch.set_num_threads(threads)
    for other in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(outs[0], other))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_on_cpu(dtype):
    """Computed in float32 from the half inputs: within the output's rounding (2 ulps of its
    dtype at the values' scale) of the float64 reference on the same (rounded) inputs."""
    q, keys, targets = sample_inputs("cpu", dtype, n=10, k=30, d=8)
    loss = pcl_ext.info_nce(q, keys, targets, temperature=0.2)
    dq, dk = torch.autograd.grad(loss, (q, keys))
    assert loss.dtype == dq.dtype == dk.dtype == dtype
    g = torch.full((10,), 0.1, dtype=torch.float64)
    ref_losses, ref_dq, ref_dk = reference_f64(q, keys, targets, 0.2, False, g)
    eps = torch.finfo(dtype).eps
    for got, want in ((loss, ref_losses.mean()), (dq, ref_dq), (dk, ref_dk)):
        torch.testing.assert_close(got.double(), want, rtol=2 * eps,
                                   atol=2 * eps * want.abs().max().item())


def test_double_backward_raises():
    q, keys, targets = sample_inputs("cpu", torch.float64, n=4, k=5, d=3)
    loss = pcl_ext.info_nce(q, keys, targets, temperature=0.3)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, q, create_graph=True)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    q, keys, targets = sample_inputs(device, torch.float32, n=4, k=6, d=3)
    call = pcl_ext.info_nce
    cases = [
        (dict(queries=q[0]), ValueError, "`queries` must be 2-D"),
        (dict(keys=keys[:, :2]), ValueError, "`keys` must be \\[K, D\\]"),
        (dict(keys=keys[:0]), ValueError, "`keys` must be \\[K, D\\] with K >= 1"),
        (dict(targets=targets[:3]), ValueError, "`targets` must be \\[N\\]"),
        (dict(keys=keys.double()), TypeError, "`keys` must have dtype torch.float32"),
        (dict(targets=targets.int()), TypeError, "`targets` must be torch.int64"),
        (dict(queries=q.long(), keys=keys.long()), TypeError, "`queries` must be"),
        (dict(targets=torch.full_like(targets, 6)), IndexError, "`targets`"),
        (dict(targets=torch.full_like(targets, -1)), IndexError, "`targets`"),
        (dict(temperature=0.0), ValueError, "`temperature`"),
        (dict(temperature=-1.0), ValueError, "`temperature`"),
        (dict(temperature=float("nan")), ValueError, "`temperature`"),
        (dict(exclude_self=True, targets=torch.arange(4, device=device)), ValueError,
         "`targets\\[0\\]`|`targets\\[i\\]`"),
        (dict(exclude_self=True, keys=keys[:3], targets=targets % 3), ValueError,
         "`exclude_self` needs N <= K"),
        (dict(reduction="avg"), ValueError, "`reduction`"),
    ]
    if device == "cuda":
        cases.append((dict(keys=keys.cpu()), ValueError, "`keys` must be on cuda"))
        cases.append((dict(targets=targets.cpu()), ValueError, "`targets` must be on cuda"))
    for override, exc, match in cases:
        args = dict(queries=q, keys=keys, targets=targets, temperature=0.2)
        args.update(override)
        with pytest.raises(exc, match=match):
            call(args.pop("queries"), args.pop("keys"), args.pop("targets"), **args)


def test_backward_op_bad_inputs():
    q, keys, targets = sample_inputs("cpu", torch.float32, n=4, k=6, d=3, q_grad=False,
                                     k_grad=False)
    lse = torch.zeros(4)
    op = torch.ops.pcl_ext.info_nce_backward.default
    with pytest.raises(ValueError, match="`lse` must have dtype"):
        op(torch.ones(4), q, keys, targets, lse.double(), 0.2, False)
    with pytest.raises(ValueError, match="`grad_losses` must be \\[N\\]"):
        op(torch.ones(3), q, keys, targets, lse, 0.2, False)
    with pytest.raises(IndexError, match="`targets`"):
        op(torch.ones(4), q, keys, targets + 6, lse, 0.2, False)


# ------------------------------------------------------------------------------- CUDA kernels
# Every arithmetic of the CUDA kernels against pcl_ext.check's derived error bounds, on shapes
# that reach the tile bounds (the CUDA tiles in the comments: rows bm x columns bn).
CUDA_SHAPES = [
    check.NCEShape(6, 9, 5),                              # one partial tile each way
    check.NCEShape(70, 70, 40, exclude_self=True),        # the diagonal crosses tiles; N % 64
    check.NCEShape(33, 5000, 130),                        # several key chunks; D % 64 != 0
    check.NCEShape(1100, 1200, 24, exclude_self=True),    # backward: 5 chunks of queries
    check.NCEShape(20, 300, 264),                         # D > 256: bm = 32
    check.NCEShape(40, 260, 1000, exclude_self=True),     # D > 512: bm = bn = 16
    check.NCEShape(80, 1, 32, simclr=True),               # queries is keys
    check.NCEShape(30, 200, 16, duplicates=True),         # one key is every row's target
    check.NCEShape(32, 256, 64, scale=4.0),               # peaked softmaxes
    check.NCEShape(1, 17, 4), check.NCEShape(5, 1, 3), check.NCEShape(1, 1, 3),
]
CUDA_MODES = ["float32", "float32+tf32", "float32+3xtf32", "float16", "bfloat16"]


def cuda_mode(name: str, monkeypatch) -> check.Mode:
    """check's CUDA mode of that name; 3xTF32 (PCL_EXT_FLOAT32_MATH=3xtf32): float32 inputs
    split into two TF32 terms (2^-21 of each left) on tensor cores."""
    if name == "float32+3xtf32":
        monkeypatch.setenv("PCL_EXT_FLOAT32_MATH", "3xtf32")
        u32 = check.unit_roundoff(torch.float32)
        return check.Mode(name, torch.float32, 2 * u32, 2 * u32, u_in=2.0**-21, u_p=2.0**-21)
    monkeypatch.delenv("PCL_EXT_FLOAT32_MATH", raising=False)
    return {m.name: m for m in check.proto_nce_modes(torch.device("cuda"))}[name]


@cuda_only
@pytest.mark.parametrize("mode", CUDA_MODES)
@pytest.mark.parametrize("shape", CUDA_SHAPES, ids=lambda s: f"{s}{' x4' if s.scale > 1 else ''}"
                         f"{' same-target' if s.duplicates else ''}")
def test_cuda_within_derived_bounds(shape, mode, monkeypatch):
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    verdict = check.check_info_nce(shape, torch.device("cuda"), cuda_mode(mode, monkeypatch), gen)
    assert not verdict.problems, verdict.line()[1]


@cuda_only
@pytest.mark.parametrize("mode", CUDA_MODES)
def test_cuda_deterministic(mode, monkeypatch):
    """No atomics, fixed merge orders: the same bits twice, with K and N over several chunks."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    verdict = check.check_info_nce_deterministic(check.NCEShape(300, 3000, 64),
                                                 torch.device("cuda"),
                                                 cuda_mode(mode, monkeypatch), gen)
    assert not verdict.problems, verdict.line()[1]


@cuda_only
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_unaligned(dtype):
    """Rows one element off 16-byte alignment: the tiles load element by element instead of
    with cp.async."""
    q, keys, targets = sample_inputs("cuda", dtype, n=50, k=300, d=32)
    shifted = []
    for t in (q, keys):
        buf = torch.empty(t.numel() + 1, device="cuda", dtype=dtype)
        shifted.append(buf[1:].view(t.shape).copy_(t.detach()).requires_grad_())
    assert shifted[0].data_ptr() % 16 != 0
    losses = pcl_ext.info_nce(*shifted, targets, temperature=0.2, reduction="none")
    g = torch.rand(50, dtype=torch.float64)
    dq, dk = torch.autograd.grad(losses, shifted, g.to("cuda", dtype))
    want = reference_f64(*shifted, targets, 0.2, False, g.to(dtype).double())
    # float16: the logits' inputs are exact, P and the outputs are rounded to 2^-11.
    rtol, atol = TOL[dtype] if dtype == torch.float32 else (1e-2, 1e-2)
    for got, ref in zip((losses, dq, dk), want):
        torch.testing.assert_close(got.double().cpu(), ref, rtol=rtol,
                                   atol=atol * ref.abs().max().item())


@cuda_only
def test_cuda_embedding_dimension_limit():
    q, keys, targets = sample_inputs("cuda", torch.float32, n=4, k=5, d=1032)
    with pytest.raises(ValueError, match="up to 1024, `queries` has D = 1032"):
        pcl_ext.info_nce(q, keys, targets, temperature=0.2)
