#!/usr/bin/env bash
# The first GPU session in one command, on a bare machine with a GPU, torch and no network:
# build pcl_ext (or install a prebuilt wheel), its self-check, the CUDA tests, compute-sanitizer
# on small cases, and the GPU benchmarks. Each step runs under its own time limit, all within a
# deadline of BUDGET_S seconds (default 540), so a hang costs one step, not the session. Logs
# and results go to OUTDIR (7 files, no subfolders); a summary table is printed and saved.
#
#   bash benchmarks/gpu_run.sh OUTDIR [WHEEL]
#   bash benchmarks/gpu_run.sh --cpu-rehearsal OUTDIR [WHEEL]   # the same steps, no GPU needed
#
# WHEEL: a pcl_ext wheel built elsewhere, installed instead of building here. Without it the
# package is built in place against the installed torch with all cores.
# faiss-cpu (for the E-step benchmark) is installed from the repository's .whl/ folder when it
# holds one; fetch it where there is network, for the GPU machine's Python 3.12:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 -d .whl faiss-cpu==1.15.1
# Environment: PYTHON (default python3), BUDGET_S (default 540), MAX_JOBS (default: all cores),
# LIMIT_SCALE (default 1: multiplies every step's time limit, for a slower rehearsal machine).
# Exit status 1 when a step failed or ran out of time, else 0.
set -uo pipefail

rehearsal=0
if [ "${1:-}" = "--cpu-rehearsal" ]; then rehearsal=1; shift; fi
if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  sed -n '2,19p' "$0" >&2
  exit 2
fi
mkdir -p "$1" && out=$(cd "$1" && pwd)
wheel=""
if [ $# -eq 2 ]; then wheel=$(realpath "$2"); fi
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
budget=${BUDGET_S:-540}
scale=${LIMIT_SCALE:-1}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
dev=cuda
if [ $rehearsal = 1 ]; then dev=cpu; fi
export PYTHONUNBUFFERED=1
rm -f "$out"/{summary.txt,build.log,check.log,tests.log,sanitizer.log,bench.log,results.json}

rows=()
record() {  # step status seconds key-figure
  rows+=("$1|$2|$3|$4")
  printf '== %-22s %-7s %5ss  %s\n' "$1" "$2" "$3" "$4"
}

# step NAME LIMIT LOG CMD...: CMD under `timeout`, capped by the deadline, output appended to
# LOG. Sets rc and secs; returns 1 without running when the deadline is too close.
step() {
  local name=$1 limit=$2 log=$3
  shift 3
  local left=$((budget - SECONDS - 10))
  limit=$((limit * scale))
  if [ "$left" -lt 20 ]; then
    record "$name" SKIP 0 "deadline (BUDGET_S=$budget) reached"
    return 1
  fi
  if [ "$limit" -gt "$left" ]; then limit=$left; fi
  printf '\n== %s (limit %ss): %s\n' "$name" "$limit" "$*" >> "$log"
  echo "== $name (limit ${limit}s)"
  local start=$SECONDS
  (cd "$work" && timeout --kill-after=10 "$limit" "$@") >> "$log" 2>&1
  rc=$?
  secs=$((SECONDS - start))
  return 0
}

status_of() {  # exit code -> status word
  case $1 in 0) echo PASS ;; 124 | 137) echo TIMEOUT ;; *) echo FAIL ;; esac
}

# ------------------------------------------------------------------------------ helpers
cat > "$work/tools.py" <<'EOF'
"""gpu_run.sh's helpers: key figures of the benchmark JSONs, and their combination."""
import json
import pathlib
import sys


def key(kind: str, d: dict) -> str:
    if kind == "loss_speed":
        return ", ".join(f"{r['shape']} {r['speedup']:.2f}x" if "speedup" in r else r["shape"]
                         for r in d["results"])
    if kind == "info_nce_speed":
        return ", ".join(f"2N={r['rows']} {r['fused']['median_ms']:.3g} ms "
                         f"({r['fused_over_floor']:.2f}x floor"
                         + (f", {1 / r['fused_over_eager']:.2f}x vs eager)"
                            if "fused_over_eager" in r else ")") for r in d["results"])
    if kind == "momentum_speed":
        r = d["result"]
        return (f"{r['methods']['pcl_ext']['gbps']:.0f} GB/s, {r['speedup_vs_lerp']:.2f}x vs "
                f"_foreach_lerp_, {r['speedup_vs_moco']:.1f}x vs MoCo")
    if kind == "queue_speed":
        return ", ".join(f"{r['size']}: {r['ring']['median_us']:.3g} us ({r['speedup_vs_moco']:.1f}"
                         "x MoCo)" for r in d["results"])
    if kind == "concentration_speed":
        return ", ".join(f"n={r['n']} K={r['k']} {r['methods']['pcl_ext']['median_ms']:.2f} ms "
                         f"({r['speedup_vs_pcl_loop']:.0f}x)" for r in d["results"][-2:])
    if kind == "sample_negatives_speed":
        return ", ".join(f"K={r['k']} {r['methods']['pcl_ext']['median_ms']:.3f} ms "
                         f"({r['speedup_vs_pcl']:.0f}x)" for r in d["results"])
    if kind == "cluster_speed":
        return ", ".join(f"{r['backend']} K={r['k']}/{r['nredo']} {r['kmeans']['median_s']:.2f}s"
                         for r in d["results"])
    raise ValueError(kind)


if sys.argv[1] == "key":  # key KIND JSON
    print(key(sys.argv[2], json.loads(pathlib.Path(sys.argv[3]).read_text())))
else:  # combine OUT JSON...: one file, keyed by the JSONs' names
    parts = {pathlib.Path(p).stem: json.loads(pathlib.Path(p).read_text()) for p in sys.argv[3:]}
    pathlib.Path(sys.argv[2]).write_text(json.dumps(parts, indent=1) + "\n")
EOF

cat > "$work/cuda_ops_once.py" <<'EOF'
"""Every pcl_ext op once on small inputs (for compute-sanitizer): both proto_nce layouts in every
dtype and math mode, D > 256, a partial row block, unaligned slices, phi = 1e-5 in float16;
info_nce forward and backward in the same modes (exclude_self, queries is keys, K spanning
chunks, N = 1 and K = 1)."""
import sys

import torch
import torch.nn.functional as F

import pcl_ext

dev = sys.argv[1]
g = torch.Generator().manual_seed(0)


def unit(n, d, dtype, offset=0):
    t = F.normalize(torch.randn(n, d, generator=g), dim=1).to(dev, dtype)
    if not offset:
        return t
    buf = torch.empty(n * d + offset, device=dev, dtype=dtype)
    return buf[offset:].view(n, d).copy_(t)


for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.float16, False),
                    (torch.bfloat16, False)):
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    for n, d, offset, tiny in ((70, 40, 0, False), (20, 264, 0, False), (9, 64, 1, False),
                               (16, 32, 0, dtype == torch.float16)):
        ks = (50, 130)
        q = unit(n, d, dtype, offset).requires_grad_()
        k, queue = unit(n, d, dtype), unit(90, d, dtype, offset)
        protos = [unit(kk, d, dtype, offset) for kk in ks]
        phi = [0.05 + 0.45 * torch.rand(kk, generator=g).to(dev) for kk in ks]
        assign = [torch.randint(0, kk, (n,), generator=g).to(dev) for kk in ks]
        if tiny:
            for p, a in zip(phi, assign):
                p[a[:2]] = 1e-5
        for negs in (None, [torch.randperm(kk, generator=g)[:17].to(dev) for kk in ks]):
            q.grad = None
            pcl_ext.proto_nce(q, k, queue, protos, phi, assign, negs).backward()
    for n, kk, d, offset, exclude_self in ((70, 600, 40, 0, False), (20, 20, 264, 1, True),
                                           (1, 1, 8, 0, False), (300, 300, 24, 0, True)):
        q, keys = unit(n, d, dtype, offset).requires_grad_(), unit(kk, d, dtype).requires_grad_()
        targets = torch.randint(0, kk, (n,), generator=g)
        if exclude_self:  # never a row's own column
            targets = (torch.arange(n) + torch.randint(1, kk, (n,), generator=g)) % kk
        pcl_ext.info_nce(q, keys, targets.to(dev), temperature=0.2,
                         exclude_self=exclude_self).backward()
        z = unit(2 * n, d, dtype).requires_grad_()  # queries is keys (SimCLR)
        pcl_ext.info_nce(z, z, ((torch.arange(2 * n) + n) % (2 * n)).to(dev), temperature=0.5,
                         exclude_self=True).backward()
for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
    keys = [torch.randn(s, generator=g).to(dev, dtype) for s in ((33, 7), (5,), (1000,))]
    pcl_ext.momentum_update_(keys, [torch.randn_like(t) for t in keys], 0.999)
    queue = pcl_ext.RingQueue(10, 6, dtype=dtype, device=dev)
    for b in (7, 25, 0, 3):
        queue.enqueue_(torch.randn(b, 6, generator=g).to(dev, dtype))
ids = torch.randint(0, 40, (500,), generator=g).to(dev)
pcl_ext.concentration(torch.rand(500, generator=g).to(dev), ids, 40)
pcl_ext.sample_negatives(ids[:30], 40, 5, torch.Generator(dev).manual_seed(0))
if dev == "cuda":
    torch.cuda.synchronize()
print(f"every op ran on {dev}")
EOF

# ------------------------------------------------------------------------------ the steps
echo "# gpu_run.sh $(date -u +%FT%TZ), repository $repo, budget ${budget}s, device $dev" \
  | tee "$out/summary.txt"
{
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --format=csv,noheader --query-gpu=name,driver_version,memory.total,clocks.sm,\
clocks.mem,temperature.gpu,power.draw
  fi
  "$py" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__},"
            f" CUDA {torch.version.cuda}, {torch.get_num_threads()} threads")'
} 2>&1 | sed 's/^/# /' | tee -a "$out/summary.txt"

site=$work/site
installed=0
if [ -n "$wheel" ]; then
  step install 120 "$out/build.log" "$py" -m pip install -q --no-index --no-deps --no-compile \
    --target "$site" "$wheel"
  if [ "$rc" = 0 ] && (cd "$work" && PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$py" -c \
      "import pcl_ext") \
      >> "$out/build.log" 2>&1; then
    installed=1
    record install PASS "$secs" "$(basename "$wheel")"
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
  else
    record install FAIL "$secs" "the wheel did not install or load (build.log): building instead"
  fi
fi
if [ $installed = 0 ]; then
  jobs=${MAX_JOBS:-$(nproc)}
  if step build 420 "$out/build.log" env -C "$repo" MAX_JOBS="$jobs" "$py" setup.py build_ext \
      --inplace; then
    if [ "$rc" = 0 ]; then
      installed=1
      export PYTHONPATH=$repo:$site${PYTHONPATH:+:$PYTHONPATH}
      record build PASS "$secs" \
        "built in ${secs}s, MAX_JOBS=$jobs, TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-default}"
    else
      record build "$(status_of "$rc")" "$secs" "see build.log"
    fi
  fi
fi
if [ $installed = 0 ]; then
  record everything-else SKIP 0 "no pcl_ext to run"
else
  faiss=$(ls "$repo"/.whl/faiss_cpu-*.whl 2>/dev/null | head -1)
  if [ -n "$faiss" ]; then
    step faiss-cpu 120 "$out/build.log" "$py" -m pip install -q --no-index --no-deps \
      --no-compile --target "$site" "$faiss" &&
      record faiss-cpu "$(status_of "$rc")" "$secs" "$(basename "$faiss")"
  fi

  if step check 300 "$out/check.log" "$py" -m pcl_ext.check --device $dev --bench; then
    record check "$(status_of "$rc")" "$secs" \
      "$(grep -o '[0-9]* passed.*skipped' "$out/check.log" | tail -1)"
  fi

  op_tests=()
  for name in proto_nce info_nce momentum queue concentration sample_negatives loss cluster; do
    op_tests+=("$repo/python_tests/test_$name.py")
  done
  if step tests 240 "$out/tests.log" "$py" -m pytest "${op_tests[@]}" -q -k cuda \
      -p no:cacheprovider -rfE --durations=5 --continue-on-collection-errors; then
    record tests "$(status_of "$rc")" "$secs" "$(tail -1 "$out/tests.log" | tr -d '=')"
  fi

  mkdir -p "$work/json"
  bench() {  # NAME LIMIT KIND SCRIPT ARGS...: a benchmark, its JSON kept for results.json
    local name=$1 limit=$2 kind=$3 script=$4
    shift 4
    local json=$work/json/$name.json
    if step "$name" "$limit" "$out/bench.log" "$py" "$repo/benchmarks/$script" "$@" \
        --json "$json"; then
      if [ "$rc" = 0 ]; then
        record "$name" PASS "$secs" "$("$py" "$work/tools.py" key "$kind" "$json" 2>&1)"
      else
        record "$name" "$(status_of "$rc")" "$secs" "see bench.log"
      fi
    fi
  }
  if [ $rehearsal = 1 ]; then
    small=(--shape small --quick)  # the CPU reference of the big shapes takes minutes
    quick=(--quick)
  else
    small=()
    quick=()
  fi
  bench loss-float32 150 loss_speed loss_speed.py --device $dev "${small[@]}"
  bench loss-tf32 150 loss_speed loss_speed.py --device $dev --tf32 "${small[@]}"
  bench loss-bfloat16 150 loss_speed loss_speed.py --device $dev --dtype bfloat16 "${small[@]}"
  if [ -f "$repo/benchmarks/info_nce_speed.py" ]; then
    bench info-nce-float32 120 info_nce_speed info_nce_speed.py --device $dev "${quick[@]}"
    bench info-nce-bfloat16 120 info_nce_speed info_nce_speed.py --device $dev --dtype bfloat16 \
      "${quick[@]}"
  else
    record info-nce SKIP 0 "benchmarks/info_nce_speed.py is not in this checkout"
  fi
  bench momentum 90 momentum_speed momentum_speed.py --device $dev "${quick[@]}"
  bench queue 90 queue_speed queue_speed.py --device $dev "${quick[@]}"
  bench concentration 120 concentration_speed concentration_speed.py --device $dev "${quick[@]}"
  bench sample-negatives 90 sample_negatives_speed sample_negatives_speed.py --device $dev \
    "${quick[@]}"

  # compute-sanitizer: the four tools side by side, each on one run of every op.
  sanitizer=""
  wheels=$("$py" -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
  for cand in "$(command -v compute-sanitizer 2>/dev/null)" \
      "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" \
      "${CUDA_HOME:-/usr/local/cuda}/compute-sanitizer/compute-sanitizer" \
      /usr/local/cuda/bin/compute-sanitizer \
      $(find "$wheels/nvidia" -name compute-sanitizer -type f 2>/dev/null); do
    if [ -n "$cand" ] && [ -x "$cand" ]; then sanitizer=$cand; break; fi
  done
  if [ $rehearsal = 1 ]; then
    if step sanitizer-driver 120 "$out/sanitizer.log" "$py" "$work/cuda_ops_once.py" cpu; then
      record sanitizer-driver "$(status_of "$rc")" "$secs" \
        "$(tail -1 "$out/sanitizer.log") (no sanitizer: CPU rehearsal)"
    fi
  elif [ -z "$sanitizer" ]; then
    record sanitizer SKIP 0 \
      "compute-sanitizer not in PATH, CUDA_HOME, /usr/local/cuda or torch's nvidia packages"
  else
    san() {  # TOOL: one sanitizer run, its own log
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --kill-after=10 "$limit" "$sanitizer" \
        --tool "$1" --error-exitcode 3 --print-limit 30 "$py" "$work/cuda_ops_once.py" cuda \
        > "$work/san-$1.log" 2>&1
      echo $? > "$work/san-$1.rc"
    }
    left=$((budget - SECONDS - 10))
    limit=$((240 * scale))
    limit=$((left < limit ? left : limit))
    if [ "$limit" -lt 20 ]; then
      record sanitizer SKIP 0 "deadline (BUDGET_S=$budget) reached"
    else
      echo "== sanitizer (limit ${limit}s): $sanitizer"
      start=$SECONDS
      tools=(memcheck racecheck initcheck synccheck)
      for tool in "${tools[@]}"; do (cd "$work" && san "$tool") & done
      wait
      for tool in "${tools[@]}"; do
        rc=$(cat "$work/san-$tool.rc")
        { printf '\n== compute-sanitizer --tool %s: exit %s\n' "$tool" "$rc"
          cat "$work/san-$tool.log"; } >> "$out/sanitizer.log"
        errors=$(grep -o 'ERROR SUMMARY: [0-9]* error' "$work/san-$tool.log" | grep -o '[0-9]*' \
          | tail -1)
        record "$tool" "$(status_of "$rc")" "$((SECONDS - start))" \
          "${errors:-?} errors, $(grep -c 'pcl_ext' "$work/san-$tool.log") lines naming pcl_ext"
      done
    fi
  fi

  if (cd "$work" && "$py" -c "import faiss") > /dev/null 2>&1; then
    bench e-step 180 cluster_speed cluster_speed.py --device $dev "${quick[@]}"
  else
    record e-step SKIP 0 "no faiss: put faiss-cpu's wheel in .whl/ (see the top of this script)"
  fi

  if ls "$work"/json/*.json > /dev/null 2>&1; then
    "$py" "$work/tools.py" combine "$out/results.json" "$work"/json/*.json
  fi
fi

{
  printf '\n%-22s %-7s %7s  %s\n' step status seconds "key figure"
  for row in "${rows[@]}"; do
    IFS='|' read -r name status secs key <<< "$row"
    printf '%-22s %-7s %7s  %s\n' "$name" "$status" "$secs" "$key"
  done
  grep '^BENCH' "$out/check.log" 2>/dev/null
  echo "total ${SECONDS}s; logs in $out: $(cd "$out" && ls | tr '\n' ' ')"
} | tee -a "$out/summary.txt"
for row in "${rows[@]}"; do
  case $row in *"|FAIL|"* | *"|TIMEOUT|"*) exit 1 ;; esac
done
