"""--keep-checkpoints (one checkpoint per epoch, a resumed run included) and
benchmarks/instance_probe.py (the instance loss of fixed encoders) on a tiny digits run."""
import json
import math
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "digits", "--image-size", "8", "--max-samples", "96", "--warmup-epochs", "1",
        "--batch-size", "32", "--queue-size", "32", "--num-cluster", "4", "--nredo", "1",
        "--niter", "2", "--seed", "1", "--no-eval", "--no-progress", "--keep-checkpoints"]


def train(out: Path, epochs: int, *extra: str) -> None:
    subprocess.run([sys.executable, "-m", "pcl_ext.train", *TINY, "--epochs", str(epochs),
                    "--out", str(out), *extra], cwd=ROOT, check=True)


def probe(json_path: Path, *paths: Path) -> dict:
    subprocess.run([sys.executable, "benchmarks/instance_probe.py", "--threads", "1",
                    "--queries", "16", "--queue", "40", "--seed", "3", "--json", str(json_path),
                    *map(str, paths)], cwd=ROOT, check=True)
    return json.loads(json_path.read_text())


def test_keep_checkpoints_and_probe(tmp_path):
    out = tmp_path / "run"
    train(out, 1)
    train(out, 2, "--resume")  # the resumed epoch keeps its own copy too
    load = lambda name: torch.load(out / name, map_location="cpu", weights_only=True)
    first, second, last = load("checkpoint-e1.pt"), load("checkpoint-e2.pt"), load("checkpoint.pt")
    assert (first["epoch"], second["epoch"], last["epoch"]) == (1, 2, 2)
    assert len(first["history"]) == 1 and second["history"] == last["history"]
    # The copy of epoch 1 is epoch 1's state, not a link that the next save overwrote.
    assert any(not torch.equal(first["model_q"][k], last["model_q"][k]) for k in last["model_q"])

    result = probe(tmp_path / "a.json", out / "checkpoint-e1.pt", out / "checkpoint-e2.pt")
    rows = result["rows"]
    assert [r["epoch"] for r in rows] == [1, 2] and result["queue"] == 40
    for row, ckpt in zip(rows, (first, second)):
        assert row["logged_loss"] == ckpt["history"][-1]["loss"]
        for key in ("fixed_loss", "saved_queue_loss"):
            # InfoNCE over 1 + negatives columns: positive, finite
            assert 0 < row[key] < math.inf
        for key in ("fixed_top1", "saved_queue_top1"):
            assert 0 <= row[key] <= 100
        assert 0 <= row["align"] <= 4  # squared distance of unit vectors
    # The same inputs for every checkpoint and every call: a second call gives the same rows.
    again = probe(tmp_path / "b.json", out / "checkpoint-e1.pt", out / "checkpoint-e2.pt")
    assert [r["fixed_loss"] for r in again["rows"]] == [r["fixed_loss"] for r in rows]


def test_instance_loss_matches_float64_reference():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from instance_probe import instance_loss

    g = torch.Generator().manual_seed(0)
    q, pos, neg = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (5, 5, 7))
    loss, top1 = instance_loss(q, pos, neg, 0.2)
    logits = torch.cat([(q * pos).sum(1, keepdim=True), q @ neg.T], 1).double() / 0.2
    want = (torch.logsumexp(logits, 1) - logits[:, 0]).mean().item()
    assert abs(loss - want) < 1e-6
    assert top1 == (logits.argmax(1) == 0).double().mean().item() * 100


def test_probe_refuses_a_simclr_checkpoint(tmp_path):
    out = tmp_path / "simclr"
    subprocess.run([sys.executable, "-m", "pcl_ext.train", "--method", "simclr", "--dataset",
                    "digits", "--image-size", "8", "--max-samples", "64", "--epochs", "1",
                    "--warmup-epochs", "0", "--batch-size", "32", "--no-eval", "--no-progress",
                    "--out", str(out)], cwd=ROOT, check=True)
    proc = subprocess.run([sys.executable, "benchmarks/instance_probe.py",
                           str(out / "checkpoint.pt")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "no momentum encoder" in proc.stderr
