"""PCL's E-step: k-means of the whole data set at several granularities, then concentrations.

``cluster`` returns what PCL's ``run_kmeans`` returns (``im2cluster``, ``centroids``,
``density`` per granularity) as a ``ClusterResult``; ``kmeans`` is the single-granularity
k-means underneath, shared with ``pcl_ext.evaluate``. ``coagulation_stats`` measures how
tight the clusters have become (the trainer logs it at every E-step).
"""
from __future__ import annotations

import contextlib
import io
import operator
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Iterator, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ClusterResult", "cluster", "kmeans", "coagulation_stats", "BACKENDS"]

BACKENDS = ("auto", "faiss-gpu", "torch-cuda", "faiss-cpu")
_KEYS = ("im2cluster", "centroids", "density")


@dataclass(eq=False)
class ClusterResult(Mapping):
    """One E-step: lists with one entry per granularity, in the order of ``num_clusters``.

    Also a read-only mapping with PCL's ``cluster_result`` keys, so ``result["density"]`` and
    ``for key, tensors in result.items()`` (PCL's broadcast loop) work unchanged.
    """
    im2cluster: list[Tensor]   # int64 [n]: cluster of each sample
    centroids: list[Tensor]    # float32 [K, d], L2-normalized: the prototypes
    density: list[Tensor]      # float32 [K]: concentrations phi, mean = temperature
    backend: str = ""          # the k-means backend that ran
    kmeans_seconds: list[float] = field(default_factory=list)
    density_seconds: list[float] = field(default_factory=list)
    objective: list[float] = field(default_factory=list)  # sum of squared distances at the end
    warm: list[bool] = field(default_factory=list)  # started from given centroids (warm start)

    def __getitem__(self, key: str) -> list[Tensor]:
        if key not in _KEYS:
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(_KEYS)

    def __len__(self) -> int:
        return len(_KEYS)

    def to(self, *args, **kwargs) -> "ClusterResult":
        """A copy with every tensor moved/cast by ``Tensor.to(*args, **kwargs)``."""
        moved = {key: [t.to(*args, **kwargs) for t in self[key]] for key in _KEYS}
        return ClusterResult(**moved, backend=self.backend,
                             kmeans_seconds=list(self.kmeans_seconds),
                             density_seconds=list(self.density_seconds),
                             objective=list(self.objective), warm=list(self.warm))

    def validate(self) -> "ClusterResult":
        """Check what the loss reads, naming the first bad entry; returns ``self``.

        One entry per granularity in each list; ``im2cluster[m]`` int64 ``[n]`` with ids in
        ``[0, K_m)``; ``centroids[m]`` floating ``[K_m, d]`` and finite; ``density[m]``
        floating ``[K_m]``, positive and finite. Raises TypeError (a non-tensor or a wrong
        dtype) or ValueError (a wrong shape or value). The value checks run on the tensors'
        devices and are read in one host synchronization: call it once per clustering, not
        per training step (:class:`pcl_ext.ProtoNCELoss` does so).
        """
        from .ops import _ids_in_range, _positive_finite, _raise_failed

        lengths = {key: len(self[key]) for key in _KEYS}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"cluster_result: `im2cluster`, `centroids` and `density` must hold "
                             f"one tensor per granularity each, got {lengths} tensors")
        checks = []
        for m, (ids, c, phi) in enumerate(zip(self.im2cluster, self.centroids, self.density)):
            for key, t in (("im2cluster", ids), ("centroids", c), ("density", phi)):
                if not isinstance(t, Tensor):
                    raise TypeError(f"cluster_result: `{key}[{m}]` must be a Tensor, got "
                                    f"{type(t).__name__}")
            if ids.dtype != torch.long or ids.dim() != 1:
                raise TypeError(f"cluster_result: `im2cluster[{m}]` must be int64 [n], got "
                                f"{ids.dtype} {list(ids.shape)}")
            if not c.is_floating_point() or c.dim() != 2 or c.shape[0] == 0:
                raise ValueError(f"cluster_result: `centroids[{m}]` must be floating [K, d] with "
                                 f"K >= 1, got {c.dtype} {list(c.shape)}")
            k = c.shape[0]
            if not phi.is_floating_point() or phi.shape != (k,):
                raise ValueError(f"cluster_result: `density[{m}]` must be floating [{k}] (one "
                                 f"per centroid), got {phi.dtype} {list(phi.shape)}")
            if ids.numel():
                checks.append((_ids_in_range(ids, k),
                               f"`im2cluster[{m}]` holds cluster ids outside [0, {k})"))
            checks.append((torch.isfinite(c).all(), f"`centroids[{m}]` must be finite"))
            checks.append((_positive_finite(phi),
                           f"`density[{m}]` (phi) must be positive and finite"))
        _raise_failed("cluster_result", checks)
        return self


class KMeansResult(NamedTuple):
    centroids: Tensor    # float32 [K, d], not normalized (faiss's centroids)
    sq_dist: Tensor      # float32 [n]: squared L2 distance of each point to its centroid
    assignments: Tensor  # int64 [n]
    backend: str


def cluster(features: Tensor, num_clusters: Union[int, Sequence[int]] = (25000, 50000, 100000),
            *, niter: int = 20, nredo: int = 5, temperature: float = 0.2, alpha: float = 10.0,
            seed: int = 0, max_points_per_centroid: int = 1000,
            min_points_per_centroid: int = 10, normalize: bool = True, backend: str = "auto",
            init_centroids: Optional[Sequence[Optional[Tensor]]] = None, warm_niter: int = 5,
            verbose: bool = False) -> ClusterResult:
    r"""PCL's E-step (``run_kmeans`` of salesforce/PCL): k-means per granularity + concentration.

    For each ``K_m`` in ``num_clusters``, k-means (faiss's Lloyd iterations, random
    initialization, empty clusters re-split) runs on the features with seed ``seed + m`` (PCL's
    0/1/2). Then, with :math:`d_i` the squared L2 distance of sample :math:`i` to its
    centroid *before* the centroids are normalized (what PCL takes from faiss),

    .. math:: \phi_c = \frac{\operatorname{mean}_{i \in c} \sqrt{d_i}}{\log(|c| + \alpha)}

    clipped and rescaled to mean ``temperature`` by :func:`pcl_ext.concentration` (which also
    gives clusters with at most one member, empty ones included, the largest :math:`\phi`).
    The prototypes are the L2-normalized centroids.

    Args:
        features: ``[n, d]`` floating tensor, CPU or CUDA (computed in float32). PCL passes the
            momentum encoder's L2-normalized embeddings of the whole data set.
        num_clusters: ``K`` per granularity (PCL: 25000, 50000, 100000); each in ``[1, n]``.
        niter: Lloyd iterations (PCL: 20).
        nredo: k-means runs per granularity, keeping the lowest objective (PCL: 5). This costs
            ``nredo`` times the time of one run; ``nredo=1`` is the cheap choice (the E-step
            dominates PCL's epoch at ImageNet scale): on clustered synthetic data the runs'
            objectives differ by ~0.1%, and on ``benchmarks/cluster_speed.py``'s data
            ``nredo=5`` kept its first run, i.e. returned the ``nredo=1`` clustering.
        temperature: mean of each ``density`` (PCL: its ``--temperature``, 0.2).
        alpha: the ``alpha`` of the concentration (PCL: 10).
        seed: seed of the first granularity; granularity ``m`` uses ``seed + m``.
        max_points_per_centroid: k-means trains on a random subset of
            ``K * max_points_per_centroid`` points when ``n`` exceeds it (faiss's rule; PCL:
            1000, so ImageNet's 1.28M samples are never subsampled); every point is assigned.
        min_points_per_centroid: below ``K * min_points_per_centroid`` points faiss only warns
            (PCL: 10).
        normalize: L2-normalize the features first (a no-op on PCL's unit-norm embeddings).
        backend: ``"auto"`` picks ``"faiss-gpu"`` for CUDA features when faiss has GPU support,
            ``"torch-cuda"`` for CUDA features otherwise (faiss's Python k-means whose
            assignment step, a matmul + argmin, runs in torch on the features' GPU), else
            ``"faiss-cpu"``. faiss runs with ``torch.get_num_threads()`` OpenMP threads.
        init_centroids: a warm start (not PCL's): one ``[K_m, d]`` tensor (or ``None``) per
            granularity, e.g. the previous E-step's ``centroids``. A granularity whose entry
            has the shape ``(K_m, d)`` runs a single k-means (no ``nredo``) of ``warm_niter``
            Lloyd iterations from it; the others (``None``, a changed ``K`` or ``d``, or no
            entry) run PCL's scheme above. Features move little between epochs, so a few
            iterations from the last clustering replace ``nredo x niter`` from random points.
            Starting from the normalized prototypes only changes the first assignment of
            points almost equidistant from two centroids.
        warm_niter: Lloyd iterations of a warm start.
        verbose: print faiss's progress.

    Returns:
        a :class:`ClusterResult` on the features' device, with the backend that ran, whether
        each granularity was warm-started, and the seconds spent per granularity in k-means
        and in the concentration.

    Deterministic for a given seed, backend, device and thread count. The ``"torch-cuda"``
    assignment uses float32 matmuls (TF32 tensor cores only when
    ``torch.get_float32_matmul_precision()`` allows them); its random choices are numpy's, not
    faiss's, so its clusters differ from faiss's.
    """
    from . import concentration  # the op module is loaded by the package; no import cycle

    x = _check_features(features)
    ks = _check_num_clusters(num_clusters, x.shape[0])
    if niter < 1 or nredo < 1 or warm_niter < 1:
        raise ValueError(f"cluster: `niter`, `nredo` and `warm_niter` must be >= 1, got {niter}, "
                         f"{nredo}, {warm_niter}")
    if normalize:
        x = F.normalize(x, dim=1)
    backend = _pick_backend(backend, x)
    result = ClusterResult([], [], [], backend=backend)
    inits = list(init_centroids or [])
    for m, k in enumerate(ks):
        init = inits[m] if m < len(inits) else None
        warm = init is not None and tuple(init.shape) == (k, x.shape[1])
        start = time.perf_counter()
        km = kmeans(x, k, niter=warm_niter if warm else niter, nredo=1 if warm else nredo,
                    seed=seed + m, max_points_per_centroid=max_points_per_centroid,
                    min_points_per_centroid=min_points_per_centroid, backend=backend,
                    init=init if warm else None, verbose=verbose)
        _sync(x)
        middle = time.perf_counter()
        phi = concentration(km.sq_dist, km.assignments, k, temperature=temperature, alpha=alpha)
        _sync(x)
        result.kmeans_seconds.append(middle - start)
        result.density_seconds.append(time.perf_counter() - middle)
        result.objective.append(km.sq_dist.sum(dtype=torch.float64).item())
        result.warm.append(warm)
        result.im2cluster.append(km.assignments)
        result.centroids.append(F.normalize(km.centroids, dim=1))
        result.density.append(phi)
    return result.validate()


def kmeans(x: Tensor, k: int, *, niter: int = 20, nredo: int = 1, seed: int = 0,
           max_points_per_centroid: int = 1000, min_points_per_centroid: int = 10,
           backend: str = "auto", init: Optional[Tensor] = None,
           verbose: bool = False) -> KMeansResult:
    """k-means of the rows of ``x`` (float32 ``[n, d]``, ``k <= n``) with faiss's algorithm.

    Returns the (unnormalized) centroids and every row's squared distance to, and index of,
    its nearest final centroid, on ``x``'s device. ``init`` ``[k, d]``: start from these
    centroids instead of ``k`` random rows (then ``nredo`` must be 1). Other arguments as in
    :func:`cluster`.
    """
    faiss = _import_faiss()
    backend = _pick_backend(backend, x)
    if init is not None:
        if tuple(init.shape) != (k, x.shape[1]) or not init.is_floating_point() or nredo != 1:
            raise ValueError(f"kmeans: `init` must be floating point of shape {(k, x.shape[1])} "
                             f"with nredo=1, got {init.dtype} {tuple(init.shape)}, nredo={nredo}")
        init = init.detach().to(x.device, torch.float32).contiguous()
    params = dict(niter=niter, nredo=nredo, seed=seed, verbose=verbose,
                  max_points_per_centroid=max_points_per_centroid,
                  min_points_per_centroid=min_points_per_centroid)
    if backend == "torch-cuda":
        centroids, dist, assign = _kmeans_torch(x, k, init=init, **params)
        return KMeansResult(centroids, dist, assign, backend)
    x_np = np.ascontiguousarray(x.detach().cpu().numpy(), dtype=np.float32)
    if backend == "faiss-gpu":
        res = faiss.StandardGpuResources()
        cfg = faiss.GpuIndexFlatConfig()
        cfg.useFloat16 = False  # PCL's setting: exact float32 distances
        cfg.device = torch.cuda.current_device() if x.device.index is None else x.device.index
        index = faiss.GpuIndexFlatL2(res, x_np.shape[1], cfg)
    else:
        index = faiss.IndexFlatL2(x_np.shape[1])
    with _faiss_threads(torch.get_num_threads()):
        clus = faiss.Clustering(x_np.shape[1], k)
        for name, value in params.items():
            setattr(clus, name, value)
        if init is not None:  # faiss starts from the centroids it already holds
            faiss.copy_array_to_vector(init.cpu().numpy().ravel(), clus.centroids)
        clus.train(x_np, index)
        # The index holds the final centroids: PCL's `index.search(x, 1)`.
        dist, assign = index.search(x_np, 1)
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, -1)
    # |x|^2 - 2x.c + |c|^2 can round below 0 and sqrt follows (faiss's CPU index clamps too).
    dist = np.maximum(dist[:, 0], 0)
    return KMeansResult(*(torch.from_numpy(a).to(x.device) for a in (centroids, dist,
                                                                     assign[:, 0])), backend)


@torch.no_grad()
def coagulation_stats(features: Tensor, result: ClusterResult, *, normalize: bool = True,
                      block_rows: int = 1 << 16) -> list[dict[str, float]]:
    r"""How coagulated each granularity's clusters are: what the trainer logs per E-step.

    PAUC (Mo, Sun and Li, BMVC 2022) reports that ProtoNCE collapses the samples of a
    prototype onto it while the prototypes separate. Per granularity, with :math:`x_i` the
    (L2-normalized) features, :math:`c` the prototypes and :math:`P` the non-empty clusters:

    * ``spread_ratio``: :math:`\sqrt{\operatorname{mean}_i \|x_i - c_{a_i}\|^2} \,/\,
      \sqrt{\operatorname{mean}_{a \ne b \in P} \|c_a - c_b\|^2}`, the RMS distance of a
      sample to its prototype relative to the RMS distance between prototypes (both exact:
      the pairs' sum has a closed form, so the cost is linear in ``K``); it falls as clusters
      coagulate. NaN with fewer than two non-empty clusters;
    * ``empty_share``, ``singleton_share``: the fractions of the ``K`` clusters with no member
      and with exactly one;
    * ``phi_cv``: the spread of the concentrations, std / mean of :math:`\phi` (0 when all
      clusters are alike; PCL's clipping to the 10th-90th percentile bounds it).

    ``features`` ``[n, d]`` are those ``result`` clustered, read in blocks of ``block_rows``
    rows so that the float64 temporaries stay small.
    """
    x = _check_features(features)
    if normalize:
        x = F.normalize(x, dim=1)
    stats = []
    for assign, protos, phi in zip(result.im2cluster, result.centroids, result.density):
        assign, protos = assign.to(x.device), protos.to(x.device, torch.float64)
        if assign.shape != (x.shape[0],):
            raise ValueError(f"coagulation_stats: `result` assigns {tuple(assign.shape)} "
                             f"samples, `features` has {x.shape[0]} rows")
        sizes = torch.bincount(assign, minlength=protos.shape[0])
        spread = sum(((xb.double() - protos[ab]).square().sum())
                     for xb, ab in zip(x.split(block_rows), assign.split(block_rows)))
        used = protos[sizes > 0]
        p = used.shape[0]
        # sum over ordered pairs a != b of |c_a - c_b|^2 = 2 P sum |c|^2 - 2 |sum c|^2
        pairs = 2 * p * used.square().sum() - 2 * used.sum(0).square().sum()
        between = pairs / (p * (p - 1)) if p > 1 else pairs.new_tensor(float("nan"))
        phi = phi.double()
        stats.append({"spread_ratio": float((spread / x.shape[0] / between).sqrt()),
                      "empty_share": float((sizes == 0).double().mean()),
                      "singleton_share": float((sizes == 1).double().mean()),
                      "phi_cv": float(phi.std(correction=0) / phi.mean())})
    return stats


class _TorchDataset:
    """The data interface of ``faiss.contrib.clustering.kmeans`` over a torch tensor.

    The nearest-centroid search (the whole cost of k-means) is a chunked matmul + argmin on
    the tensor's device. Centroid sums are a segment sum over the rows sorted by cluster:
    ``index_add_`` would use float atomics on CUDA and make the clustering non-deterministic.
    """

    def __init__(self, x: Tensor, block_elems: int = 1 << 27):
        self.x = x
        self.sq_norms = x.square().sum(1)
        self.block_elems = block_elems  # bounds the [rows, k] score block (512 MiB)

    def count(self) -> int:
        return self.x.shape[0]

    def dim(self) -> int:
        return self.x.shape[1]

    def get_subset(self, indices: np.ndarray) -> Tensor:
        return self.x[torch.from_numpy(np.asarray(indices)).to(self.x.device)]

    def search(self, centroids: Tensor) -> tuple[Tensor, Tensor]:
        """Squared distance to, and index of, the nearest centroid of every row."""
        c_sq = centroids.square().sum(1)
        rows = max(1, self.block_elems // centroids.shape[0])
        best = [torch.addmm(c_sq, xb, centroids.t(), alpha=-2).min(1)   # rows x k scores
                for xb in self.x.split(rows)]
        dist = (torch.cat([b.values for b in best]) + self.sq_norms).clamp_(min=0)
        return dist, torch.cat([b.indices for b in best])

    def assign_to(self, centroids: Tensor, weights=None) -> tuple[np.ndarray, Tensor, Tensor]:
        assert weights is None
        dist, assign = self.search(centroids)
        order = torch.argsort(assign, stable=True)
        sizes = torch.bincount(assign, minlength=centroids.shape[0])
        sums = torch.segment_reduce(self.x[order], "sum", lengths=sizes, axis=0)
        return assign.cpu().numpy(), dist, sums


class _WarmStart(_TorchDataset):
    """contrib's k-means takes its starting centroids from ``get_subset`` of ``k`` random rows
    (its only call); a warm start hands over the given centroids instead."""

    def __init__(self, x: Tensor, init: Tensor):
        super().__init__(x)
        self.init = init

    def get_subset(self, indices: np.ndarray) -> Tensor:
        return self.init.clone()


def _kmeans_torch(x: Tensor, k: int, *, niter: int, nredo: int, seed: int, verbose: bool,
                  max_points_per_centroid: int, min_points_per_centroid: int,
                  init: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """faiss's Python k-means (``faiss.contrib.clustering``) with torch doing the assignment;
    it lacks faiss's subsampling, ``nredo`` and initial centroids, which are added here the
    way faiss does them."""
    _import_faiss()
    from faiss.contrib.clustering import kmeans as contrib_kmeans

    n = x.shape[0]
    if n < k * min_points_per_centroid:
        warnings.warn(f"k-means of {n} points into {k} clusters: faiss recommends at least "
                      f"{k * min_points_per_centroid} points", stacklevel=3)
    train = x
    if n > k * max_points_per_centroid:
        keep = np.random.RandomState(seed).permutation(n)[:k * max_points_per_centroid]
        train = x[torch.from_numpy(np.sort(keep)).to(x.device)]
    data = _TorchDataset(train.contiguous()) if init is None else _WarmStart(train.contiguous(),
                                                                              init)
    best, best_obj = None, float("inf")
    for redo in range(nredo):
        # contrib_kmeans prints "preproc..." whatever `verbose` says
        quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with quiet:
            centroids, stats = contrib_kmeans(k, data, niter=niter, seed=seed + redo * 15486557,
                                              verbose=verbose, return_stats=True)
        if stats[-1]["obj"] < best_obj:
            best, best_obj = centroids, stats[-1]["obj"]
    dist, assign = _TorchDataset(x).search(best)
    return best, dist, assign


def _check_features(features: Tensor) -> Tensor:
    if not isinstance(features, Tensor):
        raise TypeError(f"cluster: `features` must be a torch.Tensor, got {type(features)}")
    if features.dim() != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise ValueError(f"cluster: `features` must be a non-empty [n, d] tensor, got shape "
                         f"{tuple(features.shape)}")
    if not features.is_floating_point():
        raise TypeError(f"cluster: `features` must be floating point, got {features.dtype}")
    x = features.detach().float().contiguous()
    if not torch.isfinite(x).all():
        raise ValueError("cluster: `features` holds NaN or infinite values")
    return x


def _check_num_clusters(num_clusters: Union[int, Sequence[int]], n: int) -> list[int]:
    ks = [num_clusters] if isinstance(num_clusters, int) else list(num_clusters)
    try:
        ks = [operator.index(k) for k in ks]
    except TypeError:
        raise TypeError(f"cluster: `num_clusters` must be ints, got {num_clusters!r}") from None
    bad = [k for k in ks if not 1 <= k <= n]
    if bad:
        raise ValueError(f"cluster: every `num_clusters` must be in [1, n={n}] (k-means needs "
                         f"at least as many points as clusters), got {bad}")
    return ks


def _pick_backend(backend: str, x: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"cluster: `backend` must be one of {BACKENDS}, got {backend!r}")
    faiss = _import_faiss()
    faiss_gpu = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0
    if backend == "auto":
        return ("faiss-gpu" if faiss_gpu else "torch-cuda") if x.is_cuda else "faiss-cpu"
    if backend == "faiss-gpu" and not faiss_gpu:
        raise ValueError("cluster: `backend`='faiss-gpu' needs faiss with GPU support "
                         "(faiss-gpu) and a visible GPU")
    if backend == "torch-cuda" and not x.is_cuda:
        raise ValueError("cluster: `backend`='torch-cuda' needs `features` on a CUDA device")
    return backend


@contextlib.contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    # faiss ships its own OpenMP runtime: make it follow torch's thread setting.
    faiss = _import_faiss()
    old = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(old)


def _import_faiss():
    try:
        import faiss
    except ImportError as exc:
        raise ImportError("pcl_ext.cluster needs faiss: `pip install faiss-cpu` (or a faiss "
                          "build with GPU support)") from exc
    return faiss


def _sync(x: Tensor) -> None:
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
