"""NTXentLoss, SymmetricInfoNCELoss and cpc_info_nce against their eager definitions (float64,
values and gradients), their bad inputs, and gather=True on 2 gloo processes against one
process on the concatenated batch."""
import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import pcl_ext
from pcl_ext import NTXentLoss, SymmetricInfoNCELoss, cpc_info_nce

pytestmark = pytest.mark.usefixtures("one_thread")


def leaves(*shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def grads(loss, tensors):
    return torch.autograd.grad(loss, tensors)


# ----------------------------------------------------------------- eager definitions
def ntxent_eager(z1, z2, t, normalize=True):
    """SimCLR's NT-Xent written out: -log(exp(pos) / sum over every other row)."""
    z = torch.cat([z1, z2])
    if normalize:
        z = z / z.norm(dim=1, keepdim=True)
    n2 = z.shape[0]
    sim = z @ z.t() / t
    other = ~torch.eye(n2, dtype=torch.bool)
    partner = torch.cat([torch.arange(n2 // 2, n2), torch.arange(n2 // 2)])
    pos = sim[torch.arange(n2), partner]
    denominators = torch.stack([sim[i][other[i]].logsumexp(0) for i in range(n2)])
    return (denominators - pos).mean()


def clip_eager(image, text, logit_scale, max_scale=100.0):
    """CLIP's pseudo-code: scaled cosine logits, cross-entropy over both axes."""
    image = F.normalize(image, dim=1)
    text = F.normalize(text, dim=1)
    logits = logit_scale.exp().clamp(max=max_scale) * image @ text.t()    # N x N
    labels = torch.arange(len(image))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def mocov3_eager(q1, q2, k1, k2, t):
    """MoCo v3's ctr (moco-v3/moco/builder.py), halved: this package averages directions."""
    def ctr(q, k):
        q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
        logits = q @ k.t() / t
        return F.cross_entropy(logits, torch.arange(len(q))) * (2 * t)
    return (ctr(q1, k2) + ctr(q2, k1)) / 2


def cpc_eager(pred, emb, t=1.0):
    """Every prediction against every patch of the batch, its own patch the positive."""
    b, p, _ = pred.shape
    scores = torch.einsum("bpd,cqd->bpcq", pred, emb).reshape(b * p, b * p) / t
    return F.cross_entropy(scores, torch.arange(b * p))


# ------------------------------------------------------------------------- NT-Xent
@pytest.mark.parametrize("n,d", [(1, 3), (5, 4), (16, 8)])
@pytest.mark.parametrize("normalize", [True, False])
def test_ntxent_matches_its_definition(n, d, normalize):
    z1, z2 = leaves((n, d), (n, d), seed=n)
    if not normalize:
        z1.data *= 0.3  # keep the raw dot products moderate
        z2.data *= 0.3
    loss = NTXentLoss(0.5, normalize=normalize)(z1, z2)
    expected = ntxent_eager(z1, z2, 0.5, normalize)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads(loss, [z1, z2]), grads(expected, [z1, z2])):
        torch.testing.assert_close(got, want)
    if n == 1:  # the only other row is the positive: nothing to contrast
        assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_ntxent_noncontiguous_views_and_accuracy():
    (wide,) = leaves((6, 10), seed=3)
    z1, z2 = wide[:, :5], wide[:, 5:]                     # column slices: strided rows
    loss_fn = NTXentLoss(0.2)
    loss = loss_fn(z1, z2)
    torch.testing.assert_close(loss, ntxent_eager(z1, z2, 0.2))
    torch.testing.assert_close(grads(loss, [wide])[0], grads(ntxent_eager(z1, z2, 0.2), [wide])[0])
    z = F.normalize(torch.cat([z1, z2]).detach(), dim=1)
    sim = (z @ z.t()).fill_diagonal_(-math.inf)
    expected = (sim.argmax(1) == torch.arange(12).roll(6)).double().mean() * 100
    assert loss_fn.acc_inst.item() == expected.item()
    # identical views: every row finds its partner
    same = F.normalize(torch.randn(8, 4, dtype=torch.float64), dim=1)
    loss_fn(same, same.clone())
    assert loss_fn.acc_inst.item() == 100.0


# ---------------------------------------------------------------- symmetric InfoNCE
@pytest.mark.parametrize("temperature", [0.07, 0.004])  # 0.004: the scale clamped at 100
def test_clip_learnable_temperature_matches_its_definition(temperature):
    image, text = leaves((9, 6), (9, 6), seed=1)
    loss_fn = SymmetricInfoNCELoss(temperature, learnable_temperature=True)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(1 / temperature))
    loss = loss_fn(image, text)
    scale = loss_fn.logit_scale.detach().double().clone().requires_grad_()
    expected = clip_eager(image, text, scale)
    torch.testing.assert_close(loss, expected.to(loss.dtype))
    got = grads(loss, [image, text, loss_fn.logit_scale])
    want = grads(expected, [image, text, scale])
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    # the temperature's gradient, computed without any N x N logits, against autograd's
    torch.testing.assert_close(got[2].double(), want[2], rtol=1e-5, atol=1e-7)
    if temperature < 0.01:
        assert got[2].item() == 0.0 and loss_fn.temperature == pytest.approx(0.01)
    else:
        assert got[2].abs().item() > 1e-4 and loss_fn.temperature == pytest.approx(temperature)


def test_learnable_temperature_gradcheck():
    image, text = leaves((4, 3), (4, 3), seed=2)
    loss_fn = SymmetricInfoNCELoss(0.5, learnable_temperature=True).double()

    def f(image, text, logit_scale):  # the parameter as an input
        return torch.func.functional_call(loss_fn, {"logit_scale": logit_scale}, (image, text))

    scale = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (image, text, scale))


def test_mocov3_matches_its_definition():
    q1, q2 = leaves((7, 5), (7, 5), seed=4)
    k1, k2 = [t.detach() for t in leaves((7, 5), (7, 5), seed=5)]        # momentum keys
    loss = SymmetricInfoNCELoss(0.2, scale_by_2t=True)(q1, q2, keys_a=k1, keys_b=k2)
    expected = mocov3_eager(q1, q2, k1, k2, 0.2)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads(loss, [q1, q2]), grads(expected, [q1, q2])):
        torch.testing.assert_close(got, want)


def test_symmetric_fixed_temperature_without_normalization():
    a, b = leaves((1, 4), (1, 4), seed=6)  # N = 1: one column, loss 0
    assert SymmetricInfoNCELoss(0.3, normalize=False)(a, b).item() == pytest.approx(0, abs=1e-12)
    a, b = leaves((6, 4), (6, 4), seed=7)
    loss = SymmetricInfoNCELoss(0.3, normalize=False)(a, b)
    logits = a @ b.t() / 0.3
    expected = (F.cross_entropy(logits, torch.arange(6))
                + F.cross_entropy(logits.t(), torch.arange(6))) / 2
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads(loss, [a, b]), grads(expected, [a, b])):
        torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------- CPC
@pytest.mark.parametrize("b,p", [(1, 1), (3, 4)])
def test_cpc_matches_its_definition(b, p):
    pred, emb = leaves((b, p, 5), (b, p, 5), seed=b * 10 + p)
    loss = cpc_info_nce(pred, emb)
    expected = cpc_eager(pred, emb)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads(loss, [pred, emb]), grads(expected, [pred, emb])):
        torch.testing.assert_close(got, want)
    # a prediction step: positions 1.. predicted from the context at 0..: any [B, P', D] works
    if p > 1:
        loss = cpc_info_nce(pred[:, :-1], emb[:, 1:], temperature=0.5)
        torch.testing.assert_close(loss, cpc_eager(pred[:, :-1], emb[:, 1:], 0.5))


# ------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("call,error,message", [
    (lambda: NTXentLoss(0.0), ValueError, "NTXentLoss: `temperature` must be finite and > 0"),
    (lambda: NTXentLoss(float("nan")), ValueError, "`temperature`"),
    (lambda: NTXentLoss()(torch.randn(4, 3), torch.randn(5, 3)), ValueError,
     "`z1` and `z2` must have the same shape"),
    (lambda: NTXentLoss()(torch.randn(4), torch.randn(4)), ValueError, "`z1` must be 2-D"),
    (lambda: NTXentLoss()([1.0], torch.randn(4, 3)), TypeError, "`z1` must be a tensor"),
    (lambda: SymmetricInfoNCELoss(-1.0), ValueError, "SymmetricInfoNCELoss: `temperature`"),
    (lambda: SymmetricInfoNCELoss(max_logit_scale=0), ValueError, "`max_logit_scale`"),
    (lambda: SymmetricInfoNCELoss(learnable_temperature=True, scale_by_2t=True), ValueError,
     "`scale_by_2t`"),
    (lambda: SymmetricInfoNCELoss()(torch.randn(4, 3), torch.randn(4, 3),
                                    keys_a=torch.randn(3, 3)), ValueError,
     "`a` and `keys_a` must have the same shape"),
    (lambda: cpc_info_nce(torch.randn(2, 3), torch.randn(2, 3)), ValueError,
     "`predictions` must be a 3-D tensor"),
    (lambda: cpc_info_nce(torch.randn(2, 3, 4), torch.randn(2, 2, 4)), ValueError,
     "must have the same shape"),
    (lambda: cpc_info_nce(torch.randn(2, 3, 4), torch.randn(2, 3, 4), temperature=0),
     ValueError, "cpc_info_nce: `temperature`"),
])
def test_bad_input_names_the_argument(call, error, message):
    with pytest.raises(error, match=message.replace("(", r"\(").replace("[", r"\[")):
        call()


# -------------------------------------------------------------- gather over 2 ranks
WORLD, N, D = 2, 3, 4


def global_inputs():
    """The concatenated batch, rank r owning rows r*N .. r*N+N-1 of every tensor."""
    g = torch.Generator().manual_seed(11)
    make = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return {"z1": make(WORLD * N, D), "z2": make(WORLD * N, D), "k1": make(WORLD * N, D),
            "k2": make(WORLD * N, D), "pred": make(WORLD * N, 2, D), "emb": make(WORLD * N, 2, D)}


def losses(x, gather):
    """Each gathered loss and the gradients of its inputs (and of the learnable scale)."""
    out = {}
    world = WORLD if gather else 1
    z1, z2 = x["z1"].clone().requires_grad_(), x["z2"].clone().requires_grad_()
    loss = NTXentLoss(0.5, gather=gather)(z1, z2)
    (loss / world).backward()  # DDP averages the ranks' gradients
    out["ntxent"] = [loss, z1.grad, z2.grad]
    z1, z2 = x["z1"].clone().requires_grad_(), x["z2"].clone().requires_grad_()
    clip = SymmetricInfoNCELoss(0.1, learnable_temperature=True, gather=gather).double()
    loss = clip(z1, z2)
    (loss / world).backward()
    out["clip"] = [loss, z1.grad, z2.grad, clip.logit_scale.grad]
    z1, z2 = x["z1"].clone().requires_grad_(), x["z2"].clone().requires_grad_()
    loss = SymmetricInfoNCELoss(0.2, scale_by_2t=True, gather=gather)(
        z1, z2, keys_a=x["k1"], keys_b=x["k2"])
    (loss / world).backward()
    out["mocov3"] = [loss, z1.grad, z2.grad]
    pred, emb = x["pred"].clone().requires_grad_(), x["emb"].clone().requires_grad_()
    loss = cpc_info_nce(pred, emb, temperature=0.7, gather=gather)
    (loss / world).backward()
    out["cpc"] = [loss, pred.grad, emb.grad]
    return out


def gather_worker(rank, init_file, result_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD)
    mine = {k: v[rank * N:(rank + 1) * N] for k, v in global_inputs().items()}
    out = losses(mine, gather=True)
    for name, values in out.items():
        loss, *rest = values
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= WORLD                                   # the mean of the ranks' means
        if name == "clip":
            dist.all_reduce(rest[-1])                  # a replicated parameter's gradient
        parts = [[torch.empty_like(g) for _ in range(WORLD)] for g in rest[:2]]
        for p, g in zip(parts, rest[:2]):
            dist.all_gather(p, g.contiguous())
        out[name] = [loss] + [torch.cat(p) for p in parts] + rest[2:]
    if rank == 0:
        torch.save(out, result_file)
    dist.destroy_process_group()


def test_gather_over_two_gloo_ranks_equals_one_process(tmp_path):
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(gather_worker, args=(str(tmp_path / "init"), str(tmp_path / "out.pt")),
             nprocs=WORLD, join=True)
    distributed = torch.load(tmp_path / "out.pt")
    single = losses(global_inputs(), gather=False)
    for name, want in single.items():
        assert len(distributed[name]) == len(want), name
        for got, expected in zip(distributed[name], want):
            torch.testing.assert_close(got, expected, msg=name)
    # not the local batch's loss: the columns did come from both ranks
    local = NTXentLoss(0.5)(global_inputs()["z1"][:N], global_inputs()["z2"][:N])
    assert abs(local.item() - single["ntxent"][0].item()) > 1e-3


def test_exported():
    assert {"NTXentLoss", "SymmetricInfoNCELoss", "cpc_info_nce"} <= set(pcl_ext.__all__)
