"""What the benchmarks share: the common options, the environment record, the timing loops
and their statistics, table rows, and the JSON output.

The scripts run as ``python benchmarks/<name>.py`` from the repository root, which puts this
folder on ``sys.path``: they ``import common``.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, TypeVar

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import pcl_ext

T = TypeVar("T")
Columns = Sequence[tuple[str, int]]  # (header, width) per column
RESULTS = Path(__file__).resolve().parent / "results"
UNITS = {"s": 1.0, "ms": 1e3, "us": 1e6}


# ----------------------------------------------------------------------------- set-up
def argument_parser(description: str, threads_help: str = "torch.set_num_threads (default: "
                    "as is)") -> argparse.ArgumentParser:
    """A parser holding the options every benchmark opens with, --device and --threads."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"),
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help=threads_help)
    return p


def add_seed_and_json(p: argparse.ArgumentParser, json_name: str) -> None:
    """Adds the options every benchmark closes with, --seed and --json; ``json_name`` is the
    pattern of the default output's name, for the help."""
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help=f"output (default: benchmarks/results/{json_name})")


def init_device(args: argparse.Namespace) -> tuple[torch.device, int]:
    """The --device (which must be there) and the torch thread count once --threads is set."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device available")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return device, torch.get_num_threads()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with open("/proc/cpuinfo") as f:
        models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return f"{models[0]} ({len(models)} logical cores)" if models else platform.processor()


def environment(device: torch.device, **fields: object) -> dict:
    """The run's record for the JSON: date, versions, device, threads, then ``fields``."""
    return dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, pcl_ext=pcl_ext.__version__,
                python=platform.python_version(), device=device.type,
                device_name=device_name(device), threads=torch.get_num_threads(), **fields)


# ----------------------------------------------------------------------------- timing
def shuffle_free_clusters(pos: torch.Tensor, num_clusters: int, r: int,
                          generator: torch.Generator) -> torch.Tensor:
    """PCL's negatives in vectorized torch: r distinct ids drawn uniformly from the clusters
    that no row of the batch (``pos``) is assigned to (mask, then a random permutation)."""
    free = torch.ones(num_clusters, dtype=torch.bool, device=pos.device)
    free[pos] = False
    free_ids = free.nonzero()[:, 0]
    pick = torch.randperm(free_ids.numel(), generator=generator, device=pos.device)[:r]
    return free_ids[pick]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], T], device: torch.device) -> tuple[T, float]:
    """fn()'s result and its wall-clock seconds, the device synchronized on both sides."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def repeat_timed(fn: Callable[[], T], device: torch.device,
                 repeats: int) -> tuple[T, list[float]]:
    """fn()'s last result and the seconds of each of ``repeats`` calls, with no warm-up."""
    out, times = None, []
    for _ in range(repeats):
        out, seconds = timed(fn, device)
        times.append(seconds)
    return out, times


def time_round_robin(fns: Mapping[str, Callable[[], object]], device: torch.device,
                     warmup: int, repeats: int,
                     before: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` calls of every fn, after ``warmup`` untimed rounds.

    Every round calls each fn once, whoever went first the round before going last, so that
    machine noise hits them alike; ``before`` runs ahead of each call, outside the timer."""
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(warmup + repeats):
        for name in names[i % len(names):] + names[:i % len(names)]:
            before()
            _, seconds = timed(fns[name], device)
            if i >= warmup:
                times[name].append(seconds)
    return times


def summary(seconds: Sequence[float], unit: str) -> dict:
    """Median, min, max, interquartile range and every time, in ``unit`` (s, ms or us), keyed
    ``median_<unit>`` and so on."""
    times = [t * UNITS[unit] for t in seconds]
    q1, median, q3 = torch.tensor(times, dtype=torch.float64).quantile(
        torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
    return {f"median_{unit}": median, f"min_{unit}": min(times), f"max_{unit}": max(times),
            f"iqr_{unit}": [q1, q3], f"times_{unit}": times}


@contextlib.contextmanager
def quiet_profiler() -> Iterator[None]:
    """Runs the block with the torch profiler's own chatter taken out of stderr.

    Kineto, the profiler's C++ half, writes to the process's stderr directly: "USDT ...
    profiler_start/stop" markers and "STAGE" lines at every profile, and on a CUDA build of
    torch without a usable GPU an "ERROR ... gpuGetDeviceCount failed" as it reads the device
    properties. The block's stderr goes to a temporary file; everything else in it (Python
    warnings, any other error) is written back afterwards. The GPU line is dropped only where
    torch sees no GPU, so a real CUDA failure still shows."""
    noise = [r"^(USDT|STAGE):"]
    if not torch.cuda.is_available():
        noise.append(r"^ERROR:.*\] gpuGetDeviceCount failed")
    pattern = re.compile("|".join(noise))
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            log.seek(0)
            kept = [line for line in log.read().decode(errors="replace").splitlines()
                    if not pattern.search(line)]
            if kept:
                print("\n".join(kept), file=sys.stderr, flush=True)


def cpu_peak_bytes(fn: Callable[[], object]) -> int:
    """Peak of the running sum of the CPU allocator's alloc (+) / free (-) events during fn().

    The profiler only hears allocations of the calling thread, not of OpenMP workers, so
    callers run fn single-threaded to see every allocation."""
    with quiet_profiler(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
    running = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        running += e.nbytes()
        peak = max(peak, running)
    return peak


# ----------------------------------------------------------------------------- output
def format_row(cells: Sequence[object], columns: Columns) -> str:
    """The cells right-aligned to the columns' widths, two spaces apart (a wider cell runs
    over)."""
    return "  ".join(f"{str(c):>{w}}" for c, (_, w) in zip(cells, columns))


def format_header(columns: Columns) -> str:
    return format_row([name for name, _ in columns], columns)


def write_results(payload: dict, path: Optional[Path], default_name: str) -> None:
    """Writes ``payload`` as JSON to ``path`` (--json), else to benchmarks/results/
    ``default_name``, and says where."""
    path = path or RESULTS / default_name
    # Temp file + rename: a reader never sees a half-written result.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the results from other users
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    print(f"# wrote {path}")
