"""PCL and its variants against the MoCo ablation: a grid of arms x seeds, resumable.

    python benchmarks/pcl_grid.py                       # the whole grid (hours on 2 CPU cores)
    python benchmarks/pcl_grid.py --max-runs 2          # a piece of it; run again to go on
    python benchmarks/pcl_grid.py --table               # the table of what has finished

Every run trains ``python -m pcl_ext.train`` with the preset's flags plus its arm's, in
``--runs-dir/<preset>/<arm>-s<seed>`` (checkpoint every epoch), then evaluates the query
encoder's backbone (kNN top-1, linear top-1, AMI/NMI; ``pcl_ext.evaluate``) and writes
``--results/<preset>/<arm>-s<seed>.json`` atomically (the table: ``<preset>/table.md``). A
run whose JSON exists is never rerun; a killed one resumes from its last checkpoint
(``--resume``). The random initialisation of each seed (every arm's own starting point: the
encoder depends on the seed only) is evaluated once, ``<preset>/random-s<seed>.json``. The
table gives mean +- standard deviation over seeds per arm, and each arm's paired difference to
PCL (same seeds): a difference inside its spread is not evidence of anything.

Arms (the preset's flags plus):

* ``moco``: ``--num-cluster ''``, MoCo v2 (PCL's own ablation: the instance term alone);
* ``pcl``: PCL as the preset sets it (cold E-step, PCL's k-means);
* ``pcl-pauc``: PCL with this package's reading of PAUC's three terms, 0.1 each;
* ``pcl-infomin``: PCL with InfoMin Aug views (``--aug infomin``);
* ``pcl-warm``: PCL with the warm-started E-step (``--estep warm``).
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "grid"

# The data, model and schedule every arm shares. ``fashion16`` is sized for a 2-core CPU:
# 10k training images at 16 px, 15 epochs of batch 128 (5 of them MoCo warm-up), three
# granularities; the evaluation uses the full 60k/10k splits.
FASHION16 = ["--dataset", "fashion-mnist", "--image-size", "16", "--max-samples", "10000",
             "--epochs", "15", "--warmup-epochs", "5", "--batch-size", "128", "--lr", "0.03",
             "--queue-size", "4096", "--num-cluster", "50,100,200"]
PRESETS = {
    # T = 0.1 and crops of at least half the image, as the digits demo. With MoCo v2's 20%-area
    # crops (`fashion16-crop0.2`, kept below) the MoCo arm of seed 0 learned its instance task
    # only weakly (loss 5.9 -> 5.5 of ln 4097 = 8.3); with 0.5 it fell to 3.9, and its linear
    # probe and AMI rose (86.06 / 0.5635 against 85.71 / 0.5150). At PCL's T = 0.2 (the first
    # preset, `fashion16-t0.2`) the MoCo arm ended behind its random initialisation on kNN.
    "fashion16": FASHION16 + ["--temperature", "0.1", "--crop-min", "0.5"],
    "fashion16-crop0.2": FASHION16 + ["--temperature", "0.1"],
    "fashion16-t0.2": FASHION16 + ["--temperature", "0.2"],
    # CI's check of the machinery (seconds): a few steps on scikit-learn's digits.
    "smoke": ["--dataset", "digits", "--image-size", "8", "--max-samples", "96", "--epochs", "2",
              "--warmup-epochs", "1", "--batch-size", "32", "--queue-size", "64",
              "--num-cluster", "4,6", "--arch", "resnet18", "--nredo", "1", "--niter", "2"],
}
ARMS = {
    "moco": ["--num-cluster", ""],
    "pcl": [],
    "pcl-pauc": ["--pauc-align", "0.1", "--pauc-uniform", "0.1", "--pauc-corr", "0.1"],
    "pcl-infomin": ["--aug", "infomin"],
    "pcl-warm": ["--estep", "warm"],
}

def run_flags(preset: str, arm: str, seed: int) -> list[str]:
    """``pcl_ext.train``'s flags of one run: the preset's, the arm's, the seed."""
    return PRESETS[preset] + ARMS[arm] + ["--seed", str(seed)]


# (key in the run's metrics, short name for the Δ columns, column header, decimals)
METRICS = (("knn_top1", "kNN", "kNN top-1 %", 2), ("linear_top1", "linear", "linear top-1 %", 2),
           ("ami", "AMI", "AMI", 4))
DELTA_REFS = (("PCL", "pcl"), ("random", "random init"))  # (column name, arm)


def cpu_kind() -> str:
    """``avx512`` or ``avx2`` (or the machine): speed figures differ 2-4x between them."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    return "avx512" if "avx512f" in flags else ("avx2" if "avx2" in flags else platform.machine())


def save(path: Path, **fields) -> None:
    """The run's JSON, written atomically: the benchmarks' common record (date, versions, CPU
    model, threads) plus the CPU kind and ``fields``."""
    import torch
    from common import environment, write_results

    write_results(environment(torch.device("cpu"), host_cpu=cpu_kind(), cores=os.cpu_count(),
                              **fields), path, path.name)


def evaluate(preset_flags: list[str], state: Optional[dict], seed: int, threads: int) -> dict:
    """kNN / linear / AMI of the backbone: the checkpoint's query encoder (``state``), or the
    seed's random initialisation (``state=None``), on the preset's data set."""
    import torch
    from torch.utils.data import DataLoader

    from pcl_ext.data import build_datasets
    from pcl_ext.evaluate import evaluate_encoder, initial_encoder
    from pcl_ext.train import parse_args

    torch.set_num_threads(threads)
    args = vars(parse_args(preset_flags + ["--seed", str(seed)]))
    _, train_eval, test, info = build_datasets(args["dataset"], args["data_root"],
                                               image_size=args["image_size"])
    encoder = initial_encoder(args, info)
    if state is not None:
        encoder.load_state_dict(state)
    encoder.eval()
    loaders = [DataLoader(ds, batch_size=512) for ds in (train_eval, test)]
    start = time.perf_counter()
    metrics = evaluate_encoder(encoder.features, *loaders, info.num_classes, "cpu", seed=seed,
                               progress=False)
    return dict(metrics, eval_seconds=time.perf_counter() - start)


def run_one(arm: str, seed: int, opts) -> None:
    """Train (or resume) one run and write its JSON."""
    from pcl_ext.evaluate import load_checkpoint

    out = opts.runs_dir / opts.preset / f"{arm}-s{seed}"
    flags = run_flags(opts.preset, arm, seed)
    cmd = [sys.executable, "-m", "pcl_ext.train", *flags, "--out", str(out), "--resume",
           "--no-eval", "--no-progress"]
    print(f"[{arm} seed {seed}] {shlex.join(cmd[1:])}", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(opts.threads))
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"[{arm} seed {seed}] pcl_ext.train exited with {proc.returncode}")
    wall = time.perf_counter() - start
    ckpt = load_checkpoint(out / "checkpoint.pt")
    history = ckpt["history"]
    metrics = evaluate(PRESETS[opts.preset], ckpt["model_q"], seed, opts.threads)
    esteps = [h for h in history if "kmeans_seconds" in h]
    save(opts.results / opts.preset / f"{arm}-s{seed}.json",
         arm=arm, seed=seed, preset=opts.preset, command=shlex.join(["python", *cmd[1:]]),
         metrics=metrics,
         train_seconds=sum(h["epoch_seconds"] for h in history),
         estep_seconds=sum(h["estep_seconds"] for h in history),
         # k-means alone, per E-step and granularity (cold: PCL's nredo runs; warm: one run)
         kmeans_seconds=[h["kmeans_seconds"] for h in esteps],
         warm=[h["warm"] for h in esteps],
         this_wall_seconds=wall,  # this invocation only: a resumed run's earlier part is not in it
         final=dict(loss=history[-1]["loss"], acc_inst=history[-1]["acc_inst"],
                    acc_proto=history[-1]["acc_proto"]),
         acc_inst_by_epoch=[h["acc_inst"] for h in history])


def run_random(seed: int, opts) -> None:
    path = opts.results / opts.preset / f"random-s{seed}.json"
    if path.exists():
        return
    print(f"[random init seed {seed}] evaluating", flush=True)
    metrics = evaluate(PRESETS[opts.preset], None, seed, opts.threads)
    save(path, arm="random init", seed=seed, preset=opts.preset, metrics=metrics)


def load_results(results: Path, preset: str) -> dict[str, dict[int, dict]]:
    """``{arm: {seed: payload}}`` of the preset's finished runs, random init as its own arm."""
    out: dict[str, dict[int, dict]] = {}
    for path in sorted((results / preset).glob("*.json")):
        payload = json.loads(path.read_text())
        if payload.get("preset") == preset:
            out.setdefault(payload["arm"], {})[payload["seed"]] = payload
    return out


def mean_std(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(results: Path, preset: str) -> str:
    """Markdown: per arm, n seeds, mean ± std of each metric, its paired difference to PCL
    and to the random init over the seeds both have, and the training minutes."""
    runs = load_results(results, preset)
    order = ["random init", *ARMS]
    lines = ["| arm | seeds | " + " | ".join(h for _, _, h, _ in METRICS)
             + "".join(f" | Δ {short} vs {ref}" for ref, _ in DELTA_REFS
                       for _, short, _, _ in METRICS) + " | train min | E-step s |",
             "|---|---|" + "---|" * (len(METRICS) + len(DELTA_REFS) * len(METRICS) + 2)]
    for arm in order:
        if arm not in runs:
            continue
        by_seed = runs[arm]
        cells = [arm, ",".join(map(str, sorted(by_seed)))]
        for key, _, _, digits in METRICS:
            cells.append(mean_std([p["metrics"][key] for p in by_seed.values()], digits))
        for (_, ref), (key, _, _, digits) in itertools.product(DELTA_REFS, METRICS):
            common = sorted(set(by_seed) & set(runs.get(ref, {})))
            diffs = [by_seed[s]["metrics"][key] - runs[ref][s]["metrics"][key] for s in common]
            cells.append("" if arm == ref else mean_std(diffs, digits))
        train = [p["train_seconds"] / 60 for p in by_seed.values() if "train_seconds" in p]
        cells.append(mean_std(train, 1) if train else "")
        per_estep = [statistics.mean(sum(step) for step in p["kmeans_seconds"])
                     for p in by_seed.values() if p.get("kmeans_seconds")]
        cells.append(mean_std(per_estep, 1) if per_estep else "")
        lines.append("| " + " | ".join(cells) + " |")
    kinds = sorted({p.get("host_cpu", "?") for arm in runs.values() for p in arm.values()})
    lines.append("")
    lines.append(f"Preset `{preset}`: {shlex.join(PRESETS[preset])}. Mean ± sample standard "
                 "deviation over the seeds listed; Δ columns are paired by seed. CPU kind(s): "
                 + ", ".join(kinds) + ". E-step s: k-means seconds per E-step (three "
                 "granularities), without the feature pass. Train minutes depend on the threads "
                 "(each JSON's `threads`) and on runs sharing the machine.")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=list(PRESETS), default="fashion16")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"comma-separated subset of {', '.join(ARMS)}")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (at least 3 for "
                   "a spread worth reading)")
    p.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "grid",
                   help="the runs' checkpoints (large; not committed)")
    p.add_argument("--results", type=Path, default=RESULTS, help="one JSON per finished run")
    p.add_argument("--threads", type=int, default=os.cpu_count(),
                   help="threads of each run (OMP_NUM_THREADS)")
    p.add_argument("--max-runs", type=int, default=None,
                   help="stop after this many runs have finished in this invocation")
    p.add_argument("--dry-run", action="store_true", help="print what would run")
    p.add_argument("--table", action="store_true", help="only print the table")
    opts = p.parse_args(argv)
    arms = [a for a in opts.arms.split(",") if a]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"--arms: unknown {unknown}; expected some of {list(ARMS)}")
    try:
        seeds = [int(s) for s in opts.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds: expected comma-separated integers, got {opts.seeds!r}")
    if not seeds or min(seeds) < 0:
        p.error(f"--seeds: expected seeds >= 0, got {opts.seeds!r}")
    if opts.threads < 1:
        p.error("--threads must be >= 1")
    (opts.results / opts.preset).mkdir(parents=True, exist_ok=True)
    if not opts.table:
        sys.path.insert(0, str(ROOT))
        done = 0
        # Seed-major: a partial grid holds every arm of its first seeds, a paired comparison.
        todo = [(seed, arm) for seed in seeds for arm in arms
                if not (opts.results / opts.preset / f"{arm}-s{seed}.json").exists()]
        for seed, arm in todo:
            if opts.max_runs is not None and done >= opts.max_runs:
                break
            if opts.dry_run:
                print(f"would run {arm} seed {seed}")
            else:
                run_random(seed, opts)
                run_one(arm, seed, opts)
                write_table(opts)  # after every run: a grid stopped between runs has it too
            done += 1
    print(write_table(opts) if not opts.dry_run else table(opts.results, opts.preset))


def write_table(opts) -> str:
    text = table(opts.results, opts.preset)
    (opts.results / opts.preset / "table.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
