"""PAUC's regularizers in ProtoNCELoss against their float64 references (pcl_ext.reference)."""
import pytest
import torch
import torch.nn.functional as F

import pcl_ext
from pcl_ext import loss as pauc
from pcl_ext import reference

from conftest import cuda_only

pytestmark = pytest.mark.usefixtures("one_thread")


def make_inputs(n=10, d=6, ks=(3, 5, 40), dataset=60, seed=None, dtype=torch.float64):
    """Unit-norm q (requires grad), prototypes, a dataset's assignments and a batch index;
    small K puts several rows of the batch in one cluster. Fresh values unless seeded."""
    gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed() % 2**31)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=-1)
    q = unit(n, d).to(dtype).requires_grad_()
    k = unit(n, d).to(dtype)
    queue = unit(17, d).to(dtype)
    result = {"im2cluster": [torch.randint(0, kk, (dataset,), generator=gen) for kk in ks],
              "centroids": [unit(kk, d).to(dtype) for kk in ks],
              "density": [(0.05 + 0.3 * torch.rand(kk, generator=gen, dtype=torch.float64))
                          .to(dtype) for kk in ks]}
    index = torch.randperm(dataset, generator=gen)[:n]
    return q, k, queue, result, index


def batch_assignments(result, index):
    return [a[index] for a in result["im2cluster"]]


TERMS = {  # name: (pcl_ext.loss function, reference), both called as f(q, protos, assign)
    "align": (lambda q, c, a, **kw: pauc.prototype_alignment(q, c, a, **kw),
              lambda q, c, a, **kw: reference.pauc_alignment(q, c, a, **kw)),
    "uniform": (lambda q, c, a, **kw: pauc.prototype_uniformity(q, a, **kw),
                lambda q, c, a, **kw: reference.pauc_uniformity(q, a, **kw)),
    "corr": (lambda q, c, a, **kw: pauc.prototype_correlation(q, a),
             lambda q, c, a, **kw: reference.pauc_correlation(q, a)),
}
OPTIONS = {"align": [{}, {"alpha": 1.0}, {"alpha": 3.0}],
           "uniform": [{}, {"t": 0.5}, {"t": 5.0}], "corr": [{}]}


@pytest.mark.parametrize("name,kwargs", [(n, kw) for n in TERMS for kw in OPTIONS[n]])
@pytest.mark.parametrize("shape", [dict(), dict(n=16, d=4, ks=(2, 7)), dict(n=5, d=9, ks=(60,))])
def test_term_and_gradient_match_reference(name, kwargs, shape):
    q, _, _, result, index = make_inputs(**shape)
    assign = batch_assignments(result, index)
    ours, ref = TERMS[name]
    value = ours(q, result["centroids"], assign, **kwargs)
    want = ref(q, result["centroids"], assign, **kwargs)
    torch.testing.assert_close(value, want, rtol=1e-12, atol=1e-12)
    (grad,) = torch.autograd.grad(value, q)
    (want_grad,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(grad, want_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(TERMS))
def test_gradcheck(name):
    q, _, _, result, index = make_inputs(n=7, d=4, ks=(2, 4))
    assign = batch_assignments(result, index)
    ours, _ = TERMS[name]
    assert torch.autograd.gradcheck(lambda x: ours(x, result["centroids"], assign), (q,))
    assert torch.autograd.gradgradcheck(lambda x: ours(x, result["centroids"], assign), (q,))


def test_one_cluster_and_all_distinct():
    q, _, _, result, _ = make_inputs(n=6, d=5)
    one = [torch.zeros(6, dtype=torch.long)]
    for f in (pauc.prototype_uniformity, pauc.prototype_correlation):
        value = f(q, one)
        (grad,) = torch.autograd.grad(value, q)
        torch.testing.assert_close(value, q.new_zeros(()), atol=1e-12, rtol=0)
        torch.testing.assert_close(grad, torch.zeros_like(q), atol=1e-12, rtol=0)
    # Every row its own cluster: the prototype-level features are the rows themselves, and
    # the uniformity is Wang and Isola's over the batch.
    distinct = [torch.arange(6)]
    u, w = pauc.prototype_features(q, distinct[0])
    torch.testing.assert_close(u, q)
    assert torch.equal(w, torch.ones(6, dtype=q.dtype))
    torch.testing.assert_close(pauc.prototype_uniformity(q, distinct),
                               torch.pdist(q).pow(2).mul(-2).exp().mean().log())
    torch.testing.assert_close(pauc.alignment(q, q.flip(0)), (q - q.flip(0)).norm(dim=1)
                               .square().mean())


def test_uniformity_ranks_spread_below_collapsed():
    gen = torch.Generator().manual_seed(0)
    spread = F.normalize(torch.randn(64, 16, generator=gen), dim=1)
    collapsed = F.normalize(torch.ones(64, 16) + 0.05 * torch.randn(64, 16, generator=gen), dim=1)
    assert pauc.uniformity(spread) < pauc.uniformity(collapsed) < 0
    # Uniform on the sphere in D dims, x.y ~ N(0, 1/D): log E exp(-2t(1 - x.y)) ~ -2t + 2t^2/D
    assert pauc.uniformity(spread) == pytest.approx(-4.0 + 8 / 16, abs=0.15)


@pytest.mark.parametrize("num_negatives", [None, 2])
def test_default_weights_are_plain_pcl_bit_for_bit(num_negatives):
    q, k, queue, result, index = make_inputs(dtype=torch.float32, ks=(12, 30))  # >= n + r clusters
    plain = pcl_ext.ProtoNCELoss(num_negatives=num_negatives,
                                 generator=torch.Generator().manual_seed(1))
    zeros = pcl_ext.ProtoNCELoss(num_negatives=num_negatives,
                                 generator=torch.Generator().manual_seed(1), align_weight=0.0,
                                 uniform_weight=0, corr_weight=0.0)
    gen = torch.Generator().manual_seed(1)
    assign = batch_assignments(result, index)
    negs = None if num_negatives is None else [
        pcl_ext.sample_negatives(a, c.shape[0], num_negatives, gen)
        for a, c in zip(assign, result["centroids"])]
    want = pcl_ext.proto_nce(q, k, queue, result["centroids"], result["density"], assign, negs)
    (want_grad,) = torch.autograd.grad(want, q)
    for loss_fn in (plain, zeros):
        loss = loss_fn(q, k, queue, result, index)
        (grad,) = torch.autograd.grad(loss, q)
        assert torch.equal(loss, want) and torch.equal(grad, want_grad)
    assert repr(zeros) == repr(plain)


@pytest.mark.parametrize("num_negatives", [None, 2])
def test_weighted_loss_matches_reference(num_negatives):
    q, k, queue, result, index = make_inputs(ks=(12, 13))  # >= n + r clusters: r free ones
    weights = dict(align_weight=0.3, uniform_weight=0.2, corr_weight=0.7)
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=num_negatives, align_alpha=1.5, uniform_t=3.0,
                                   generator=torch.Generator().manual_seed(5), **weights)
    loss = loss_fn(q, k, queue, result, index)
    gen = torch.Generator().manual_seed(5)
    assign = batch_assignments(result, index)
    negs = None if num_negatives is None else [
        pcl_ext.sample_negatives(a, c.shape[0], num_negatives, gen)
        for a, c in zip(assign, result["centroids"])]
    protos = result["centroids"]
    want = (reference.proto_nce(q, k, queue, protos, result["density"], assign, negs)
            + 0.3 * reference.pauc_alignment(q, protos, assign, alpha=1.5)
            + 0.2 * reference.pauc_uniformity(q, assign, t=3.0)
            + 0.7 * reference.pauc_correlation(q, assign))
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(torch.autograd.grad(loss, q)[0], torch.autograd.grad(want, q)[0])
    assert "corr_weight=0.7" in repr(loss_fn)
    # Each weight alone adds its own term only.
    plain = pcl_ext.ProtoNCELoss(num_negatives=None)(q, k, queue, result, index)
    alone = pcl_ext.ProtoNCELoss(num_negatives=None, uniform_weight=0.5)(q, k, queue, result,
                                                                         index)
    torch.testing.assert_close(alone - plain, 0.5 * reference.pauc_uniformity(q, assign))


def test_warmup_has_no_terms():
    q, k, queue, _, _ = make_inputs()
    weighted = pcl_ext.ProtoNCELoss(align_weight=1, uniform_weight=1, corr_weight=1)
    assert torch.equal(weighted(q, k, queue), pcl_ext.ProtoNCELoss()(q, k, queue))


def test_no_data_dependent_shapes_or_host_reads():
    # Meta tensors have shapes but no values: .item(), .tolist(), nonzero or boolean masking
    # would raise here, so this runs only if the terms never need to read the device.
    q = torch.empty(10, 6, device="meta", requires_grad=True)
    protos = [torch.empty(5, 6, device="meta")]
    assign = [torch.empty(10, dtype=torch.long, device="meta")]
    loss_fn = pcl_ext.ProtoNCELoss(align_weight=1, uniform_weight=1, corr_weight=1)
    total = loss_fn.regularizer(q, protos, assign)
    total.backward()
    assert total.shape == () and q.grad.shape == q.shape
    with pytest.raises(Exception):  # the check itself can fail: the reference reads values
        reference.pauc_uniformity(q, assign)


@cuda_only
def test_cuda_no_synchronization_and_matches_cpu():
    q, _, _, result, index = make_inputs(dtype=torch.float32)
    assign = batch_assignments(result, index)
    loss_fn = pcl_ext.ProtoNCELoss(align_weight=0.3, uniform_weight=0.2, corr_weight=0.7)
    want = loss_fn.regularizer(q, result["centroids"], assign)
    (want_grad,) = torch.autograd.grad(want, q)
    qc = q.detach().cuda().requires_grad_()
    protos = [c.cuda() for c in result["centroids"]]
    assign_c = [a.cuda() for a in assign]
    torch.cuda.set_sync_debug_mode("error")
    try:
        value = loss_fn.regularizer(qc, protos, assign_c)
        (grad,) = torch.autograd.grad(value, qc)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(value.cpu(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.cpu(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(align_weight=-0.1), ValueError, "align_weight"),
    (dict(uniform_weight=float("nan")), ValueError, "uniform_weight"),
    (dict(corr_weight=float("inf")), ValueError, "corr_weight"),
    (dict(align_alpha=0), ValueError, "align_alpha"),
    (dict(uniform_t=-1), ValueError, "uniform_t"),
    (dict(corr_weight="x"), TypeError, "corr_weight"),
])
def test_bad_weights(kwargs, exc, name):
    with pytest.raises(exc, match=f"`{name}`"):
        pcl_ext.ProtoNCELoss(**kwargs)
