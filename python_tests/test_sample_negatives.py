"""pcl_ext.sample_negatives: exclusion, distinctness, reproducibility, uniformity, bad input."""
import itertools
import math

import pytest
import torch

import pcl_ext
from pcl_ext.reference import free_clusters

from conftest import cuda_only


def generator(seed, device="cpu"):
    return torch.Generator(device).manual_seed(seed)


def sample_assignments(n, k, seed=0, device="cpu"):
    """A batch's clusters, with repeats (several rows in one cluster), as in PCL."""
    return torch.randint(0, k, (n,), generator=generator(seed)).to(device)


def expected(assignments, k, r, seed, device="cpu"):
    """The contract spelt out: the r free ids first by (key, id), keys from the same seed, in
    increasing order."""
    keys = torch.rand(k, generator=generator(seed, device), device=device).tolist()
    free = free_clusters(assignments, k)
    return sorted(sorted(free, key=lambda c: (keys[c], c))[:r])


@pytest.mark.parametrize("n,k,r", [(256, 2500, 1638), (40, 50, 10), (5, 5, 0), (0, 7, 7),
                                   (300, 100, 3)])
def test_distinct_free_and_as_specified(n, k, r, device="cpu"):
    a = sample_assignments(n, k, seed=n + k, device=device)
    neg = pcl_ext.sample_negatives(a, k, r, generator=generator(3, device))
    assert neg.dtype == torch.int64 and neg.shape == (r,) and neg.device == a.device
    got = neg.tolist()
    assert len(set(got)) == r
    assert not set(got) & set(a.tolist())
    assert all(0 <= c < k for c in got)
    assert got == expected(a, k, r, 3, device)


def test_same_seed_same_ids_other_seed_other_ids():
    a = sample_assignments(256, 25000)
    first = pcl_ext.sample_negatives(a, 25000, 16384, generator=generator(7))
    assert torch.equal(first, pcl_ext.sample_negatives(a, 25000, 16384, generator=generator(7)))
    assert not torch.equal(first, pcl_ext.sample_negatives(a, 25000, 16384,
                                                           generator=generator(8)))
    torch.manual_seed(11)
    default = pcl_ext.sample_negatives(a, 25000, 100)
    torch.manual_seed(11)
    assert torch.equal(default, pcl_ext.sample_negatives(a, 25000, 100))


def test_r_equal_to_the_free_count():
    a = torch.tensor([3, 3, 0, 9, 3])  # 5 rows, 3 distinct clusters: 7 of 10 are free
    neg = pcl_ext.sample_negatives(a, 10, 7, generator=generator(0))
    assert neg.tolist() == [1, 2, 4, 5, 6, 7, 8]


def test_draws_from_all_clusters_not_only_up_to_the_largest_assigned_id():
    # Clusters 6..9 are empty: PCL draws from range(max + 1) = range(6) and never takes them;
    # here every prototype that is no row's positive can be a negative.
    a = torch.tensor([0, 2, 2, 5])
    assert free_clusters(a, int(a.max()) + 1) == [1, 3, 4]
    neg = pcl_ext.sample_negatives(a, 10, 7, generator=generator(0))
    assert neg.tolist() == [1, 3, 4, 6, 7, 8, 9]


def chi2_upper(df, z=3.0902):
    """Wilson-Hilferty approximation of the chi-square quantile; z = 3.09: p = 0.999."""
    h = 2.0 / (9.0 * df)
    return df * (1.0 - h + z * math.sqrt(h)) ** 3


def test_uniform_over_the_free_subsets():
    # K = 12 with 4 clusters taken leaves F = 8 free: each of the C(8, 3) = 56 subsets of r = 3
    # must come up equally often (so each free cluster with frequency r / F). Fixed seeds: the
    # test is deterministic, yet a biased sampler fails it.
    k, r = 12, 3
    a = torch.tensor([1, 4, 4, 7, 10, 1])
    free = free_clusters(a, k)
    subsets = {s: 0 for s in itertools.combinations(free, r)}
    draws = 100 * len(subsets)
    gen = generator(1234)
    for _ in range(draws):
        subsets[tuple(pcl_ext.sample_negatives(a, k, r, generator=gen).tolist())] += 1
    assert sum(subsets.values()) == draws  # every draw was a free subset
    e = draws / len(subsets)
    stat = sum((o - e) ** 2 / e for o in subsets.values())
    assert stat < chi2_upper(len(subsets) - 1), stat
    # Each cluster's inclusion count: the mean is draws * r / F, the spread below is 5 sigma.
    inclusion = [sum(o for s, o in subsets.items() if c in s) for c in free]
    p = r / len(free)
    sigma = math.sqrt(draws * p * (1 - p))
    assert all(abs(x - draws * p) < 5 * sigma for x in inclusion), inclusion


def test_smallest_keys_ties_broken_by_id():
    op = torch.ops.pcl_ext.sample_negatives
    assert op(torch.tensor([0, 2, 2]), torch.zeros(10), 4).tolist() == [1, 3, 4, 5]
    keys = torch.tensor([0.5, -0.0, 0.0, -1.0, 2.0, 0.5, 0.7])
    assert op(torch.tensor([4]), keys, 3).tolist() == [1, 2, 3]   # -1, -0 == +0
    assert op(torch.tensor([4]), keys, 4).tolist() == [0, 1, 2, 3]  # 0.5 (id 0) before id 5
    assert op(torch.tensor([4]), keys, 5).tolist() == [0, 1, 2, 3, 5]
    # The whole float range, NaN included (it ranks last): no undefined order.
    keys = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e-45, -1e-45, 3e38])
    assert op(torch.tensor([], dtype=torch.long), keys, 3).tolist() == [2, 3, 4]
    assert op(torch.tensor([], dtype=torch.long), keys, 5).tolist() == [1, 2, 3, 4, 5]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=cuda_only)])
def test_op_ranks_any_keys_by_key_then_id(device):
    # Keys of either sign, many repeats, one value: the CPU kernel's bucket select must still
    # find exactly the r smallest (key, id) pairs, wherever the r-th falls.
    gen = generator(99)
    keygens = [lambda k: torch.randn(k, generator=gen),
               lambda k: torch.randint(-3, 4, (k,), generator=gen).float() / 7,
               lambda k: torch.full((k,), 0.25)]
    for trial in range(30):
        k = int(torch.randint(1, 3000, (1,), generator=gen))
        a = torch.randint(0, k, (int(torch.randint(0, k, (1,), generator=gen)),), generator=gen)
        keys = keygens[trial % 3](k)
        free = free_clusters(a, k)
        r = int(torch.randint(0, len(free) + 1, (1,), generator=gen))
        want = sorted(sorted(free, key=lambda c: (keys[c].item(), c))[:r])
        got = torch.ops.pcl_ext.sample_negatives(a.to(device), keys.to(device), r)
        assert got.tolist() == want, (trial, k, r)


@pytest.mark.parametrize("n,k,r", [(6, 20, 5), (0, 4, 4), (3, 3, 0)])
def test_opcheck(n, k, r):
    a = sample_assignments(n, k)
    keys = torch.rand(k)
    torch.library.opcheck(torch.ops.pcl_ext.sample_negatives.default, (a, keys, r))


def test_non_contiguous_inputs():
    a = sample_assignments(20, 50)
    keys = torch.rand(50)
    a2 = torch.stack([a, a + 1], dim=1)[:, 0]
    keys2 = torch.stack([keys, -keys], dim=1)[:, 0]
    assert not a2.is_contiguous() and not keys2.is_contiguous()
    op = torch.ops.pcl_ext.sample_negatives
    assert torch.equal(op(a2, keys2, 17), op(a, keys, 17))


BAD_INPUTS = [  # (what, (assignments, num_clusters, r), exception, message fragment)
    ("r too large", (torch.tensor([1, 1, 2]), 5, 4), ValueError, "`r`"),
    ("r above K", (torch.tensor([1]), 5, 6), ValueError, "`r`"),
    ("r negative", (torch.tensor([1]), 5, -1), ValueError, "`r`"),
    ("id too large", (torch.tensor([1, 5]), 5, 2), IndexError, "`assignments`"),
    ("id negative", (torch.tensor([-1, 2]), 5, 3), IndexError, "`assignments`"),
    ("int32 ids", (torch.tensor([1, 2], dtype=torch.int32), 5, 2), TypeError, "`assignments`"),
    ("2-D ids", (torch.tensor([[1, 2]]), 5, 2), ValueError, "`assignments`"),
    ("no clusters", (torch.tensor([], dtype=torch.long), 0, 0), ValueError, "`num_clusters`"),
]


@pytest.mark.parametrize("what,args,exc,fragment", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_names_the_argument(what, args, exc, fragment, device="cpu"):
    a, k, r = args
    with pytest.raises(exc, match=fragment):
        pcl_ext.sample_negatives(a.to(device), k, r)


def test_op_bad_keys():
    op = torch.ops.pcl_ext.sample_negatives
    # A kernel on the LibTorch stable ABI cannot raise TypeError (pcl_ext.sample_negatives makes
    # float32 keys itself): the op names the argument in a ValueError.
    with pytest.raises(ValueError, match="`keys` must be float32"):
        op(torch.tensor([1]), torch.rand(5, dtype=torch.float64), 2)
    with pytest.raises(ValueError, match="`keys`"):
        op(torch.tensor([1]), torch.rand(5, 1), 2)
    with pytest.raises(ValueError, match="`keys`"):
        op(torch.tensor([1]), torch.rand(0), 0)


# ---------------------------------------------------------------------------------------- CUDA
@cuda_only
@pytest.mark.parametrize("n,k,r", [(256, 2500, 1638), (40, 50, 10), (5, 5, 0), (0, 7, 7),
                                   (300, 100, 3)])
def test_cuda_distinct_free_and_as_specified(n, k, r):
    test_distinct_free_and_as_specified(n, k, r, device="cuda")


@cuda_only
def test_cuda_same_keys_same_ids_as_cpu_without_sync():
    a = sample_assignments(256, 100000)
    keys = torch.rand(100000, generator=generator(5))
    keys[:50] = keys[50:100]  # ties, broken by id on both devices
    want = torch.ops.pcl_ext.sample_negatives(a, keys, 16384)
    a_cuda, keys_cuda, gen = a.cuda(), keys.cuda(), generator(5, "cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = torch.ops.pcl_ext.sample_negatives(a_cuda, keys_cuda, 16384)
        wrapped = pcl_ext.sample_negatives(a_cuda, 100000, 16384, generator=gen)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(got.cpu(), want)
    again = pcl_ext.sample_negatives(a_cuda, 100000, 16384, generator=generator(5, "cuda"))
    assert torch.equal(wrapped, again)


@cuda_only
def test_cuda_graph_capture():
    a = sample_assignments(64, 1000, device="cuda")
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream):
        pcl_ext.sample_negatives(a, 1000, 500)  # warm-up on the side stream
        with torch.cuda.graph(graph, stream=stream):
            neg = pcl_ext.sample_negatives(a, 1000, 500, generator=gen)
    graph.replay()
    torch.cuda.synchronize()
    assert len(set(neg.tolist())) == 500 and not set(neg.tolist()) & set(a.tolist())


@cuda_only
def test_cuda_opcheck():
    a = sample_assignments(6, 20, device="cuda")
    torch.library.opcheck(torch.ops.pcl_ext.sample_negatives.default,
                          (a, torch.rand(20, device="cuda"), 5))


CUDA_BAD_INPUTS = [b for b in BAD_INPUTS if b[0] not in ("id too large", "id negative")]


@cuda_only
@pytest.mark.parametrize("what,args,exc,fragment", CUDA_BAD_INPUTS,
                         ids=[b[0] for b in CUDA_BAD_INPUTS])
def test_cuda_bad_input_names_the_argument(what, args, exc, fragment):
    test_bad_input_names_the_argument(what, args, exc, fragment, device="cuda")


@cuda_only
def test_cuda_ids_checked_when_r_needs_the_count():
    # r > K - N: the wrapper synchronizes to count the free clusters and checks the ids too.
    with pytest.raises(IndexError, match="`assignments`"):
        pcl_ext.sample_negatives(torch.tensor([1, 5], device="cuda"), 5, 4)
    # r <= K - N: no synchronization, an out-of-range id excludes nothing.
    neg = pcl_ext.sample_negatives(torch.tensor([1, 7], device="cuda"), 5, 3)
    assert len(set(neg.tolist())) == 3 and 1 not in neg.tolist()
