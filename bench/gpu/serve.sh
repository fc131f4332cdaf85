#!/usr/bin/env bash
# Issue 14's load figures on a GPU, in one call: bench/serve-load.bench.js (HTTP through
# `kvgpt serve` against the library, 1/8/32/128 streaming clients) with GPT-2 small's shapes in
# f16 on CUDA. The payload ($PAYLOAD, default .gpu) carries node.xz, the CUDA addon
# (kvgpt.linux-x64-gnu.cuda.node.xz), repo/ (dist/, index.js, package.json,
# bench/serve-load.bench.js) and node_modules.tar.xz (fastify and prom-client with their
# dependencies, the server's only runtime packages). Results go to $OUT (or ./gpu-out);
# KVGPT_SERVE_PROFILE=1 adds a profiled run at 128 clients.
set -uo pipefail
PAYLOAD="$(cd "${PAYLOAD:-.gpu}" && pwd)"
OUT="${OUT:-$(pwd)/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/serve.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
xz -dc "$PAYLOAD/node.xz" > /tmp/node && chmod +x /tmp/node
xz -dkf "$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node.xz"
export KVGPT_CUDA_BINARY="$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node" NAPI_RS_NATIVE_LIBRARY_PATH="$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node"
cd "$PAYLOAD/repo" && tar -xJf ../node_modules.tar.xz
export KVGPT_BENCH_DEVICE=cuda KVGPT_BENCH_DTYPE=f16
KVGPT_RESULTS="$OUT" KVGPT_LOAD_REQUESTS="${KVGPT_LOAD_REQUESTS:-16}" /tmp/node bench/serve-load.bench.js
# Then the server's process profiled (--cpu-prof) at the top level, to say where its thread's time goes.
if [ -n "${KVGPT_SERVE_PROFILE:-}" ]; then
  KVGPT_RESULTS="$OUT/profiled" KVGPT_LOAD_LEVELS=128 KVGPT_LOAD_REQUESTS=8 /tmp/node --cpu-prof --cpu-prof-dir="$OUT/profiled" bench/serve-load.bench.js
  xz -9 "$OUT"/profiled/*.cpuprofile
fi
echo done
