"""python -m pcl_ext.check: the real kernels pass, and deliberately broken ones fail it."""
import subprocess
import sys

import pytest
import torch

import pcl_ext
from pcl_ext import check, ops


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient scaled by `factor` on the way back."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def _with_proto_nce(monkeypatch, wrap):
    real = ops.proto_nce_with_accuracy
    monkeypatch.setattr(ops, "proto_nce_with_accuracy",
                        lambda q, k, *args, **kw: wrap(real, q, k, *args, **kw))


def loss_scaled(monkeypatch):
    _with_proto_nce(monkeypatch, lambda real, q, k, *a, **kw: (
        lambda out: (out[0] * 1.001, out[1]))(real(q, k, *a, **kw)))


def dq_scaled(monkeypatch):
    _with_proto_nce(monkeypatch, lambda real, q, k, *a, **kw:
                    real(_ScaleGrad.apply(q, 1.001), k, *a, **kw))


def dk_scaled(monkeypatch):
    _with_proto_nce(monkeypatch, lambda real, q, k, *a, **kw:
                    real(q, _ScaleGrad.apply(k, 1.001), *a, **kw))


def one_flag_flipped(monkeypatch):
    def wrap(real, q, k, *a, **kw):
        loss, correct = real(q, k, *a, **kw)
        correct = correct.clone()
        correct[-1, 0] = ~correct[-1, 0]
        return loss, correct
    _with_proto_nce(monkeypatch, wrap)


def _with_info_nce(monkeypatch, wrap):
    real = ops.info_nce_with_accuracy
    monkeypatch.setattr(ops, "info_nce_with_accuracy",
                        lambda q, k, *args, **kw: wrap(real, q, k, *args, **kw))


def nce_loss_scaled(monkeypatch):
    _with_info_nce(monkeypatch, lambda real, q, k, *a, **kw: (
        lambda out: (out[0] * 1.001, out[1]))(real(q, k, *a, **kw)))


def nce_dq_scaled(monkeypatch):
    _with_info_nce(monkeypatch, lambda real, q, k, *a, **kw:
                   real(_ScaleGrad.apply(q, 1.001), k, *a, **kw))


def nce_dk_scaled(monkeypatch):
    _with_info_nce(monkeypatch, lambda real, q, k, *a, **kw:
                   real(q, _ScaleGrad.apply(k, 1.001), *a, **kw))


def nce_flag_flipped(monkeypatch):
    def wrap(real, q, k, *a, **kw):
        loss, correct = real(q, k, *a, **kw)
        correct = correct.clone()
        correct[0] = ~correct[0]
        return loss, correct
    _with_info_nce(monkeypatch, wrap)


def momentum_off(monkeypatch):
    real = pcl_ext.momentum_update_
    # (1 - m) one part in a thousand too small: 0.999 becomes 0.999001
    monkeypatch.setattr(pcl_ext, "momentum_update_",
                        lambda key, query, m: real(key, query, 1 - (1 - m) * 0.999))


def ring_pointer_off(monkeypatch):
    real = ops.ring_enqueue_

    def wrap(buffer, ptr, keys):
        real(buffer, ptr, keys)
        ptr.add_(1).remainder_(buffer.shape[0])
    monkeypatch.setattr(ops, "ring_enqueue_", wrap)


def phi_scaled(monkeypatch):
    real = pcl_ext.concentration
    monkeypatch.setattr(pcl_ext, "concentration", lambda *a, **kw: real(*a, **kw) * (1 + 1e-6))


def taken_cluster_drawn(monkeypatch):
    real = pcl_ext.sample_negatives

    def wrap(assignments, num_clusters, r, generator=None):
        ids = real(assignments, num_clusters, r, generator).clone()
        if r:
            ids[0] = assignments[0]
        return ids
    monkeypatch.setattr(pcl_ext, "sample_negatives", wrap)


# (break, --only pattern, cases that must all fail). Left out: the determinism cases (they
# compare the kernel with itself), half-precision cases where the break is below the dtype's
# rounding or, on the CPU, applied twice (the wrapper calls itself with float32 inputs).
BROKEN = [
    (loss_scaled, r"proto_nce (sampled|all) .*(float64|float32)$", "every float64/float32 case"),
    (dq_scaled, r"proto_nce (sampled|all) M=\d small (float64|float32)$", "small grid"),
    (dk_scaled, r"proto_nce (sampled|all) M=\d small (float64|float32)$", "small grid"),
    (one_flag_flipped, r"proto_nce .*M=3 small (float64|float32)$", "small M=3"),
    # info_nce: N=1 K=1 has loss 0 and zero gradients, which no scale changes.
    (nce_loss_scaled, r"info_nce (N=(?!1 )|SimCLR).*(float64|float32)$", "float64/float32 cases"),
    (nce_dq_scaled, r"info_nce (N=(?!1 )|SimCLR).*(float64|float32)$", "float64/float32 cases"),
    (nce_dk_scaled, r"info_nce (N=(?!1 )|SimCLR).*(float64|float32)$", "float64/float32 cases"),
    (nce_flag_flipped, r"info_nce (N=|SimCLR).*(float64|float32)$", "float64/float32 cases"),
    (momentum_off, r"momentum_update_ .*m=0\.999.*(float64|float32|Module|transposed)",
     "m=0.999 cases"),
    (ring_pointer_off, "ring_enqueue_ size", "every case of the op itself"),
    (phi_scaled, r"concentration .*(float64|float32)", "float64/float32 cases"),
    (taken_cluster_drawn, r"sample_negatives .*N=(6|40) K=20 (r=5|r=every|duplicate)",
     "non-empty draws"),
]


def run_check(capsys, *args):
    """check --quick on fresh inputs: exit status, the case lines, and the seed that repeats it."""
    status = check.main(["--quick", *args])
    out = capsys.readouterr().out.splitlines()
    seed = next(line.split()[2].rstrip(";") for line in out if line.startswith("# seed"))
    return status, [line for line in out if not line.startswith("#")], seed


@pytest.mark.parametrize("broken,only,what", BROKEN, ids=[b[0].__name__ for b in BROKEN])
def test_a_broken_kernel_fails_the_check(monkeypatch, capsys, broken, only, what):
    broken(monkeypatch)
    status, lines, seed = run_check(capsys, "--device", "cpu", "--only", only)
    assert lines, f"--only {only!r} selected no case"
    passed = [line for line in lines if not line.startswith("FAIL")]
    assert status == 1
    assert not passed, f"{what} must fail (--seed {seed}), but these passed:\n" + "\n".join(passed)


def test_the_real_kernels_pass(capsys):
    status, lines, seed = run_check(capsys)
    failed = [line for line in lines if not line.startswith(("PASS", "SKIP"))]
    assert status == 0 and not failed, f"--seed {seed}:\n" + "\n".join(failed)
    ops_seen = {line.split()[2] for line in lines if line.startswith("PASS")}
    assert ops_seen == set(check.OPS)
    # CUDA cases are skipped with a reason here, never passed without a GPU.
    if not torch.cuda.is_available():
        assert any(line.startswith("SKIP  cuda") for line in lines)


def test_nothing_run_exits_2(capsys):
    status, lines, _ = run_check(capsys, "--device", "cpu", "--only", "no such case")
    assert status == 2 and not lines


def test_python_dash_m():
    out = subprocess.run([sys.executable, "-m", "pcl_ext.check", "--quick", "--device", "cpu",
                          "--op", "ring_enqueue_"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "# pcl_ext " in out.stdout and "running torch" in out.stdout
    assert out.stdout.count("PASS  cpu    ring_enqueue_") >= 5
