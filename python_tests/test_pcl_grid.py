"""benchmarks/pcl_grid.py: one JSON per finished run, never rerun, resumed after a kill, and a
table whose statistics are those of the JSONs."""
import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def grid():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its `common`, as when run as a script
    spec = importlib.util.spec_from_file_location("pcl_grid", ROOT / "benchmarks" / "pcl_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_runs_once_and_resumes(grid, tmp_path, monkeypatch):
    runs, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--preset", "smoke", "--arms", "moco,pcl-warm", "--seeds", "3", "--runs-dir",
            str(runs), "--results", str(results), "--threads", "1"]
    # A run killed after its first epoch: a checkpoint of epoch 1 of 2 and no JSON.
    first = grid.PRESETS["smoke"] + grid.ARMS["moco"] + ["--seed", "3"]
    first[first.index("--epochs") + 1] = "1"
    first[first.index("--warmup-epochs") + 1] = "1"
    subprocess.run([sys.executable, "-m", "pcl_ext.train", *first, "--out",
                    str(runs / "smoke" / "moco-s3"),
                    "--no-eval", "--no-progress"], cwd=ROOT, check=True)
    epoch0 = (runs / "smoke" / "moco-s3" / "metrics.jsonl").read_text()
    grid.main(argv)
    history = (runs / "smoke" / "moco-s3" / "metrics.jsonl").read_text().splitlines(keepends=True)
    # Resumed: epoch 0's record (its measured seconds included) is the killed run's.
    assert len(history) == 2 and history[0] == epoch0 and json.loads(history[1])["epoch"] == 1

    for name in ("moco-s3", "pcl-warm-s3", "random-s3"):
        payload = json.loads((results / "smoke" / f"{name}.json").read_text())
        assert payload["seed"] == 3 and payload["preset"] == "smoke"
        for key in ("knn_top1", "linear_top1", "ami", "nmi"):
            assert 0 <= payload["metrics"][key] <= 100
    warm = json.loads((results / "smoke" / "pcl-warm-s3.json").read_text())
    assert warm["warm"] == [[False, False]]  # one E-step (epoch 1 of 2): cold, nothing to start from
    assert len(warm["kmeans_seconds"]) == 1 and len(warm["kmeans_seconds"][0]) == 2
    assert json.loads((results / "smoke" / "moco-s3.json").read_text())["kmeans_seconds"] == []
    table = (results / "smoke" / "table.md").read_text()
    assert "| moco | 3 |" in table and "| pcl-warm | 3 |" in table and "random init" in table

    # Finished runs are never rerun: a second invocation starts no training.
    def refuse(*args, **kwargs):
        raise AssertionError(f"reran {args}")
    monkeypatch.setattr(grid.subprocess, "run", refuse)
    grid.main(argv)


def test_table_statistics(grid, tmp_path):
    """mean ± sample std per arm, paired differences over the seeds both arms have."""
    values = {"pcl": {0: 80.0, 1: 82.0, 2: 81.0}, "moco": {0: 79.0, 1: 80.0},
              "random init": {0: 78.0, 1: 78.5, 2: 79.0}}
    for arm, by_seed in values.items():
        for seed, knn in by_seed.items():
            payload = {"arm": arm, "seed": seed, "preset": "smoke", "host_cpu": "avx2",
                       "metrics": {"knn_top1": knn, "linear_top1": knn + 5, "ami": knn / 100}}
            if arm != "random init":
                payload.update(train_seconds=600.0, kmeans_seconds=[[1.0, 2.0]] * 2)
            name = "random" if arm == "random init" else arm
            (tmp_path / "smoke").mkdir(exist_ok=True)
            (tmp_path / "smoke" / f"{name}-s{seed}.json").write_text(json.dumps(payload))
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in grid.table(tmp_path, "smoke").splitlines() if line.startswith("| ")}
    pcl = rows["pcl"]
    assert pcl[1] == "0,1,2"
    assert pcl[2] == f"81.00 ± {statistics.stdev([80.0, 82.0, 81.0]):.2f}"
    moco = rows["moco"]
    assert moco[2] == "79.50 ± 0.71"
    # Δ kNN vs PCL over seeds 0 and 1: -1 and -2
    assert moco[5] == f"-1.50 ± {statistics.stdev([-1.0, -2.0]):.2f}"
    # Δ kNN vs random over seeds 0 and 1: 1.0 and 1.5
    assert moco[8] == f"1.25 ± {statistics.stdev([1.0, 1.5]):.2f}"
    # linear = kNN + 5 and AMI = kNN / 100 here: the same differences, in their own columns
    assert moco[6] == moco[5] and moco[9] == moco[8]
    assert moco[7] == f"-0.0150 ± {statistics.stdev([-0.01, -0.02]):.4f}"
    assert moco[11] == "10.0 ± 0.0" and moco[12].startswith("3.0")
    header = grid.table(tmp_path, "smoke").splitlines()[0].split(" | ")
    assert header[5:11] == ["Δ kNN vs PCL", "Δ linear vs PCL", "Δ AMI vs PCL", "Δ kNN vs random",
                            "Δ linear vs random", "Δ AMI vs random"]
    assert rows["random init"][2].startswith("78.50 ± 0.50")


def test_bad_flags(grid, capsys):
    for argv in (["--arms", "pcl,nope"], ["--seeds", "a"], ["--threads", "0"]):
        with pytest.raises(SystemExit) as exc:
            grid.main(argv + ["--dry-run"])
        assert exc.value.code == 2
        assert "--" in capsys.readouterr().err
