"""pcl_ext.momentum_update_ against a float64 reference, plus layouts, modules, opcheck, bad input."""
import math

import pytest
import torch

import pcl_ext
from pcl_ext import reference

from conftest import cuda_only

# 0-d, empty, odd sizes, a conv weight, and one tensor spanning several CPU pieces (65536).
SHAPES = [(), (1,), (7,), (0,), (3, 5), (2, 0, 3), (64, 3, 7, 7), (70001,), (33, 17)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Unit roundoff of the stored result and of the arithmetic (half precision computes in float32).
EPS = {torch.float64: 2**-53, torch.float32: 2**-24, torch.float16: 2**-11,
       torch.bfloat16: 2**-8}
ACC_EPS = {torch.float64: 2**-53, torch.float32: 2**-24, torch.float16: 2**-24,
           torch.bfloat16: 2**-24}


def sample_pairs(shapes, dtypes, device="cpu"):
    """Fresh random (keys, queries); dtypes pairs up with shapes cyclically."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)
    keys, queries = [], []
    for i, s in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        keys.append(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dt))
        queries.append(torch.randn(s, generator=gen, dtype=torch.float64).to(device, dt))
    return keys, queries


def reference_f64(keys, queries, m):
    """(MoCo's update m k + (1-m) q in float64, its error scale |m k| + |(1-m) q|) per pair."""
    keys = [k.detach().double() for k in keys]
    queries = [q.detach().double() for q in queries]
    updated = [k.clone() for k in keys]
    reference.moco_momentum_update_(updated, queries, m)
    return [(u, (m * k).abs() + ((1 - m) * q).abs()) for u, k, q in zip(updated, keys, queries)]


def assert_matches(got, want):
    """Within one rounding of the result plus the float arithmetic's error (cancellation)."""
    for g, (w, scale) in zip(got, want):
        assert g.shape == w.shape
        bound = EPS[g.dtype] * w.abs() + 2 * ACC_EPS[g.dtype] * scale.to(g.device)
        bound += torch.finfo(g.dtype).smallest_normal * EPS[g.dtype]  # subnormal spacing
        err = (g.double() - w).abs()
        assert bool((err <= bound).all()), f"{g.dtype} {tuple(g.shape)}: max error " \
            f"{err.max().item():.3g}, worst error / bound {(err / bound).max().item():.3g}"


@pytest.mark.parametrize("m", [0.0, 0.999, 1.0, 0.37])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference_cpu(dtype, m):
    keys, queries = sample_pairs(SHAPES, [dtype])
    want = reference_f64(keys, queries, m)
    q_before = [q.clone() for q in queries]
    pcl_ext.momentum_update_(keys, queries, m)
    assert_matches(keys, want)
    for q, q0 in zip(queries, q_before):
        assert torch.equal(q, q0)
    if m in (0.0, 1.0):  # exact: the other term is multiplied by 0
        for k, (w, _) in zip(keys, want):
            assert torch.equal(k, w.to(k.dtype))


def test_mixed_dtypes_and_threads():
    # One call over every dtype, several pieces per thread, piece boundaries inside tensors.
    keys, queries = sample_pairs(SHAPES + [(100003,), (5,), (65537,)], DTYPES)
    want = reference_f64(keys, queries, 0.9)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        pcl_ext.momentum_update_(keys, queries, 0.9)
    finally:
        torch.set_num_threads(before)
    assert_matches(keys, want)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_every_bit_pattern(dtype):
    # All 65536 values as key and (shuffled) as query. m = 0.5 makes both products exact in
    # float32, so torch's own float32 -> half rounding is the bit-exact reference; m = 1 and
    # m = 0 must reproduce key and query bit for bit (NaN payloads aside).
    bits = torch.arange(-2**15, 2**15, dtype=torch.int16)
    key = bits.view(dtype).clone()
    query = bits[torch.randperm(bits.numel())].view(dtype).clone()
    everywhere = torch.ones_like(bits, dtype=torch.bool)
    cases = ((0.5, (key.float() * 0.5 + query.float() * 0.5).to(dtype), everywhere),
             (1.0, key, query.isfinite()),  # 0 * inf is NaN: compare where the 0 term is finite
             (0.0, query, key.isfinite()))
    for m, want, where in cases:
        got = key.clone()
        pcl_ext.momentum_update_([got], [query], m)
        got, want = got[where], want[where]
        assert torch.equal(got.isnan(), want.isnan())
        ok = ~got.isnan()
        assert torch.equal(got[ok], want[ok])  # bit equality up to the sign of zero


def layouts(device="cpu"):
    """(key, query) pairs whose key is not contiguous, or whose query has another layout."""
    gen = torch.Generator().manual_seed(torch.seed() % 2**31)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device)

    base = rand(6, 10)
    return [
        (rand(5, 7).t(), rand(7, 5)),                                   # transposed key
        (base[:, ::2], rand(6, 5)),                                     # strided view of base
        (rand(4, 3, 5, 5).to(memory_format=torch.channels_last),        # dense, not contiguous
         rand(4, 3, 5, 5).to(memory_format=torch.channels_last)),
        (rand(4, 3, 5, 5).to(memory_format=torch.channels_last), rand(4, 3, 5, 5)),
        (rand(3, 4), rand(4, 3).t()),                                   # transposed query
        (rand(3, 4), rand(4).expand(3, 4)),                             # stride-0 query
        (rand(8)[1:], rand(14)[::2]),                                # offset / strided
    ], base


def check_layouts(device):
    pairs, base = layouts(device)
    keys = [k for k, _ in pairs]
    queries = [q for _, q in pairs]
    want = reference_f64(keys, queries, 0.75)
    strides = [k.stride() for k in keys]
    base_before = base.clone()
    pcl_ext.momentum_update_(keys, queries, 0.75)
    assert_matches(keys, want)
    assert [k.stride() for k in keys] == strides  # updated where they lie
    # The strided view wrote its own elements of base, and nothing else.
    assert_matches([base[:, ::2]], want[1:2])
    assert torch.equal(base[:, 1::2], base_before[:, 1::2])


def test_non_contiguous_layouts():
    check_layouts("cpu")


def test_modules_average_parameters_not_buffers():
    torch.manual_seed(torch.seed() % 2**31)

    def net():
        return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.BatchNorm1d(7),
                                   torch.nn.ReLU(), torch.nn.Linear(7, 3))

    key, query = net(), net()
    for p in key.parameters():
        p.requires_grad_(False)  # as MoCo and PCL set up the key encoder
    key.train()(torch.randn(9, 5))  # make the buffers differ between the two
    query.train()(torch.randn(9, 5))
    buffers = {n: b.clone() for n, b in key.named_buffers()}
    want = reference_f64(list(key.parameters()), list(query.parameters()), 0.999)
    pcl_ext.momentum_update_(key, query, 0.999)
    assert_matches(list(key.parameters()), want)
    for n, b in key.named_buffers():
        assert torch.equal(b, buffers[n]), n


def test_leaves_that_require_grad_and_autograd_state():
    keys = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    queries = [torch.randn(4, 3, requires_grad=True), torch.randn(3, requires_grad=True)]
    want = reference_f64(keys, queries, 0.5)
    pcl_ext.momentum_update_(iter(keys), (q for q in queries), 0.5)  # any iterable
    assert_matches(keys, want)
    for k in keys:
        assert k.is_leaf and k.grad_fn is None and k.requires_grad
    assert torch.is_grad_enabled()
    # A single tensor pair works too.
    k, q = torch.zeros(5), torch.ones(5)
    pcl_ext.momentum_update_(k, q, 0.25)
    assert torch.equal(k, torch.full((5,), 0.75))


def test_empty_lists_are_a_no_op():
    pcl_ext.momentum_update_([], [], 0.5)
    pcl_ext.momentum_update_(torch.nn.ReLU(), torch.nn.ReLU(), 0.5)


def test_opcheck():
    keys, queries = sample_pairs([(3, 4), (), (5,), (0,)], [torch.float32, torch.float64])
    torch.library.opcheck(torch.ops.pcl_ext.momentum_update_.default, (keys, queries, 0.9))


def test_torch_compile_fullgraph():
    keys, queries = sample_pairs([(3, 4), (6,)], [torch.float32])
    want = reference_f64(keys, queries, 0.9)

    def step(keys, queries):
        pcl_ext.momentum_update_(keys, queries, 0.9)

    torch.compile(step, fullgraph=True, backend="aot_eager")(keys, queries)
    assert_matches(keys, want)


def _bad(keys, queries, m=0.5):
    return keys, queries, m


BAD_INPUTS = [  # (what, mutation of (keys, queries, m), exception, message fragment)
    ("count", lambda k, q, m: _bad(k, q[:-1], m), ValueError, "`key` and `query`"),
    ("shape", lambda k, q, m: _bad(k, [q[0], q[1][:-1], q[2]], m), ValueError, "`query[1]`"),
    ("0-d vs 1-d", lambda k, q, m: _bad([k[0], k[1], k[2][None]], q, m), ValueError,
     "`query[2]`"),
    ("dtype", lambda k, q, m: _bad(k, [q[0], q[1], q[2].double()], m), TypeError, "`query[2]`"),
    ("int key", lambda k, q, m: _bad([k[0].long()] + k[1:], [q[0].long()] + q[1:], m),
     TypeError, "`key[0]`"),
    ("not a tensor", lambda k, q, m: _bad(k, [q[0], 1.0, q[2]], m), TypeError, "`query[1]`"),
    ("not iterable", lambda k, q, m: _bad(3, q, m), TypeError, "`key`"),
    ("m negative", lambda k, q, m: _bad(k, q, -0.1), ValueError, "`m`"),
    ("m above 1", lambda k, q, m: _bad(k, q, 1.5), ValueError, "`m`"),
    ("m nan", lambda k, q, m: _bad(k, q, math.nan), ValueError, "`m`"),
    ("m inf", lambda k, q, m: _bad(k, q, math.inf), ValueError, "`m`"),
]


@pytest.mark.parametrize("what,mutation,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(what, mutation, exc, fragment):
    keys, queries = sample_pairs([(4, 3), (5,), ()], [torch.float32])
    before = [k.clone() for k in keys]
    args = mutation(keys, queries, 0.5)
    with pytest.raises(exc, match=fragment.replace("[", r"\[").replace("]", r"\]")):
        pcl_ext.momentum_update_(*args)
    for k, k0 in zip(keys, before):  # checked before anything is written
        assert torch.equal(k, k0)


# ---------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("m", [0.0, 0.999, 1.0])
def test_matches_reference_cuda(m):
    # Mixed dtypes (one launch per dtype), odd sizes, many blocks, unaligned storage offsets.
    shapes = SHAPES + [(3_000_001,), (1025,), (2, 4099)]
    keys, queries = sample_pairs(shapes, DTYPES, "cuda")
    keys += [torch.randn(4097, device="cuda")[1:], torch.randn(9000, device="cuda")[3:]]
    queries += [torch.randn(4096, device="cuda"), torch.randn(9000, device="cuda")[2:-1]]
    want = reference_f64(keys, queries, m)
    torch.cuda.set_sync_debug_mode("error")  # the op must not synchronize with the host
    try:
        pcl_ext.momentum_update_(keys, queries, m)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_matches(keys, want)


@cuda_only
def test_cuda_matches_cpu_and_layouts():
    keys, queries = sample_pairs([(70001,), (3, 5), ()], [torch.float32, torch.bfloat16])
    cpu_keys = [k.clone() for k in keys]
    cuda_keys = [k.cuda() for k in keys]
    pcl_ext.momentum_update_(cpu_keys, queries, 0.99)
    pcl_ext.momentum_update_(cuda_keys, [q.cuda() for q in queries], 0.99)
    for c, g in zip(cpu_keys, cuda_keys):  # float32 math on both: at most one rounding apart
        torch.testing.assert_close(g.cpu().double(), c.double(), rtol=2 * EPS[c.dtype],
                                   atol=1e-9)
    check_layouts("cuda")


@cuda_only
def test_cuda_opcheck_and_bad_device():
    keys, queries = sample_pairs([(3, 4), (), (5,)], [torch.float32, torch.float16], "cuda")
    torch.library.opcheck(torch.ops.pcl_ext.momentum_update_.default, (keys, queries, 0.9))
    with pytest.raises(ValueError, match=r"`query\[1\]` must be on cuda"):
        pcl_ext.momentum_update_(keys, [queries[0], queries[1].cpu(), queries[2]], 0.9)
    with pytest.raises(ValueError, match=r"`key\[0\]` is on cpu"):
        pcl_ext.momentum_update_([keys[0].cpu()] + keys[1:], [queries[0].cpu()] + queries[1:],
                                 0.9)
