"""ProtoNCELoss: PCL's cluster_result plumbing around the fused op."""
import pickle

import pytest
import torch
import torch.nn.functional as F

import pcl_ext
from pcl_ext import reference

from conftest import cuda_only


def make_batch(n=8, d=12, q_len=30, dataset=100, ks=(20, 35), seed=0):
    gen = torch.Generator().manual_seed(seed)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=-1)
    q = unit(n, d).requires_grad_()
    k = unit(n, d)
    queue = unit(q_len, d)
    cluster_result = {
        "im2cluster": [torch.randint(0, kk, (dataset,), generator=gen) for kk in ks],
        "centroids": [unit(kk, d) for kk in ks],
        "density": [0.05 + 0.3 * torch.rand(kk, generator=gen, dtype=torch.float64) for kk in ks],
    }
    index = torch.randperm(dataset, generator=gen)[:n]
    return q, k, queue, cluster_result, index


def test_without_clusters_is_moco_infonce():
    q, k, queue, _, _ = make_batch()
    loss_fn = pcl_ext.ProtoNCELoss(temperature=0.2)
    loss = loss_fn(q, k, queue)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.t()], dim=1) / 0.2
    want = F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))
    torch.testing.assert_close(loss, want)
    assert loss_fn.acc_inst.item() == pytest.approx(
        100 * (logits.argmax(1) == 0).double().mean().item())
    assert torch.isnan(loss_fn.acc_proto)


@pytest.mark.parametrize("num_negatives", [None, 5])
def test_cluster_result_dict_and_index(num_negatives):
    q, k, queue, result, index = make_batch()
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=num_negatives,
                                   generator=torch.Generator().manual_seed(3))
    loss = loss_fn(q, k, queue, result, index)
    assign = [a[index] for a in result["im2cluster"]]
    negs = None
    if num_negatives is not None:  # the same draws, replayed from the same generator state
        gen = torch.Generator().manual_seed(3)
        negs = [pcl_ext.sample_negatives(a, c.shape[0], num_negatives, gen)
                for a, c in zip(assign, result["centroids"])]
        for a, g in zip(assign, negs):
            assert not set(g.tolist()) & set(a.tolist())
    want = reference.proto_nce(q, k, queue, result["centroids"], result["density"], assign,
                               negs, temperature=0.2)
    torch.testing.assert_close(loss, want)
    (grad,) = torch.autograd.grad(loss, q)
    (want_grad,) = torch.autograd.grad(want, q)
    torch.testing.assert_close(grad, want_grad)
    assert 0 <= loss_fn.acc_proto.item() <= 100


def test_accepts_cluster_result_object_and_ring_queue():
    q, k, queue, result, index = make_batch()
    ring = pcl_ext.RingQueue(queue.shape[0], queue.shape[1], dtype=torch.float64)
    ring.buffer.copy_(queue)
    obj = pcl_ext.ClusterResult(result["im2cluster"], result["centroids"], result["density"])
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=None)
    torch.testing.assert_close(loss_fn(q, k, ring, obj, index),
                               loss_fn(q, k, queue, result, index))


def test_bad_arguments():
    q, k, queue, result, index = make_batch()
    with pytest.raises(ValueError, match="`index`"):
        pcl_ext.ProtoNCELoss()(q, k, queue, result)
    with pytest.raises(TypeError, match="`cluster_result`"):
        pcl_ext.ProtoNCELoss()(q, k, queue, [1, 2], index)
    with pytest.raises(ValueError, match="`num_negatives`"):
        pcl_ext.ProtoNCELoss(num_negatives=-1)
    with pytest.raises(ValueError, match="`r`"):  # more negatives than free clusters
        pcl_ext.ProtoNCELoss(num_negatives=30)(q, k, queue, result, index)


@pytest.fixture
def spies(monkeypatch):
    """Records every ClusterResult.validate call (the clustering it checked) and the
    ``check_values`` of every op call the loss makes."""
    validated, op_checks = [], []
    validate, op = pcl_ext.ClusterResult.validate, pcl_ext.loss.proto_nce_with_accuracy

    def spy_validate(self):
        validated.append(self)
        return validate(self)

    def spy_op(*args, check_values=True, **kwargs):
        op_checks.append(check_values)
        return op(*args, check_values=check_values, **kwargs)

    monkeypatch.setattr(pcl_ext.ClusterResult, "validate", spy_validate)
    monkeypatch.setattr(pcl_ext.loss, "proto_nce_with_accuracy", spy_op)
    return validated, op_checks


@pytest.mark.parametrize("num_negatives", [None, 5])
def test_clustering_is_checked_once_per_clustering_not_per_step(spies, num_negatives):
    validated, op_checks = spies
    q, k, queue, result, index = make_batch()
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=num_negatives)
    for _ in range(3):
        loss_fn(q, k, queue, result, index)
    assert len(validated) == 1 and validated[0]["im2cluster"][1] is result["im2cluster"][1]
    assert op_checks == [False] * 3  # the op's per-step value checks are off
    loss_fn(q, k, queue, dict(result), index)  # a new dict of the same tensors: no new check
    assert len(validated) == 1
    fresh = {key: [t.clone() for t in tensors] for key, tensors in result.items()}
    for _ in range(3):  # the next E-step's clustering: checked once
        loss_fn(q, k, queue, fresh, index)
    assert len(validated) == 2
    fresh["density"][1].mul_(2)  # changed in place: checked again
    loss_fn(q, k, queue, fresh, index)
    loss_fn(q, k, queue, fresh, index)
    assert len(validated) == 3
    obj = pcl_ext.ClusterResult(*(fresh[key] for key in ("im2cluster", "centroids", "density")))
    loss_fn(q, k, queue, obj, index)  # the same tensors in a ClusterResult
    assert len(validated) == 3
    copy = pickle.loads(pickle.dumps(loss_fn))  # a copy checks the first clustering it sees
    copy(q, k, queue, fresh, index)
    assert len(validated) == 4 and len(op_checks) == 11


def corrupt(result, key, m, row, value):
    """A copy of PCL's dict with one entry of ``result[key][m]`` set to ``value``."""
    bad = {name: [t.clone() for t in tensors] for name, tensors in result.items()}
    bad[key][m][row] = value
    return bad


@pytest.mark.parametrize("key,m,value,message", [
    ("im2cluster", 1, 35, r"`im2cluster\[1\]` holds cluster ids outside \[0, 35\)"),
    ("im2cluster", 0, -1, r"`im2cluster\[0\]` holds cluster ids outside \[0, 20\)"),
    ("density", 0, 0.0, r"`density\[0\]` \(phi\) must be positive and finite"),
    ("density", 1, -0.1, r"`density\[1\]` \(phi\) must be positive and finite"),
    ("density", 1, float("nan"), r"`density\[1\]` \(phi\) must be positive and finite"),
    ("density", 0, float("inf"), r"`density\[0\]` \(phi\) must be positive and finite"),
    ("centroids", 1, float("nan"), r"`centroids\[1\]` must be finite"),
])
def test_bad_clustering_raises_naming_it(spies, key, m, value, message):
    validated, _ = spies
    q, k, queue, result, index = make_batch()
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=5)
    loss_fn(q, k, queue, result, index)
    # The bad row is outside the batch: only the check of the whole clustering can see it.
    outside = next(i for i in range(len(result["im2cluster"][0])) if i not in index.tolist())
    row = outside if key == "im2cluster" else 3
    bad = corrupt(result, key, m, row, value)
    for _ in range(2):  # a clustering that failed is not remembered as checked
        with pytest.raises(ValueError, match=message):
            loss_fn(q, k, queue, bad, index)
    assert len(validated) == 3
    loss_fn(q, k, queue, result, index)  # the good one again: checked again, passes


@pytest.mark.parametrize("change,error,message", [
    (lambda r: r["density"].pop(), ValueError, "one tensor per granularity"),
    (lambda r: r["im2cluster"].__setitem__(0, r["im2cluster"][0].int()), TypeError,
     r"`im2cluster\[0\]` must be int64"),
    (lambda r: r["density"].__setitem__(1, r["density"][1][:-1]), ValueError,
     r"`density\[1\]` must be floating \[35\]"),
    (lambda r: r["centroids"].__setitem__(0, r["centroids"][0].tolist()), TypeError,
     r"`centroids\[0\]` must be a Tensor"),
])
def test_malformed_clustering_is_named(change, error, message):
    q, k, queue, result, index = make_batch()
    change(result)
    with pytest.raises(error, match=message):
        pcl_ext.ProtoNCELoss(num_negatives=None)(q, k, queue, result, index)


@cuda_only
@pytest.mark.parametrize("num_negatives", [None, 5])
def test_cuda_training_steps_do_not_synchronize(num_negatives):
    cuda = torch.device("cuda")
    q, k, queue, result, index = make_batch()
    q, k, queue = (t.detach().float().to(cuda) for t in (q, k, queue))
    q.requires_grad_()
    result = {key: [t.to(cuda, torch.float32 if t.is_floating_point() else None)
                    for t in tensors] for key, tensors in result.items()}
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=num_negatives,
                                   generator=torch.Generator(cuda).manual_seed(0))
    loss_fn(q, k, queue, result, index)  # the first sight of the clustering checks it
    indices = [index.to(cuda), index.pin_memory(), index]  # device, pinned, pageable
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for idx in indices * 2:
            loss = loss_fn(q, k, queue, result, idx)
            loss.backward()
            logged = torch.stack([loss.detach(), loss_fn.acc_inst, loss_fn.acc_proto])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(logged).all()
    if num_negatives is None:
        want = reference.proto_nce(q, k, queue, result["centroids"], result["density"],
                                   [a[index.to(cuda)] for a in result["im2cluster"]],
                                   temperature=0.2)
        torch.testing.assert_close(loss, want)


def pcl_accuracies(q, prototypes, phi, assignments, negatives):
    """PCL's Acc@Proto and the tie-aware figure (target logit equal to the row's largest), in
    percent, averaged over the clusterings, from float64 logits in PCL's column layout.

    PCL's ``accuracy`` takes ``output.topk(1)`` on the GPU, whose kernel keeps the first of
    equal values in index order; ``topk`` on the CPU breaks ties in no set order (here it
    picked column 2 of the tied columns 0, 2, 3), so the prediction is ``argmax``, documented
    to return the first maximal index. A column's logit is gathered from one ``[N, K]``
    product, so the columns of a cluster that appears twice are bit-identical, as in PCL."""
    pcl, ties = [], []
    rows = torch.arange(len(q))
    for m, (c, p, a) in enumerate(zip(prototypes, phi, assignments)):
        logits, target = (q @ c.t()) / p, a                      # N x K, all-prototype mode
        if negatives is not None:                                 # N x (N + r), sampled mode
            logits, target = logits[:, torch.cat([a, negatives[m]])], rows
        pcl.append((logits.argmax(dim=1) == target).double().mean())
        ties.append((logits[rows, target] == logits.max(dim=1).values).double().mean())
    return 100 * torch.stack(pcl).mean().item(), 100 * torch.stack(ties).mean().item()


@pytest.mark.parametrize("num_negatives", [None, 3])
def test_acc_proto_is_pcls_figure_with_duplicate_positives(num_negatives):
    gen = torch.Generator().manual_seed(0)
    unit = lambda *s: F.normalize(torch.randn(*s, generator=gen, dtype=torch.float64), dim=-1)
    ks, n = (8, 12), 10
    # Clusters repeat within the batch (several rows share a positive), every query lies near
    # its own prototype, so most rows' target logits are the largest (tied with duplicates).
    im2cluster = [torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 0, 4]),
                  torch.tensor([5, 5, 5, 0, 1, 1, 2, 3, 4, 4])]
    centroids = [unit(k, 16) for k in ks]
    density = [0.15 + 0.1 * torch.rand(k, generator=gen, dtype=torch.float64) for k in ks]
    index = torch.randperm(n, generator=gen)
    assign = [a[index] for a in im2cluster]
    q = F.normalize(centroids[0][assign[0]] + centroids[1][assign[1]]
                    + 0.3 * torch.randn(n, 16, generator=gen, dtype=torch.float64), dim=1)
    k, queue = unit(n, 16), unit(20, 16)
    loss_fn = pcl_ext.ProtoNCELoss(num_negatives=num_negatives,
                                   generator=torch.Generator().manual_seed(1))
    result = {"im2cluster": im2cluster, "centroids": centroids, "density": density}
    loss_fn(q, k, queue, result, index)
    negs = None
    if num_negatives is not None:  # the loss's draws, replayed
        replay = torch.Generator().manual_seed(1)
        negs = [pcl_ext.sample_negatives(a, c.shape[0], num_negatives, replay)
                for a, c in zip(assign, centroids)]
    pcl, ties = pcl_accuracies(q, centroids, density, assign, negs)
    assert loss_fn.acc_proto.item() == pytest.approx(pcl, abs=1e-4)
    assert loss_fn.acc_proto_ties.item() == pytest.approx(ties, abs=1e-4)
    if num_negatives is None:  # one column per cluster: no duplicate columns to tie
        assert pcl == ties
    else:  # the case exercises the difference
        assert 0 < pcl < ties
