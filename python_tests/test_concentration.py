"""pcl_ext.concentration against PCL's loop (pcl_ext.reference.pcl_concentration) in float64,
plus opcheck, determinism and bad input."""
import numpy as np
import pytest
import torch

import pcl_ext
from pcl_ext.reference import pcl_concentration

from conftest import cuda_only


def sample_inputs(n, k, seed=None, dtype=torch.float32, device="cpu"):
    """faiss-shaped [n, 1] distances and ids; uneven clusters, some empty or single."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    # Squaring skews the ids towards 0: big clusters at the front, empty ones at the back.
    ids = (torch.rand(n, generator=gen) ** 2 * k).long().clamp_(max=k - 1)
    if n >= 4:
        ids[:2] = k - 1  # a single-member cluster is likely elsewhere; force a two-member one
    scale = torch.rand(k, generator=gen, dtype=torch.float64) * 3 + 0.1
    dist = torch.rand(n, generator=gen, dtype=torch.float64) ** 2 * scale[ids]
    return dist[:, None].to(device=device, dtype=dtype), ids[:, None].to(device)


def expected(dist, ids, k, **kw):
    return torch.from_numpy(pcl_concentration(dist.double().cpu().numpy(), ids.cpu().numpy(), k,
                                              **kw))


CASES = [  # n, k, kwargs
    (300, 20, {}),
    (1000, 150, dict(temperature=0.1)),
    (40, 100, {}),                               # K > n: most clusters empty or single
    (500, 60, dict(alpha=1e6)),                  # large alpha
    (500, 60, dict(alpha=-0.5, temperature=1.0)),
    (2, 1, {}),                                  # K = 1
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_matches_pcl_loop(case, dtype):
    n, k, kw = CASES[case]
    dist, ids = sample_inputs(n, k, dtype=dtype)
    got = pcl_ext.concentration(dist, ids, k, **kw)
    assert got.dtype == dtype and got.shape == (k,)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(got.double(), expected(dist, ids, k, **kw), **tol)


def test_percentile_is_numpys_linear_interpolation():
    # Few clusters: the percentiles fall between two order statistics ((K - 1) / 10 is not an
    # integer), where the other interpolations give other values: the test can tell them apart.
    for k in (7, 13, 24):
        dist, ids = sample_inputs(50 * k, k, dtype=torch.float64)
        got = pcl_ext.concentration(dist, ids, k).numpy()
        np.testing.assert_allclose(got, pcl_concentration(dist.numpy(), ids.numpy(), k),
                                   rtol=1e-13)
        for method in ("lower", "higher", "nearest", "midpoint"):
            assert not np.allclose(got, pcl_concentration(dist.numpy(), ids.numpy(), k,
                                                          method=method), rtol=1e-6, atol=0)


def test_flat_shapes_and_half_input():
    dist, ids = sample_inputs(400, 30, dtype=torch.float64)
    want = expected(dist, ids, 30)
    torch.testing.assert_close(pcl_ext.concentration(dist[:, 0], ids[:, 0], 30).double(), want,
                               rtol=1e-6, atol=0)
    half = pcl_ext.concentration(dist.half(), ids, 30)
    assert half.dtype == torch.float32
    torch.testing.assert_close(half.double(), expected(dist.half(), ids, 30), rtol=1e-6, atol=0)


def test_non_contiguous_inputs():
    dist, ids = sample_inputs(300, 25)
    dist2 = torch.stack([dist[:, 0], -dist[:, 0]], dim=1)[:, 0]
    ids2 = torch.stack([ids[:, 0], ids[:, 0] + 99], dim=1)[:, :1]
    assert not dist2.is_contiguous() and not ids2.is_contiguous()
    assert torch.equal(pcl_ext.concentration(dist2, ids2, 25), pcl_ext.concentration(dist, ids, 25))


def test_cluster_stats_op():
    dist, ids = sample_inputs(500, 40, dtype=torch.float64)
    phi, count = torch.ops.pcl_ext.cluster_stats(dist, ids, 40, 10.0)
    assert phi.dtype == torch.float64 and count.dtype == torch.int64
    assert torch.equal(count, torch.bincount(ids[:, 0], minlength=40))
    sums = torch.zeros(40, dtype=torch.float64).index_add_(0, ids[:, 0], dist[:, 0].sqrt())
    m = count.double()
    want = torch.where(count > 1, sums / m / torch.log(m + 10.0), 0.0)
    torch.testing.assert_close(phi, want, rtol=1e-13, atol=0)


@pytest.mark.parametrize("n,k", [(50, 8), (10, 30), (0, 5)])
def test_opcheck(n, k):
    dist, ids = sample_inputs(n, k)
    torch.library.opcheck(torch.ops.pcl_ext.cluster_stats.default, (dist, ids, k, 10.0))
    torch.library.opcheck(torch.ops.pcl_ext.cluster_stats.default, (dist[:, 0], ids[:, 0], k, 0.5))


def test_degenerate_clusterings_give_the_temperature():
    k = 20
    singletons = torch.randperm(k)[:15]  # 15 single-member clusters, 5 empty ones
    with np.errstate(invalid="ignore"):
        assert np.isnan(pcl_concentration(np.ones((15, 1)), singletons[:, None].numpy(),
                                          k)).all()
    got = pcl_ext.concentration(torch.rand(15), singletons, k, temperature=0.3)
    assert torch.equal(got, torch.full((k,), 0.3))
    on_centroids = pcl_ext.concentration(torch.zeros(60), torch.arange(60) % 4, 4)
    assert torch.equal(on_centroids, torch.full((4,), 0.2))
    assert torch.equal(pcl_ext.concentration(torch.zeros(0), torch.zeros(0, dtype=torch.long), 3),
                       torch.full((3,), 0.2))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_zero_phi_clusters_take_the_smallest_positive(device):
    # 30 clusters of 20 points; 9 of them (30% > the 10% clipped away) are exact duplicates
    # sitting on their centroid, so PCL's clipped phi is 0 there and its loss divides by zero.
    k = 30
    dist, ids = sample_inputs(600, k, dtype=torch.float64)
    ids = (torch.arange(600) % k)[:, None]
    dead = torch.randperm(k)[:9]
    dist[torch.isin(ids[:, 0], dead)] = 0.0
    pcl = torch.from_numpy(pcl_concentration(dist.numpy(), ids.numpy(), k))
    assert (pcl[dead] == 0).all() and (pcl > 0).sum() == k - 9
    got = pcl_ext.concentration(dist.to(device), ids.to(device), k).cpu()
    assert torch.isfinite(got).all() and (got > 0).all()
    torch.testing.assert_close(got.mean(), torch.tensor(0.2, dtype=torch.float64))
    alive = pcl > 0
    # Before the rescaling the dead clusters hold the smallest live value: the live clusters
    # keep PCL's ratios, and the dead ones equal the smallest of them.
    torch.testing.assert_close(got[alive] / got[alive].max(), pcl[alive] / pcl[alive].max(),
                               rtol=1e-12, atol=0)
    torch.testing.assert_close(got[dead], got[alive].min().expand(9), rtol=1e-12, atol=0)


def test_deterministic_across_thread_counts():
    dist, ids = sample_inputs(200_000, 3000)
    before = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(pcl_ext.concentration(dist, ids, 3000))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(results[0], results[1])


def test_torch_compile():
    dist, ids = sample_inputs(200, 12)
    compiled = torch.compile(pcl_ext.concentration, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(dist, ids, 12), pcl_ext.concentration(dist, ids, 12))


BAD_INPUTS = [  # (what, mutation of (dist, ids, k, kwargs), exception, message fragment)
    ("id too large", lambda d, i, k, kw: (d, i.index_fill(0, torch.tensor([3]), k), k, kw),
     IndexError, "`im2cluster`"),
    ("id negative", lambda d, i, k, kw: (d, i.index_fill(0, torch.tensor([0]), -1), k, kw),
     IndexError, "`im2cluster`"),
    ("negative distance", lambda d, i, k, kw: (d.index_fill(0, torch.tensor([5]), -1e-3), i, k,
                                               kw), ValueError, "`sq_dist`"),
    ("nan distance", lambda d, i, k, kw: (d.index_fill(0, torch.tensor([1]), float("nan")), i,
                                          k, kw), ValueError, "`sq_dist`"),
    ("inf distance", lambda d, i, k, kw: (d.index_fill(0, torch.tensor([2]), float("inf")), i,
                                          k, kw), ValueError, "`sq_dist`"),
    ("int32 ids", lambda d, i, k, kw: (d, i.int(), k, kw), TypeError, "`im2cluster`"),
    ("int distances", lambda d, i, k, kw: (d.long(), i, k, kw), TypeError, "`sq_dist`"),
    ("ids [n, 2]", lambda d, i, k, kw: (d, i.expand(-1, 2), k, kw), ValueError, "`im2cluster`"),
    ("dist 3-D", lambda d, i, k, kw: (d[None], i, k, kw), ValueError, "`sq_dist`"),
    ("lengths", lambda d, i, k, kw: (d[1:], i, k, kw), ValueError, "same length"),
    ("no clusters", lambda d, i, k, kw: (d, i.clamp(max=0), 0, kw), ValueError,
     "`num_clusters`"),
    ("alpha", lambda d, i, k, kw: (d, i, k, dict(alpha=-1.0)), ValueError, "`alpha`"),
    ("temperature", lambda d, i, k, kw: (d, i, k, dict(temperature=0.0)), ValueError,
     "`temperature`"),
]


@pytest.mark.parametrize("what,mutation,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(what, mutation, exc, fragment, device="cpu"):
    dist, ids = sample_inputs(30, 6)
    dist, ids, k, kw = mutation(dist, ids, 6, {})
    with pytest.raises(exc, match=fragment):
        pcl_ext.concentration(dist.to(device), ids.to(device), k, **kw)


# ---------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_cuda_matches_pcl_loop(case, dtype):
    n, k, kw = CASES[case]
    dist, ids = sample_inputs(n, k, dtype=dtype, device="cuda")
    got = pcl_ext.concentration(dist, ids, k, **kw)
    assert got.device.type == "cuda"
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    tol = dict(rtol=1e-12, atol=0) if dtype == torch.float64 else dict(rtol=1e-6, atol=0)
    torch.testing.assert_close(got.cpu().double(), expected(dist, ids, k, **kw), **tol)


@cuda_only
def test_cuda_deterministic_and_agrees_with_cpu():
    # One huge cluster (a long segment for one warp) next to many small ones.
    dist, ids = sample_inputs(300_000, 5000, device="cuda")
    ids[: 100_000] = 7
    first = pcl_ext.concentration(dist, ids, 5000)
    assert torch.equal(first, pcl_ext.concentration(dist, ids, 5000))
    raw = torch.ops.pcl_ext.cluster_stats(dist, ids, 5000, 10.0)
    raw_cpu = torch.ops.pcl_ext.cluster_stats(dist.cpu(), ids.cpu(), 5000, 10.0)
    assert torch.equal(raw[1].cpu(), raw_cpu[1])
    torch.testing.assert_close(raw[0].cpu(), raw_cpu[0], rtol=1e-12, atol=0)  # sum orders differ
    torch.testing.assert_close(first.cpu(), pcl_ext.concentration(dist.cpu(), ids.cpu(), 5000),
                               rtol=1e-6, atol=0)


@cuda_only
def test_cuda_opcheck():
    dist, ids = sample_inputs(60, 9, device="cuda")
    torch.library.opcheck(torch.ops.pcl_ext.cluster_stats.default, (dist, ids, 9, 10.0))


@cuda_only
@pytest.mark.parametrize("what,mutation,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_cuda_bad_input_names_the_argument(what, mutation, exc, fragment):
    test_bad_input_names_the_argument(what, mutation, exc, fragment, device="cuda")
