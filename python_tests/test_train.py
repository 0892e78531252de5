"""The training script end to end on tiny digits runs: EM loop, checkpoints, resume, DDP."""
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")
pytest.importorskip("faiss")

from pcl_ext import train  # noqa: E402
from pcl_ext.data import DatasetInfo  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--dataset", "digits", "--max-samples", "96", "--image-size", "8", "--batch-size", "16",
        "--queue-size", "32", "--num-cluster", "4,8", "--nredo", "1", "--niter", "5",
        "--workers", "0", "--no-progress", "--device", "cpu"]
REPO = Path(__file__).resolve().parents[1]


def run_cli(args, **kwargs):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "pcl_ext.train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def load(path):
    return torch.load(path, map_location="cpu", weights_only=True)  # no trusted pickle needed


def test_em_loop_logs_checkpoints_and_evaluates(tmp_path, capsys):
    out = tmp_path / "run"
    results = train.train(train.parse_args(TINY + ["--epochs", "3", "--warmup-epochs", "1",
                                                   "--num-cluster", "24,40", "--pcl-r", "4",
                                                   "--out", str(out)]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1, 2]
    assert lines[0]["acc_proto"] is None and lines[2]["acc_proto"] is not None  # warm-up first
    assert all(x["loss"] > 0 and x["estep_seconds"] >= 0 for x in lines)
    assert (out / "metrics.png").stat().st_size > 0
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 3 and ckpt["args"]["pcl_r"] == 4
    assert [len(c) for c in ckpt["cluster_result"]["centroids"]] == [24, 40]
    assert set(ckpt) >= {"model_q", "model_k", "optimizer", "queue", "rng", "sampler_rng"}
    assert int(ckpt["queue"]["ptr"]) == (3 * (96 // 16) * 16) % 32
    assert set(results) == {"PCL, epoch 3", "random init"}
    assert "kNN top-1" in capsys.readouterr().out
    assert json.loads((out / "eval.json").read_text())["results"] == results


def test_moco_ablation_has_no_clusters(tmp_path):
    out = tmp_path / "moco"
    train.train(train.parse_args(TINY + ["--epochs", "1", "--num-cluster", "", "--no-eval",
                                         "--out", str(out)]))
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["cluster_result"] is None and ckpt["args"]["num_cluster"] == []
    # --method moco is the same run
    no_clusters = [a for a in TINY if a not in ("--num-cluster", "4,8")]
    train.train(train.parse_args(no_clusters + ["--epochs", "1", "--method", "moco",
                                                "--no-eval", "--out", str(tmp_path / "m")]))
    method = load(tmp_path / "m" / "checkpoint.pt")
    assert method["args"]["num_cluster"] == [] and method["args"]["method"] == "moco"
    assert method["history"][0]["loss"] == ckpt["history"][0]["loss"]
    for key, value in ckpt["model_q"].items():
        assert torch.equal(value, method["model_q"][key]), key


SIMCLR = [a for a in TINY if a not in ("--num-cluster", "4,8")] + ["--method", "simclr"]


def test_simclr_trains_one_encoder_and_evaluates(tmp_path, capsys):
    args = train.parse_args(SIMCLR)
    assert args.temperature == 0.5 and args.num_cluster == []  # SimCLR's preset T
    assert train.parse_args(SIMCLR + ["--temperature", "0.1"]).temperature == 0.1
    out = tmp_path / "simclr"
    results = train.train(train.parse_args(SIMCLR + ["--epochs", "2", "--out", str(out)]))
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and ckpt["args"]["method"] == "simclr"
    assert not {"model_k", "queue", "sampler_rng"} & set(ckpt)  # no momentum encoder, no queue
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1] and all(x["acc_proto"] is None for x in lines)
    # NT-Xent of 2 x 16 rows: log(31) at chance; accuracy among the 31 other rows
    assert all(0 < x["loss"] < 2 * math.log(31) and 0 <= x["acc_inst"] <= 100 for x in lines)
    assert all(0 <= x["align"] <= 4 and -4 <= x["uniform"] <= 0 for x in lines)
    assert lines[0]["estep_seconds"] < 1 and "spread_ratio" not in lines[1]
    assert (out / "metrics.png").stat().st_size > 0
    assert set(results) == {"SimCLR, epoch 2", "random init"}
    assert "SimCLR on digits" in capsys.readouterr().out
    # a method's checkpoint does not resume another's
    with pytest.raises(SystemExit, match="a simclr checkpoint cannot resume --method pcl"):
        train.train(train.parse_args(TINY + ["--epochs", "3", "--resume", "--out", str(out)]))


def test_methods_without_clusters_refuse_num_cluster(capsys):
    for method in ("moco", "simclr"):
        with pytest.raises(SystemExit) as stop:
            train.parse_args(TINY + ["--method", method])  # TINY has --num-cluster 4,8
        assert stop.value.code == 2
        assert f"--method {method} has no clusters" in capsys.readouterr().err


def test_evaluate_several_checkpoints_shares_the_random_baseline(tmp_path, capsys):
    from pcl_ext import evaluate

    one_epoch = TINY + ["--epochs", "1", "--warmup-epochs", "0", "--no-eval"]
    runs = {"pcl": [], "moco": ["--num-cluster", ""], "small": ["--image-size", "6"]}
    for name, extra in runs.items():
        train.train(train.parse_args(one_epoch + extra + ["--out", str(tmp_path / name)]))
    paths = [str(tmp_path / name / "checkpoint.pt") for name in runs]
    rows = evaluate.evaluate_checkpoint(paths, "cpu", progress=False)
    assert list(rows) == ["PCL, epoch 1 (pcl)", "MoCo, epoch 1 (moco)", "PCL, epoch 1 (small)",
                          "random init (digits, 8 px)", "random init (digits, 6 px)"]
    assert rows["PCL, epoch 1 (pcl)"] != rows["MoCo, epoch 1 (moco)"]
    for name, row in rows.items():
        assert set(row) == {"knn_top1", "linear_top1", "ami", "nmi"}, name
    for name, trained, baseline in [("pcl", "PCL, epoch 1 (pcl)", "random init (digits, 8 px)"),
                                    ("moco", "MoCo, epoch 1 (moco)", "random init (digits, 8 px)"),
                                    ("small", "PCL, epoch 1 (small)",
                                     "random init (digits, 6 px)")]:
        saved = json.loads((tmp_path / name / "eval.json").read_text())["results"]
        assert saved == {trained: rows[trained], baseline: rows[baseline]}
    # Alone, a checkpoint is evaluated beside the same random encoder (its own initialisation).
    alone = evaluate.evaluate_checkpoint(paths[1], "cpu", progress=False)
    assert alone == {"MoCo, epoch 1": rows["MoCo, epoch 1 (moco)"],
                     "random init": rows["random init (digits, 8 px)"]}
    table = capsys.readouterr().out
    assert "random init (digits, 6 px)" in table and "MoCo, epoch 1 (moco)" in table


def test_random_baseline_is_the_runs_own_initialisation(tmp_path):
    from pcl_ext import evaluate

    # lr 0: SGD leaves every parameter where it started (batch-norm buffers still move).
    out = tmp_path / "frozen"
    train.train(train.parse_args(TINY + ["--epochs", "1", "--lr", "0", "--no-eval",
                                         "--out", str(out)]))
    ckpt = load(out / "checkpoint.pt")
    info = DatasetInfo(**ckpt["info"])
    start = dict(evaluate.initial_encoder(ckpt["args"], info).named_parameters())
    assert start and all(torch.equal(p, ckpt["model_q"][name]) for name, p in start.items())
    other = dict(evaluate.initial_encoder(dict(ckpt["args"], seed=1), info).named_parameters())
    assert not all(torch.equal(p, ckpt["model_q"][name]) for name, p in other.items())


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    args = TINY + ["--epochs", "2", "--warmup-epochs", "1", "--no-eval"]
    runs = {}
    for amp in ("off", "bf16"):
        train.train(train.parse_args(args + ["--amp", amp, "--out", str(tmp_path / amp)]))
        runs[amp] = load(tmp_path / amp / "checkpoint.pt")
    losses = {amp: [h["loss"] for h in ckpt["history"]] for amp, ckpt in runs.items()}
    assert all(math.isfinite(x) for x in losses["bf16"])
    assert losses["bf16"] != losses["off"]  # autocast really ran: bf16 rounding moved the loss
    for amp, ckpt in runs.items():  # weights stay float32
        assert all(t.dtype == torch.float32 for t in ckpt["model_q"].values()
                   if t.is_floating_point()), amp
    with pytest.raises(SystemExit, match="--amp fp16 needs a CUDA device"):
        train.train(train.parse_args(args + ["--amp", "fp16", "--out", str(tmp_path / "fp16")]))


@pytest.mark.parametrize("method", ["pcl", "simclr"])
def test_killed_run_resumes_to_the_same_weights(tmp_path, method):
    args = TINY + ["--max-samples", "160", "--epochs", "4", "--warmup-epochs", "1", "--no-eval"]
    if method == "simclr":
        args = [a for a in args if a not in ("--num-cluster", "4,8")] + ["--method", "simclr"]
    straight = run_cli(args + ["--out", str(tmp_path / "straight")])
    killed = run_cli(args + ["--out", str(tmp_path / "killed")])
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    while time.time() < deadline and killed.poll() is None:
        if ckpt.exists() and load(ckpt)["epoch"] >= 1:
            break
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)  # mid-epoch: no chance to clean up
    killed.wait()
    stopped_at = load(ckpt)["epoch"]
    assert stopped_at < 4
    resumed = run_cli(args + ["--out", str(tmp_path / "killed"), "--resume"])
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert f"resumed {ckpt} at epoch {stopped_at}" in out
    assert straight.wait(timeout=600) == 0, straight.stdout.read()
    a, b = load(tmp_path / "straight" / "checkpoint.pt"), load(ckpt)
    assert a["epoch"] == b["epoch"] == 4
    for name in ("model_q", "model_k", "queue") if method == "pcl" else ("model_q",):
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
    assert [h["loss"] for h in a["history"]] == [h["loss"] for h in b["history"]]
    assert not list((tmp_path / "killed").glob("*.tmp"))


@pytest.mark.parametrize("flags,message", [
    (["--num-cluster", "abc"], "argument --num-cluster: expected an integer, got 'abc'"),
    (["--num-cluster", "10,0"], "argument --num-cluster: must be >= 1, got 0"),
    (["--temperature", "0"], "argument --temperature: must be > 0, got 0"),
    (["--temperature", "nan"], "argument --temperature: must be > 0, got nan"),
    (["--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["--moco-m", "1.5"], "argument --moco-m: must be >= 0 and <= 1, got 1.5"),
    (["--pcl-r", "-3"], "argument --pcl-r: must be >= 0, got -3 (or 'all')"),
    (["--arch", "vgg"], "argument --arch: invalid choice: 'vgg'"),
    (["--seed", "-1"], "argument --seed: must be >= 0"),
])
def test_bad_flags_are_usage_errors(capsys, flags, message):
    with pytest.raises(SystemExit) as stop:
        train.parse_args(TINY + flags)
    assert stop.value.code == 2
    assert message in capsys.readouterr().err


def test_presets_go_through_the_flag_types():
    args = train.parse_args(["--dataset", "imagefolder"])  # PCL's own values
    assert args.num_cluster == [25000, 50000, 100000] and args.pcl_r == 16384
    args = train.parse_args(["--dataset", "imagefolder", "--pcl-r", "all", "--num-cluster", ""])
    assert args.pcl_r is None and args.num_cluster == []  # given: not replaced by the preset
    assert train.parse_args(["--dataset", "digits"]).pcl_r is None  # the preset's "all"


@pytest.mark.parametrize("flags,message", [
    (["--max-samples", "64", "--batch-size", "1000"],
     "--batch-size 1000 exceeds the 64 training images: no training step would run"),
    (["--num-cluster", "4,200"], "--num-cluster 200 exceeds the 96 training images"),
    (["--pcl-r", "10"], "--pcl-r 10 exceeds the free clusters of the smallest --num-cluster 4"),
])
def test_a_run_that_cannot_train_stops_before_any_work(tmp_path, capsys, flags, message):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as stop:
        train.train(train.parse_args(TINY + flags + ["--out", str(out)]))
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not list(out.iterdir())  # no checkpoint, no metrics


def test_resume_refuses_a_checkpoint_carrying_code(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    ckpt = out / "checkpoint.pt"
    torch.save({"epoch": 1, "model_q": {}, "hook": os.system}, ckpt)
    with pytest.raises(SystemExit, match=rf"{re.escape(str(ckpt))}: not loaded: .*\.system"):
        train.train(train.parse_args(TINY + ["--epochs", "1", "--resume", "--out", str(out)]))


def torchrun(args, tmp_path):
    """``torchrun --nproc_per_node 2 ARGS`` on a free loopback port; returns the finished run."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    with socket.socket() as s:  # a free port on loopback (torchrun does not take port 0)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


SHUFFLE_WORKER = """
import sys, torch, torch.distributed as dist
from pcl_ext.train import Distributed, encode_keys
env = Distributed("cpu")
torch.manual_seed(0)
b = 16
# Rank r's images are r * 100 + row: every key says where it came from.
im = (env.rank * 100 + torch.arange(b, dtype=torch.float32)).reshape(b, 1, 1, 1).expand(b, 1, 2, 2)
# The identity: the keys must come back to the rank and row of their images.
same = encode_keys(lambda x: x.flatten(1)[:, :1], im, 2, env, across_ranks=True)
# A "batch norm" that reports which ranks' images a forward call saw.
seen = encode_keys(lambda x: (x.flatten(1)[:, :1] // 100).mean().expand(len(x), 1), im, 1, env,
                   across_ranks=True)
local = encode_keys(lambda x: (x.flatten(1)[:, :1] // 100).mean().expand(len(x), 1), im, 1, env)
out = torch.cat([same, seen, local], 1)
rows = [torch.empty_like(out) for _ in range(env.world)]
dist.all_gather(rows, out)
if env.master:
    torch.save(torch.stack(rows), sys.argv[1])
dist.destroy_process_group()
"""


def test_shuffle_bn_across_ranks(tmp_path):
    (tmp_path / "worker.py").write_text(SHUFFLE_WORKER)
    torchrun(["worker.py", str(tmp_path / "keys.pt")], tmp_path)
    keys = torch.load(tmp_path / "keys.pt")                       # rank x row x 3
    images = 100 * torch.arange(2.0)[:, None] + torch.arange(16.0)
    assert torch.equal(keys[..., 0], images)                      # every key back in place
    seen = keys[..., 1]
    assert ((seen > 0) & (seen < 1)).all()   # each rank's forward mixed both ranks' images
    assert torch.equal(keys[..., 2], torch.arange(2.0)[:, None].expand(2, 16))  # without: not


def test_torchrun_two_processes_gloo(tmp_path):
    out = tmp_path / "ddp"
    torchrun(["-m", "pcl_ext.train", *TINY, "--epochs", "2", "--warmup-epochs", "1",
              "--no-eval", "--out", str(out)], tmp_path)
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 2 and len(ckpt["rng"]) == 2
    # Both ranks' keys went into the queue: 2 ranks x 8 rows per step.
    assert int(ckpt["queue"]["ptr"]) == (2 * (96 // 16) * 16) % 32
    assert len(ckpt["cluster_result"]["im2cluster"][0]) == 96


def test_torchrun_two_processes_simclr(tmp_path):
    out = tmp_path / "ddp"
    torchrun(["-m", "pcl_ext.train", *SIMCLR, "--epochs", "1", "--no-eval", "--out", str(out)],
             tmp_path)
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["epoch"] == 1 and len(ckpt["rng"]) == 2 and "queue" not in ckpt
    # 2 ranks x 8 rows, gathered: 2 x 16 rows, 31 other rows each (chance: log 31)
    assert 0 < ckpt["history"][0]["loss"] < 2 * math.log(31)


def test_pauc_flags_add_their_terms_after_the_warmup(tmp_path):
    args = TINY + ["--epochs", "2", "--warmup-epochs", "1", "--no-eval"]
    losses = {}
    for name, extra in (("plain", []), ("pauc", ["--pauc-align", "0.5", "--pauc-uniform", "0.5",
                                                 "--pauc-corr", "0.5"])):
        train.train(train.parse_args(args + extra + ["--out", str(tmp_path / name)]))
        losses[name] = [h["loss"] for h in load(tmp_path / name / "checkpoint.pt")["history"]]
    assert losses["pauc"][0] == losses["plain"][0]  # MoCo warm-up: no clusters, no terms
    assert losses["pauc"][1] != losses["plain"][1] and math.isfinite(losses["pauc"][1])
    with pytest.raises(SystemExit):
        train.parse_args(["--pauc-uniform", "-1"])


def test_estep_logs_coagulation_monitors(tmp_path):
    out = tmp_path / "run"
    train.train(train.parse_args(TINY + ["--epochs", "3", "--warmup-epochs", "1", "--no-eval",
                                         "--num-cluster", "4,24", "--out", str(out)]))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for h in lines:  # every epoch: Wang and Isola's metrics of the training batches
        assert 0 <= h["align"] <= 4 and -4 <= h["uniform"] <= 0
    assert "spread_ratio" not in lines[0]  # warm-up: no E-step
    for h in lines[1:]:
        assert h["num_clusters"] == [4, 24] and len(h["kmeans_seconds"]) == 2
        assert all(0 < r < 2 for r in h["spread_ratio"])
        for key in ("empty_share", "singleton_share"):
            assert len(h[key]) == 2 and all(0 <= s <= 1 for s in h[key])
        assert all(c >= 0 for c in h["phi_cv"])
    # 96 samples in 24 clusters: singletons are likely; the log reports what the E-step saw.
    ckpt = load(out / "checkpoint.pt")
    sizes = torch.bincount(ckpt["cluster_result"]["im2cluster"][1], minlength=24)
    assert lines[-1]["singleton_share"][1] == (sizes == 1).double().mean().item()
    assert lines[-1]["empty_share"][1] == (sizes == 0).double().mean().item()
    assert (out / "metrics.png").stat().st_size > 0
    train.plot_metrics([{k: h[k] for k in ("epoch", "loss", "acc_inst", "acc_proto",
                                            "epoch_seconds", "estep_seconds")} for h in lines],
                       tmp_path / "old-log.png")  # a log from before the monitors still plots


def test_infomin_views_flag(tmp_path):
    default = train.parse_args(TINY)
    assert default.aug == "aug-plus" and default.crop_min == 0.5  # the digits' views
    assert train.parse_args(TINY + ["--crop-min", "0.3"]).crop_min == 0.3
    # InfoMin's crops with a MoCo queue are MoCo v2's, also where the floor is raised
    assert train.parse_args(TINY + ["--aug", "infomin"]).crop_min == 0.5
    assert train.parse_args(TINY + ["--aug", "infomin", "--crop-min", "0.1"]).crop_min == 0.1
    assert train.parse_args(["--dataset", "fashion-mnist"]).crop_min is None  # MoCo v2's 0.2
    out = tmp_path / "infomin"
    train.train(train.parse_args(TINY + ["--epochs", "1", "--aug", "infomin", "--no-eval",
                                         "--out", str(out)]))
    ckpt = load(out / "checkpoint.pt")
    assert ckpt["args"]["aug"] == "infomin" and math.isfinite(ckpt["history"][0]["loss"])
    with pytest.raises(SystemExit):
        train.parse_args(["--aug", "randaugment"])
    milder = train.parse_args(TINY + ["--aug", "infomin", "--randaug-ops", "1",
                                      "--randaug-magnitude", "9"])
    assert (milder.randaug_ops, milder.randaug_magnitude) == (1, 9)
    for bad in (["--randaug-magnitude", "31"], ["--randaug-ops", "-1"]):
        with pytest.raises(SystemExit):
            train.parse_args(TINY + bad)


def test_warm_estep_logs_and_survives_a_resume(tmp_path, monkeypatch):
    args = TINY + ["--epochs", "3", "--warmup-epochs", "1", "--estep", "warm", "--warm-niter",
                   "2", "--no-eval"]
    train.train(train.parse_args(args + ["--out", str(tmp_path / "straight")]))
    straight = load(tmp_path / "straight" / "checkpoint.pt")
    # The first E-step is cold (no previous centroids), the next one warm.
    assert [h.get("warm") for h in straight["history"]] == [None, [False, False], [True, True]]
    assert all(len(h["kmeans_seconds"]) == 2 for h in straight["history"][1:])

    plot = train.plot_metrics

    def stop_after_two_epochs(history, path):  # a kill right after epoch 1's checkpoint
        plot(history, path)
        if len(history) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(train, "plot_metrics", stop_after_two_epochs)
    with pytest.raises(KeyboardInterrupt):
        train.train(train.parse_args(args + ["--out", str(tmp_path / "killed")]))
    monkeypatch.undo()
    train.train(train.parse_args(args + ["--out", str(tmp_path / "killed"), "--resume"]))
    resumed = load(tmp_path / "killed" / "checkpoint.pt")
    # The resumed epoch started from the checkpoint's centroids: the same weights as without
    # the interruption (a cold restart there would have clustered differently).
    assert resumed["history"][2]["warm"] == [True, True]
    for name in ("model_q", "model_k"):
        for key in straight[name]:
            assert torch.equal(straight[name][key], resumed[name][key]), (name, key)
    for a, b in zip(straight["cluster_result"]["im2cluster"],
                    resumed["cluster_result"]["im2cluster"]):
        assert torch.equal(a, b)
