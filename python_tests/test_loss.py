"""ProtoNCELoss: PCL's cluster_result plumbing around the fused op."""
import pytest
import torch
import torch.nn.functional as F

import pcl_ext
from pcl_ext import reference


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
