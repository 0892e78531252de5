"""pcl_ext.evaluate: weighted kNN, linear probe, clustering quality, feature extraction."""
import math
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from pcl_ext.evaluate import (cluster_quality, evaluate_encoder, extract_features,
                              fit_logistic_regression, format_table, knn_accuracy, linear_probe,
                              load_checkpoint)

from conftest import cuda_only


pytestmark = pytest.mark.usefixtures("one_thread")


def separable(num_classes=5, per_class=100, d=16, noise=0.1, seed=0):
    """Classes around fixed random unit directions: (features, labels), shuffled; the seed
    draws the noise only, so train and test sets share their classes."""
    centres = F.normalize(torch.randn(num_classes, d,
                                      generator=torch.Generator().manual_seed(1234)), dim=1)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    x = centres[labels] + noise * torch.randn(len(labels), d, generator=gen)
    perm = torch.randperm(len(labels), generator=gen)
    return x[perm], labels[perm]


def unit2d(degrees):
    rad = math.radians(degrees)
    return [math.cos(rad), math.sin(rad)]


def test_knn_separable():
    train_x, train_y = separable(seed=0)
    test_x, test_y = separable(per_class=40, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, num_classes=5) == 100.0


def test_knn_random_labels_is_chance():
    gen = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(3000, 16, generator=gen), torch.randn(2000, 16, generator=gen)
    train_y, test_y = torch.randint(10, (3000,), generator=gen), torch.randint(10, (2000,),
                                                                                generator=gen)
    # chance is 10% +- 0.7% (one standard deviation over 2000 test samples)
    assert 6.0 < knn_accuracy(train_x, train_y, test_x, test_y, num_classes=10) < 14.0


def test_knn_weighting_by_hand():
    # q = (1, 0); neighbours: class 0 at 0 degrees (cos = 1), class 1 at +-30 degrees
    # (cos = 0.866). Votes: class 0 exp(1/t), class 1 2 exp(0.866/t).
    train_x = torch.tensor([unit2d(0), unit2d(30), unit2d(-30)])
    train_y = torch.tensor([0, 1, 1])
    q, label0 = torch.tensor([unit2d(0)]), torch.tensor([0])
    # t = 0.07: exp(14.29) = 1.6e6 > 2 exp(12.37) = 4.7e5; t = 1: e = 2.72 < 2 e^0.866 = 4.75
    assert knn_accuracy(train_x, train_y, q, label0, k=3, t=0.07) == 100.0
    assert knn_accuracy(train_x, train_y, q, label0, k=3, t=1.0) == 0.0
    # k = 2 at 20 degrees: neighbours 30 (cos 10) and 0 (cos 20); the nearer one wins a 1:1 vote
    q = torch.tensor([unit2d(20)])
    assert knn_accuracy(train_x, train_y, q, torch.tensor([1]), k=2, t=1.0) == 100.0
    # the scale of the features does not matter (cosine similarity)
    assert knn_accuracy(3 * train_x, train_y, 0.1 * q, torch.tensor([1]), k=2, t=1.0) == 100.0


def test_knn_blocks_do_not_change_the_result():
    train_x, train_y = separable(noise=0.8, seed=2)
    test_x, test_y = separable(per_class=30, noise=0.8, seed=3)
    whole = knn_accuracy(train_x, train_y, test_x, test_y, k=20)
    assert 30.0 < whole < 100.0  # a non-trivial case
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20, block_elems=1) == whole


def test_linear_probe_separable():
    train_x, train_y = separable(num_classes=3, per_class=100, d=8, noise=0.2, seed=0)
    test_x, test_y = separable(num_classes=3, per_class=50, d=8, noise=0.2, seed=1)
    assert linear_probe(train_x, train_y, test_x, test_y) >= 99.0
    shuffled = train_y[torch.randperm(len(train_y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(train_x, shuffled, test_x, test_y) < 60.0


def logistic_objective(x, y, weight, bias, mean, std, c=1.0):
    z = (x.double() - mean) / std
    return F.cross_entropy(z @ weight.t() + bias, y) + weight.square().sum() / (2 * c * len(x))


@pytest.mark.parametrize("c", [1.0, 0.01])
def test_logistic_regression_reaches_sklearns_optimum(c):
    # Overlapping classes and correlated features (a shared component): an ill-conditioned
    # problem for a solver in W, not a separable one.
    gen = torch.Generator().manual_seed(0)
    x, y = separable(num_classes=4, per_class=150, d=12, noise=0.6, seed=3)
    x = x + 2 * torch.randn(len(x), 1, generator=gen) * torch.linspace(0.5, 1.5, 12)
    x[:, 3] = 7.0                                                 # a constant column
    weight, bias, mean, std = fit_logistic_regression(x, y, c=c, tol=1e-9)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    scaler = StandardScaler().fit(x.double().numpy())
    ref = LogisticRegression(C=c, tol=1e-12, max_iter=100000).fit(
        scaler.transform(x.double().numpy()), y.numpy())
    ref_w, ref_b = torch.from_numpy(ref.coef_), torch.from_numpy(ref.intercept_)
    torch.testing.assert_close(mean, torch.from_numpy(scaler.mean_))
    torch.testing.assert_close(std, torch.from_numpy(scaler.scale_))
    ours = logistic_objective(x, y, weight, bias, mean, std, c)
    theirs = logistic_objective(x, y, ref_w, ref_b, mean, std, c)
    assert ours - theirs < 1e-6                                   # float32 iterations
    # float32 iterations: the weights to ~1e-4 (entries are O(1))
    torch.testing.assert_close(weight, ref_w, atol=1e-3, rtol=0)
    # The intercepts are unpenalized: only their differences are determined.
    torch.testing.assert_close(bias - bias.mean(), ref_b - ref_b.mean(), atol=1e-3, rtol=0)
    assert weight[:, 3].abs().max() < 1e-3          # nothing to learn there (float32 noise)


def test_logistic_regression_missing_class_and_dtypes():
    x, y = separable(num_classes=3, per_class=40, d=6, noise=0.3)
    y = y * 2                                                        # classes 1 and 3 unused
    weight, bias, _, _ = fit_logistic_regression(x.half().float(), y)
    assert weight.shape == (5, 6) and bias.shape == (5,) and weight.dtype == torch.float64
    assert linear_probe(x, y, x.double(), y) > 95.0


@cuda_only
def test_linear_probe_cuda_matches_cpu():
    train_x, train_y = separable(num_classes=5, per_class=60, noise=0.7, seed=0)
    test_x, test_y = separable(num_classes=5, per_class=30, noise=0.7, seed=1)
    cpu = fit_logistic_regression(train_x, train_y)
    gpu = fit_logistic_regression(train_x.cuda(), train_y.cuda())
    assert gpu[0].is_cuda
    for a, b in zip(cpu, gpu):
        torch.testing.assert_close(a, b.cpu(), atol=1e-4, rtol=1e-4)
    assert linear_probe(train_x.cuda(), train_y.cuda(), test_x.cuda(), test_y.cuda()) == \
        linear_probe(train_x, train_y, test_x, test_y)


def test_cluster_quality_perfect_vs_shuffled():
    x, y = separable(num_classes=4, per_class=150, noise=0.05)
    good = cluster_quality(x, y, 4, nredo=10)
    assert good["ami"] > 0.99 and good["nmi"] > 0.99
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    bad = cluster_quality(x, shuffled, 4, nredo=10)
    assert abs(bad["ami"]) < 0.02 and bad["nmi"] < 0.05


def test_extract_features_restores_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4)).train()
    x, y = torch.randn(50, 6), torch.arange(50) % 3
    loader = DataLoader(TensorDataset(x, y), batch_size=7)
    feats, labels = extract_features(model, loader, "cpu", progress=False)
    assert model.training
    assert feats.shape == (50, 4) and feats.dtype == torch.float32
    assert labels.dtype == torch.int64 and torch.equal(labels, y)
    model.eval()
    torch.testing.assert_close(feats, F.normalize(model(x), dim=1))
    feats2, _ = extract_features(lambda b: b[:, :3], loader, "cpu", progress=False)
    torch.testing.assert_close(feats2, F.normalize(x[:, :3], dim=1))


def test_evaluate_encoder_end_to_end():
    train_x, train_y = separable(num_classes=3, per_class=60, d=8, noise=0.05, seed=0)
    test_x, test_y = separable(num_classes=3, per_class=20, d=8, noise=0.05, seed=1)
    train = DataLoader(TensorDataset(train_x, train_y), batch_size=32)
    test = DataLoader(TensorDataset(test_x, test_y), batch_size=32)
    out = evaluate_encoder(nn.Identity(), train, test, 3, "cpu", progress=False)
    assert set(out) == {"knn_top1", "linear_top1", "ami", "nmi"}
    assert out["knn_top1"] == out["linear_top1"] == 100.0
    assert 0.0 < out["ami"] <= 1.0 and 0.0 < out["nmi"] <= 1.0


def test_format_table():
    table = format_table({
        "trained": {"knn_top1": 85.214, "linear_top1": 88.4, "ami": 0.51234, "nmi": 0.6},
        "random init": {"knn_top1": 40.1, "ami": 0.1, "nmi": 0.2, "epochs": 0}})
    lines = table.splitlines()
    assert len(lines) == 3 and len({len(line) for line in lines}) == 1  # aligned
    assert lines[0].split()[:3] == ["encoder", "kNN", "top-1"]
    for number in ("85.21", "88.40", "0.5123", "0.6000"):
        assert number in lines[1]
    for number in ("40.10", "0.1000", "0.2000"):
        assert number in lines[2]
    assert lines[1].startswith("trained") and lines[2].startswith("random init")
    assert " - " in lines[2] + " " and "epochs" in lines[0]


class RunsCode:
    """What a malicious checkpoint carries: unpickling it calls ``os.system``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("payload", ["reduce", "callable"])
def test_a_checkpoint_carrying_code_is_refused(tmp_path, payload):
    marker = tmp_path / "code-ran"
    evil = tmp_path / "evil.pt"
    state = {"epoch": 1, "model_q": {"w": torch.zeros(2)}}
    state["extra"] = RunsCode(f"touch {marker}") if payload == "reduce" else os.system
    torch.save(state, evil)
    with pytest.raises(pickle.UnpicklingError, match=rf"{re.escape(str(evil))}: not loaded: .*`\w+\.system`"):
        load_checkpoint(evil)
    assert not marker.exists()
    if payload == "callable":
        return
    repo = Path(__file__).resolve().parents[1]  # the command line: a message, no traceback
    cli = subprocess.run([sys.executable, "-m", "pcl_ext.evaluate", str(evil), "--device", "cpu"],
                         cwd=repo, env=dict(os.environ, PYTHONPATH=str(repo)),
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1
    assert f"pcl_ext.evaluate: {evil}: not loaded" in cli.stderr and "Traceback" not in cli.stderr
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: the unsafe loader runs it
    assert marker.exists()


def test_load_checkpoint_reads_tensors_and_plain_containers(tmp_path):
    state = {"epoch": 3, "args": {"num_cluster": [4, 8], "pcl_r": None, "lr": 0.03},
             "rng": [{"python": (3, tuple(range(625)), None)}], "w": torch.arange(4.0)}
    torch.save(state, tmp_path / "ok.pt")
    loaded = load_checkpoint(tmp_path / "ok.pt")
    assert loaded["args"] == state["args"] and loaded["rng"] == state["rng"]
    assert torch.equal(loaded["w"], state["w"])
