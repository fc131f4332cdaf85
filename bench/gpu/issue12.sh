#!/usr/bin/env bash
# Issue 12 on the H200 (no Rust, no Node there), in two calls to one warm machine, from the
# repository root; results go to $OUT (or ./gpu-out).
#
#   bash bench/gpu/issue12.sh check   carry [".gpu-tests", ".gpu-llama"]: starts building
#       llama.cpp's llama-bench in the background (its own session, so it outlives the call on
#       the warm machine; bench/gpu/llama.sh), runs the Rust parity and batching suites on CUDA
#       (the batching suite holds the decode-step test: graph = plain kernels bit for bit, both
#       within each dtype's bound of candle's ops, with each path's step time), then waits for
#       the build and makes the checkpoint and its GGUFs.
#   bash bench/gpu/issue12.sh bench   carry [".gpu", ".gpu-llama"]: one after another, nothing
#       else running: kvgpt's decode per token through each path and dtype (step.js, on the
#       checkpoint llama.sh made, which HF and llama.cpp read too), the batching table
#       (throughput.js), HF's static cache (hf_gpu.py, HF_PARTS=static), llama-bench (built
#       here first if the machine came back cold), then the kernels a decode step runs (ncu,
#       counted; last, as it is the slowest and least needed).
#   bash bench/gpu/issue12.sh profile carry [".gpu"]: Nsight Compute's duration of every kernel
#       of 12-token f16 generations through the graph from prompts of 8 and 600 tokens
#       (ncu-graph-f16-ctx*.csv; docs/bench/issue12/ncu-summary.txt is one replayed step of each).
#   bash bench/gpu/issue12.sh all     carry [".gpu", ".gpu-llama"]: `bench` in one call from a cold
#       machine (when two back to back cannot be had): llama.cpp builds in the background on cores
#       4-15 while kvgpt's parts (step.js, throughput.js) run pinned to cores 0-3, then HF's static
#       cache and llama-bench run alone once the build is done. No ncu count (the `steps` call
#       counts the kernels of a step) and no Rust suites (`check` or `steps` run them).
#   bash bench/gpu/issue12.sh steps   carry [".gpu-tests"]: the decode-step tests alone (every
#       path's step time on GPT-2 small), then Nsight Compute's duration of every kernel of one
#       replayed step at contexts 8 and 1000, from the test binary (ncu-step-ctx*.csv).
#
# The two payloads are split because a call carries 64 MiB with the repository (28 MB): the
# test binaries (16 MB) and Node with the addon (about 30 MB) do not fit together. Made by
#   KVGPT_GPU_TESTS="parity batch" KVGPT_STAGE_CPU_ADDON=0 bash bench/gpu/stage.sh
#   mv .gpu/tests .gpu-tests && bash bench/gpu/llama.sh source   # .gpu-llama/llama-src.tar.xz
set -uo pipefail
ROOT="$(pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
export PATH="/usr/local/cuda/bin:$PATH"

check() {
  exec > >(tee "$OUT/check.log") 2>&1
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  LLAMA_JOBS=12 setsid nohup bash bench/gpu/llama.sh build > /tmp/llama-build.log 2>&1 < /dev/null &
  echo "== Rust parity and batching suites on CUDA"
  for f in .gpu-tests/*.xz; do xz -dkf "$f"; chmod +x "${f%.xz}"; done
  for t in parity batch; do
    KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES="$ROOT/test/fixtures" timeout 300 ".gpu-tests/$t" --test-threads 1 --nocapture 2>&1 |
      grep -v -E '^ +[0-9]+: |^ +at '
  done
  echo "== waiting for llama.cpp's build (at most until 560 s into the call)"
  while pgrep -f "llama.sh build" >/dev/null && [ "$SECONDS" -lt 560 ]; do sleep 3; done
  tail -15 /tmp/llama-build.log
  cp /tmp/llama-build.log "$OUT/" 2>/dev/null
}

bench() {
  . "$ROOT/bench/gpu/setup.sh" issue12.log
  local cold=0
  [ -x /tmp/llama.cpp/build/bin/llama-bench ] || { cold=1; echo "llama-bench not here (a fresh machine): built last"; }
  bash "$ROOT/bench/gpu/llama.sh" model || return 1
  cd "$PAYLOAD/repo"
  echo "== 1. kvgpt: decode per token through each path (graph, kernels, candle), batch 1, and 1-8 at once"
  KVGPT_BENCH_MODEL=/tmp/gpt2-small-random /tmp/node bench/gpu/step.js "$OUT/kvgpt-step.json"
  echo "== 2. kvgpt's batching table, f16"
  KVGPT_FIXTURES="$FIXTURES" /tmp/node bench/gpu/throughput.js "$OUT/kvgpt-throughput.json"
  cd "$ROOT"
  echo "== 3. HF transformers, static cache"
  HF_PARTS=static PYTHONUNBUFFERED=1 python3 bench/gpu/hf_gpu.py "$OUT/hf-static.json" 2>&1 | grep -v -i warn
  echo "== 4. llama.cpp llama-bench"
  [ "$cold" = 0 ] || bash bench/gpu/llama.sh build
  bash bench/gpu/llama.sh bench "$OUT/llama.json"
  cd "$PAYLOAD/repo"
  echo "== 5. kernels a decode step runs (ncu: a 12-token run less a 2-token one, over 10 steps), f16"
  for mode in graph candle; do
    for n in 2 12; do
      KVGPT_STEP_ONLY=launches KVGPT_BENCH_MODES=$mode KVGPT_LAUNCH_TOKENS=$n timeout 60 \
        ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "/tmp/ncu-$mode-$n.csv" \
        /tmp/node bench/gpu/step.js /dev/null > /dev/null 2>&1
      echo "$mode $n: $(grep -c '"gpu__time_duration.sum"' "/tmp/ncu-$mode-$n.csv" 2>/dev/null) kernels"
    done
  done | tee "$OUT/launches.txt"
  cd "$ROOT"
  echo "done"
}

profile() {
  . "$ROOT/bench/gpu/setup.sh" profile.log
  cd "$PAYLOAD/repo"
  for ctx in 8 600; do
    KVGPT_STEP_ONLY=launches KVGPT_BENCH_MODES=graph KVGPT_LAUNCH_TOKENS=12 KVGPT_LAUNCH_CONTEXT=$ctx timeout 100 \
      ncu --clock-control none --metrics gpu__time_duration.sum --csv --log-file "$OUT/ncu-graph-f16-ctx$ctx.csv" \
      /tmp/node bench/gpu/step.js /dev/null > /dev/null 2>&1
    echo "context $ctx: $(grep -c gpu__time_duration "$OUT/ncu-graph-f16-ctx$ctx.csv") kernels profiled"
  done
}

# pin CORES CMD...: CMD on those cores (where taskset exists)
pin() {
  local cores=$1
  shift
  if command -v taskset >/dev/null; then taskset -c "$cores" "$@"; else "$@"; fi
}

all() {
  . "$ROOT/bench/gpu/setup.sh" issue12.log
  local src=/tmp/llama.cpp
  mkdir -p "$src" && tar -xJf "$ROOT/.gpu-llama/llama-src.tar.xz" -C "$src" || return 1
  LLAMA_JOBS=12 setsid nohup bash -c "$(declare -f pin); pin 4-15 bash bench/gpu/llama.sh build" > /tmp/llama-build.log 2>&1 < /dev/null &
  echo "== 0. the checkpoint and its GGUFs (cores 0-3; llama.cpp builds on 4-15)"
  pin 0-3 bash "$ROOT/bench/gpu/llama.sh" model || return 1
  cd "$PAYLOAD/repo"
  echo "== 1. kvgpt: decode per token through each path, batch 1, and 1-8 at once (cores 0-3)"
  KVGPT_BENCH_MODEL=/tmp/gpt2-small-random pin 0-3 /tmp/node bench/gpu/step.js "$OUT/kvgpt-step.json"
  echo "== 2. kvgpt's batching table, f16 (cores 0-3)"
  KVGPT_FIXTURES="$FIXTURES" pin 0-3 /tmp/node bench/gpu/throughput.js "$OUT/kvgpt-throughput.json"
  cd "$ROOT"
  echo "== waiting for llama.cpp's build ($SECONDS s into the call)"
  while pgrep -f "llama.sh build" >/dev/null && [ "$SECONDS" -lt 480 ]; do sleep 3; done
  tail -4 /tmp/llama-build.log
  echo "== 3. llama.cpp llama-bench ($SECONDS s)"
  bash bench/gpu/llama.sh bench "$OUT/llama.json"
  echo "== 4. HF transformers, static cache ($SECONDS s)"
  HF_PARTS=static PYTHONUNBUFFERED=1 python3 bench/gpu/hf_gpu.py "$OUT/hf-static.json" 2>&1 | grep -v -i warn
  echo "done ($SECONDS s)"
}

steps() {
  exec > >(tee "$OUT/steps.log") 2>&1
  for f in .gpu-tests/*.xz; do xz -dkf "$f"; chmod +x "${f%.xz}"; done
  local t=".gpu-tests/batch" env="KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES=$ROOT/test/fixtures"
  env $env timeout 200 $t cuda_decode_step --test-threads 1 --nocapture 2>&1 | grep -v -E '^ +[0-9]+: |^ +at '
  # cuda_decode_step_gpt2_small's kernels before its third step's graph at contexts 8 and 1000
  # (its doc comment: 315 in a context's first step, 189 in each next, 20 steps a context; the
  # graph splitting the keys is captured at 600 already, so 1000's first step runs 189).
  for cs in 8:504 1000:8190; do
    env $env timeout 200 ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      -k 'regex:^(gemv_|attend_decode|embed_|argmax_ids)' --launch-skip "${cs#*:}" --launch-count 63 \
      --log-file "$OUT/ncu-step-ctx${cs%:*}.csv" $t cuda_decode_step_gpt2_small --test-threads 1 > /dev/null 2>&1
    python3 - "$OUT/ncu-step-ctx${cs%:*}.csv" "${cs%:*}" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10 and r[-3] == "gpu__time_duration.sum"]
head = next(r for r in csv.reader(open(sys.argv[1])) if "Kernel Name" in r)
k = head.index("Kernel Name")
tot = collections.defaultdict(list)
for r in rows:
    v = float(r[-1].replace(",", "")); unit = r[-2]
    tot[r[k].split("(")[0]].append(v / 1000 if unit in ("ns", "nsecond") else v)
print(f"context {sys.argv[2]}: {sum(len(v) for v in tot.values())} kernels, {sum(sum(v) for v in tot.values()):.1f} us")
for name, v in sorted(tot.items(), key=lambda kv: -sum(kv[1])):
    print(f"  {name:28s} {len(v):3d} x {sum(v)/len(v):7.2f} us (min {min(v):.2f}, max {max(v):.2f}) = {sum(v):7.1f} us")
PY
  done
}

case "${1:-}" in
  check) check ;;
  bench) bench ;;
  profile) profile ;;
  steps) steps ;;
  all) all ;;
  *) echo "usage: issue12.sh check | bench | profile | steps | all" >&2; exit 2 ;;
esac
