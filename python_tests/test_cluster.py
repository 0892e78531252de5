"""pcl_ext.cluster (PCL's E-step) and the k-means under it, on small synthetic data."""
import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import adjusted_mutual_info_score

import pcl_ext
from pcl_ext.cluster import (ClusterResult, _kmeans_torch, _TorchDataset, coagulation_stats,
                             kmeans)

from conftest import cuda_only
FAST = dict(nredo=1)  # PCL's nredo=5 only where the test needs the best of several runs


pytestmark = pytest.mark.usefixtures("one_thread")


def unit_features(n=2000, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=gen), dim=1)


def blobs(num_blobs=4, per_blob=300, d=16, noise=0.05, seed=0):
    """Well-separated clusters on the unit sphere, shuffled, with their labels."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(num_blobs, d, generator=gen), dim=1)
    labels = torch.arange(num_blobs).repeat_interleave(per_blob)
    x = centres[labels] + noise * torch.randn(len(labels), d, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return F.normalize(x[perm], dim=1), labels[perm]


def ami(a, b):
    return adjusted_mutual_info_score(np.asarray(a), np.asarray(b))


def test_shapes_dtypes_and_phi():
    x = unit_features()
    result = pcl_ext.cluster(x, (10, 50), temperature=0.3, **FAST)
    assert isinstance(result, ClusterResult) and result.backend == "faiss-cpu"
    for m, k in enumerate((10, 50)):
        a, c, phi = result.im2cluster[m], result.centroids[m], result.density[m]
        assert a.dtype == torch.int64 and a.shape == (2000,)
        assert 0 <= a.min() and a.max() < k
        assert c.dtype == torch.float32 and c.shape == (k, 16)
        torch.testing.assert_close(c.norm(dim=1), torch.ones(k))
        assert phi.dtype == torch.float32 and phi.shape == (k,)
        assert torch.isfinite(phi).all() and (phi > 0).all()
        torch.testing.assert_close(phi.mean(), torch.tensor(0.3))
    assert len(result.kmeans_seconds) == len(result.density_seconds) == 2
    assert all(t >= 0 for t in result.kmeans_seconds + result.density_seconds)


def test_kmeans_distances_are_to_the_unnormalized_own_centroid():
    x = unit_features(n=500)
    km = kmeans(x, 20, seed=3)
    diffs = x[:, None, :] - km.centroids[None, :, :]
    sq = diffs.square().sum(-1)                                      # n x K
    torch.testing.assert_close(km.sq_dist, sq.gather(1, km.assignments[:, None])[:, 0],
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(km.sq_dist, sq.min(1).values, atol=1e-5, rtol=1e-4)
    assert (km.centroids.norm(dim=1) < 0.999).any()  # really unnormalized: inside the sphere


def test_density_is_pcl_concentration_of_the_kmeans_output():
    x = unit_features(n=1000)
    result = pcl_ext.cluster(x, (8, 30), seed=5, temperature=0.2, alpha=10.0, **FAST)
    for m, k in enumerate((8, 30)):
        km = kmeans(x, k, seed=5 + m, **FAST)  # granularity m is seeded with seed + m
        assert torch.equal(result.im2cluster[m], km.assignments)
        torch.testing.assert_close(result.centroids[m], F.normalize(km.centroids, dim=1))
        phi = pcl_ext.concentration(km.sq_dist, km.assignments, k, temperature=0.2, alpha=10.0)
        torch.testing.assert_close(result.density[m], phi)


def test_deterministic_under_a_seed():
    x = unit_features()
    r1, r2 = (pcl_ext.cluster(x, (10, 50), seed=7, **FAST) for _ in range(2))
    r3 = pcl_ext.cluster(x, (10, 50), seed=8, **FAST)
    for key in ("im2cluster", "centroids", "density"):
        for t1, t2 in zip(r1[key], r2[key]):
            assert torch.equal(t1, t2)
    assert not torch.equal(r1.im2cluster[1], r3.im2cluster[1])


def test_recovers_separated_blobs():
    # Random initialization misses a blob about half the time with 4 blobs: the best of 10
    # runs (lowest objective) finds them all.
    x, labels = blobs()
    result = pcl_ext.cluster(x, 4, nredo=10)
    assert ami(result.im2cluster[0], labels) > 0.99


def test_features_are_normalized_first():
    x = unit_features(n=1000)
    scaled = x * torch.linspace(0.5, 3.0, 1000)[:, None]
    r1, r2 = pcl_ext.cluster(x, 10, **FAST), pcl_ext.cluster(scaled, 10, **FAST)
    assert torch.equal(r1.im2cluster[0], r2.im2cluster[0])
    r3 = pcl_ext.cluster(scaled, 10, normalize=False, **FAST)
    assert not torch.equal(r1.im2cluster[0], r3.im2cluster[0])


def test_k_close_to_n_with_duplicates():
    """Duplicated points make ties and empty clusters, which faiss re-splits; the empty ones
    take the largest phi and nothing turns NaN (faiss's distances can round below 0)."""
    base = unit_features(n=200, seed=1)
    x = torch.cat([base, base[:100]])
    result = pcl_ext.cluster(x, 250, **FAST)
    a, phi = result.im2cluster[0], result.density[0]
    sizes = torch.bincount(a, minlength=250)
    assert (sizes == 0).any()
    assert torch.isfinite(phi).all() and (phi >= 0).all()
    torch.testing.assert_close(phi.mean(), torch.tensor(0.2))
    torch.testing.assert_close(phi[sizes == 0], phi.max().expand(int((sizes == 0).sum())))
    # every point sits at its own cluster's centre: duplicates share one
    assert torch.equal(a[:100], a[200:])


def test_k_equal_to_n():
    x = unit_features(n=64)
    result = pcl_ext.cluster(x, 64, **FAST)
    assert sorted(result.im2cluster[0].tolist()) == list(range(64))


def test_mapping_access_and_to():
    result = pcl_ext.cluster(unit_features(n=500), (5, 10), **FAST)
    assert result["im2cluster"] is result.im2cluster
    assert result["centroids"] is result.centroids and result["density"] is result.density
    assert dict(result) == {k: getattr(result, k) for k in ("im2cluster", "centroids", "density")}
    assert [k for k, _ in result.items()] == ["im2cluster", "centroids", "density"]
    with pytest.raises(KeyError):
        result["backend"]
    moved = result.to("meta")
    assert all(t.device.type == "meta" for ts in moved.values() for t in ts)
    assert all(t.device.type == "cpu" for ts in result.values() for t in ts)  # a copy
    assert moved.im2cluster[0].dtype == torch.int64
    assert moved.backend == result.backend and moved.kmeans_seconds == result.kmeans_seconds


def test_faiss_follows_torch_threads(monkeypatch):
    seen = []
    monkeypatch.setattr(faiss.Clustering, "train",
                        lambda self, *args: seen.append(faiss.omp_get_max_threads()))
    monkeypatch.setattr(faiss.IndexFlatL2, "search", lambda self, x, k: (
        np.zeros((len(x), 1), np.float32), np.zeros((len(x), 1), np.int64)))
    # faiss and torch may share one OpenMP runtime, or not: pretend they disagree
    faiss.omp_set_num_threads(2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    kmeans(unit_features(n=50), 5)
    assert seen == [1] and faiss.omp_get_max_threads() == 2  # restored after the call


def test_no_granularity():
    result = pcl_ext.cluster(unit_features(n=100), ())
    assert result.im2cluster == result.centroids == result.density == []


def test_other_float_dtypes():
    x = unit_features(n=500)
    r32 = pcl_ext.cluster(x, 10, **FAST)
    r64 = pcl_ext.cluster(x.double(), 10, **FAST)
    assert torch.equal(r32.im2cluster[0], r64.im2cluster[0])
    assert r64.centroids[0].dtype == r64.density[0].dtype == torch.float32


@pytest.mark.parametrize("features, k, exc, name", [
    (np.zeros((10, 4), dtype=np.float32), 2, TypeError, "features"),
    (torch.zeros(10), 2, ValueError, "features"),
    (torch.zeros(0, 4), 2, ValueError, "features"),
    (torch.zeros(10, 4, dtype=torch.int64), 2, TypeError, "features"),
    (torch.full((10, 4), float("nan")), 2, ValueError, "features"),
    (torch.randn(10, 4), 11, ValueError, "num_clusters"),
    (torch.randn(10, 4), (2, 0), ValueError, "num_clusters"),
    (torch.randn(10, 4), ("5",), TypeError, "num_clusters"),
])
def test_bad_input(features, k, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        pcl_ext.cluster(features, k)


def test_bad_backend():
    with pytest.raises(ValueError, match="`backend`"):
        pcl_ext.cluster(unit_features(n=50), 5, backend="sklearn")
    with pytest.raises(ValueError, match="`backend`"):  # a CPU tensor
        pcl_ext.cluster(unit_features(n=50), 5, backend="torch-cuda")
    if faiss.get_num_gpus() == 0:
        with pytest.raises(ValueError, match="`backend`"):
            pcl_ext.cluster(unit_features(n=50), 5, backend="faiss-gpu")


# The torch-assignment backend runs its device-agnostic core on the CPU here.
TORCH_KM = dict(niter=20, nredo=1, seed=0, verbose=False, max_points_per_centroid=1000,
                min_points_per_centroid=1)


def test_torch_dataset_search_and_sums():
    x = unit_features(n=300)
    centroids = unit_features(n=7, seed=2) * 0.9
    data = _TorchDataset(x, block_elems=7 * 64)  # several row blocks
    assign, dist, sums = data.assign_to(centroids)
    sq = (x[:, None] - centroids[None]).square().sum(-1)
    torch.testing.assert_close(dist, sq.min(1).values, atol=1e-5, rtol=1e-4)
    assert np.array_equal(assign, sq.argmin(1).numpy())
    expected = torch.zeros(7, 16).index_add_(0, torch.from_numpy(assign), x)
    torch.testing.assert_close(sums, expected)


def test_torch_kmeans_recovers_blobs_and_is_deterministic():
    x, labels = blobs()
    runs = [_kmeans_torch(x, 4, **{**TORCH_KM, "nredo": 10}) for _ in range(2)]
    (c, dist, a), (c2, _, a2) = runs
    assert ami(a, labels) > 0.99
    assert torch.equal(a, a2) and torch.equal(c, c2)
    torch.testing.assert_close(dist, (x - c[a]).square().sum(1), atol=1e-5, rtol=1e-4)


def test_torch_kmeans_keeps_the_best_redo():
    x = unit_features(n=1000)
    # redo r is a single run seeded like faiss's redos: seed + r * 15486557
    singles = [_kmeans_torch(x, 20, **{**TORCH_KM, "seed": 3 + r * 15486557}) for r in range(3)]
    _, dist, a = _kmeans_torch(x, 20, **{**TORCH_KM, "seed": 3, "nredo": 3})
    objectives = [d.sum().item() for _, d, _ in singles]
    assert len(set(objectives)) == 3
    best = singles[int(np.argmin(objectives))]
    assert torch.equal(a, best[2]) and torch.equal(dist, best[1])


def test_torch_kmeans_subsamples_and_splits_empty_clusters():
    base = unit_features(n=200, seed=1)
    x = torch.cat([base, base[:100]])
    c, dist, a = _kmeans_torch(x, 250, **TORCH_KM)
    assert a.shape == (300,) and c.shape == (250, 16) and (dist >= 0).all()
    x = unit_features(n=1000)
    c, dist, a = _kmeans_torch(x, 10, **{**TORCH_KM, "max_points_per_centroid": 20})
    assert a.shape == (1000,) and torch.bincount(a, minlength=10).sum() == 1000


@cuda_only
def test_cuda_backends():
    x, labels = blobs()
    x = x.cuda()
    auto = pcl_ext.cluster(x, (4, 40), nredo=10)
    assert auto.backend == ("faiss-gpu" if faiss.get_num_gpus() > 0 else "torch-cuda")
    assert ami(auto.im2cluster[0].cpu(), labels) > 0.99
    for ts in auto.values():
        assert all(t.is_cuda for t in ts)
    again = pcl_ext.cluster(x, (4, 40), backend="torch-cuda", nredo=1)
    twice = pcl_ext.cluster(x, (4, 40), backend="torch-cuda", nredo=1)
    assert again.backend == "torch-cuda"
    for t1, t2 in zip(again.im2cluster + again.density, twice.im2cluster + twice.density):
        assert torch.equal(t1, t2)
    phi = again.density[1]
    assert torch.isfinite(phi).all() and (phi > 0).all()
    torch.testing.assert_close(phi.mean(), torch.tensor(0.2, device="cuda"))


@cuda_only
def test_torch_dataset_on_cuda_matches_cpu():
    x, centroids = unit_features(n=3000), unit_features(n=50, seed=2) * 0.9
    assign, dist, sums = _TorchDataset(x).assign_to(centroids)
    assign_c, dist_c, sums_c = _TorchDataset(x.cuda(), block_elems=50 * 512).assign_to(
        centroids.cuda())
    assert (assign == assign_c).mean() > 0.999  # rounding may flip exact near-ties
    torch.testing.assert_close(dist_c.cpu(), dist, atol=1e-5, rtol=1e-4)
    if (assign == assign_c).all():
        torch.testing.assert_close(sums_c.cpu(), sums, atol=1e-4, rtol=1e-4)


def test_coagulation_stats_by_brute_force():
    x = unit_features(n=700, d=8, seed=4)
    result = pcl_ext.cluster(x, (5, 40), seed=2, **FAST)
    stats = coagulation_stats(x, result, block_rows=100)
    assert len(stats) == 2
    for m, s in enumerate(stats):
        a, c, phi = result.im2cluster[m], result.centroids[m].double(), result.density[m].double()
        x64 = x.double()
        sizes = torch.bincount(a, minlength=len(c))
        used = c[sizes > 0]
        pair_sq = [(used[i] - used[j]).square().sum() for i in range(len(used))
                   for j in range(len(used)) if i != j]
        spread_sq = torch.stack([(x64[i] - c[a[i]]).square().sum() for i in range(len(x))])
        want = (spread_sq.mean() / torch.stack(pair_sq).mean()).sqrt()
        assert s["spread_ratio"] == pytest.approx(want.item(), rel=1e-6)  # float32 features
        assert s["empty_share"] == (sizes == 0).sum().item() / len(c)
        assert s["singleton_share"] == (sizes == 1).sum().item() / len(c)
        assert s["phi_cv"] == pytest.approx(np.std(phi.numpy()) / np.mean(phi.numpy()), rel=1e-9)


def test_coagulation_stats_counts_and_tightness():
    x, labels = blobs(num_blobs=4, per_blob=100, noise=0.01)
    protos = F.normalize(torch.stack([x[labels == b].mean(0) for b in range(4)]
                                     + [-x[0], x[1]]), dim=1)      # cluster 4 empty, 5 a singleton
    assign = labels.clone()
    assign[1] = 5
    phi = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    (tight,) = coagulation_stats(x, ClusterResult([assign], [protos], [phi]))
    assert tight["empty_share"] == 1 / 6 and tight["singleton_share"] == 1 / 6
    assert tight["spread_ratio"] < 0.05                              # samples on their prototype
    assert tight["phi_cv"] == pytest.approx(np.std([1, 2, 3, 4, 5, 6]) / 3.5)
    loose = unit_features(n=400, d=16)
    (spread,) = coagulation_stats(loose, pcl_ext.cluster(loose, 4, **FAST))
    assert 0.4 < spread["spread_ratio"] < 1.0 and spread["empty_share"] == 0
    with pytest.raises(ValueError, match="`result`"):
        coagulation_stats(loose[:10], ClusterResult([assign], [protos], [phi]))


def lloyd_step(x, centroids):
    """One Lloyd iteration by hand: the mean of the rows nearest to each centroid."""
    nearest = torch.cdist(x.double(), centroids.double()).argmin(1)
    return torch.stack([x[nearest == c].double().mean(0) for c in range(len(centroids))])


@pytest.mark.parametrize("backend", ["faiss-cpu", "torch"])
def test_kmeans_starts_from_init(backend):
    x, _ = blobs(num_blobs=5, per_blob=80, noise=0.3, seed=1)
    init = x[:5] + 0.01  # five rows of the data, not faiss's random choice
    if backend == "torch":  # the torch-CUDA backend's code path, run on CPU tensors
        centroids, _, _ = _kmeans_torch(x, 5, niter=1, nredo=1, seed=0, verbose=False,
                                        max_points_per_centroid=1000,
                                        min_points_per_centroid=1, init=init)
    else:
        centroids = kmeans(x, 5, niter=1, init=init, min_points_per_centroid=1).centroids
    torch.testing.assert_close(centroids.double(), lloyd_step(x, init), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="`init`"):
        kmeans(x, 5, init=init[:4])
    with pytest.raises(ValueError, match="`init`"):
        kmeans(x, 5, init=init, nredo=2)


def test_warm_start_from_previous_result():
    # A warm start keeps the previous clustering's local optima: with these blobs at noise 0.1
    # a one-run cold start merges two of them, and so does the warm start from it (PCL's
    # nredo=5 from scratch can escape that). At noise 0.2 the cold run finds the blobs.
    x, labels = blobs(num_blobs=6, per_blob=150, noise=0.2, seed=3)
    cold = pcl_ext.cluster(x, (6, 30), seed=1, **FAST)
    assert cold.warm == [False, False]
    moved = F.normalize(x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)),
                        dim=1)  # the next epoch's features: moved a little
    # Granularity 1's entry has a different K: it falls back to PCL's cold scheme.
    warm = pcl_ext.cluster(moved, (6, 40), seed=1, init_centroids=cold.centroids, warm_niter=3,
                           **FAST)
    assert warm.warm == [True, False]
    assert ami(warm.im2cluster[0], cold.im2cluster[0]) > 0.95
    recold = pcl_ext.cluster(moved, (6, 40), seed=1, **FAST)
    assert ami(warm.im2cluster[0], labels) > 0.85
    assert warm.objective[0] <= 1.01 * recold.objective[0]  # as good as a cold run here
    assert torch.equal(warm.im2cluster[1], recold.im2cluster[1])  # the cold one is PCL's
    # Wrong dimension or no entry: cold too.
    other = pcl_ext.cluster(moved, (6, 30), seed=1, init_centroids=[cold.centroids[0][:, :8]],
                            **FAST)
    assert other.warm == [False, False]
    assert pcl_ext.cluster(moved, (6,), init_centroids=[None], **FAST).warm == [False]
    with pytest.raises(ValueError, match="`warm_niter`"):
        pcl_ext.cluster(moved, (6,), warm_niter=0)
    assert warm.to("cpu").warm == [True, False]


@cuda_only
def test_warm_start_torch_cuda():
    x, labels = blobs(num_blobs=6, per_blob=150, noise=0.2, seed=3)
    cold = pcl_ext.cluster(x.cuda(), (6, 30), seed=1, **FAST)
    warm = pcl_ext.cluster(x.cuda(), (6, 30), seed=1, init_centroids=cold.centroids,
                           warm_niter=2, **FAST)
    assert warm.backend == cold.backend == "torch-cuda" and warm.warm == [True, True]
    assert ami(warm.im2cluster[0].cpu(), cold.im2cluster[0].cpu()) > 0.95
    # One Lloyd step from the given centroids, as on the CPU.
    init = x[:5].cuda() + 0.01
    one = kmeans(x.cuda(), 5, niter=1, init=init, min_points_per_centroid=1).centroids
    torch.testing.assert_close(one.double().cpu(), lloyd_step(x, init.cpu()), atol=1e-5,
                               rtol=1e-5)
