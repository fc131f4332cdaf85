#!/usr/bin/env bash
# Issue 11 on a GPU, in one call (no Rust, no Node there: bench/gpu/stage.sh packs everything
# into $PAYLOAD, default .gpu): the Rust parity and batching suites on CUDA, batched-vs-solo
# parity and the throughput table through the Node API (throughput.js), batch-1 decode latency
# in f16 (speed.js), then HF transformers' batched generate on the same GPU (hf_throughput.py).
# Results go to $OUT (or ./gpu-out).
set -uo pipefail
PAYLOAD="$(cd "${PAYLOAD:-.gpu}" && pwd)"
FIXTURES="$(pwd)/test/fixtures"
OUT="${OUT:-$(pwd)/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/batch.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
xz -dc "$PAYLOAD/node.xz" > /tmp/node && chmod +x /tmp/node
for f in "$PAYLOAD"/*.node.xz "$PAYLOAD"/tests/*.xz; do xz -dkf "$f"; chmod +x "${f%.xz}"; done

echo "== 1. Rust parity and batching suites on CUDA"
for t in $(ls "$PAYLOAD/tests" | grep -v '\.xz$'); do
  KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES="$FIXTURES" timeout 240 "$PAYLOAD/tests/$t" --test-threads 1 2>&1 |
    grep -v -E '^ +[0-9]+: |^ +at '
done

echo "== 2. kvgpt through Node: batched parity, throughput, batch-1 latency"
cd "$PAYLOAD/repo"
export KVGPT_CUDA_BINARY="$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node"
# The CPU build when it travelled (as in a real install), else the CUDA build serves 'cpu' too.
CPU_ADDON="$PAYLOAD/kvgpt.linux-x64-gnu.node"
[ -f "$CPU_ADDON" ] || CPU_ADDON="$KVGPT_CUDA_BINARY"
export NAPI_RS_NATIVE_LIBRARY_PATH="$CPU_ADDON"
KVGPT_FIXTURES="$FIXTURES" /tmp/node bench/gpu/throughput.js "$OUT/kvgpt-throughput-gpu.json"
if [ "${KVGPT_SPEED:-1}" != 0 ]; then
  KVGPT_FIXTURES="$FIXTURES" KVGPT_BENCH_DTYPES=f16 /tmp/node bench/gpu/speed.js "$OUT/kvgpt-speed-gpu.json" 2>&1 | grep -v "^parity"
fi

echo "== 3. HF transformers' batched generate on the same GPU"
cd - >/dev/null
PYTHONUNBUFFERED=1 python3 "$PAYLOAD/repo/bench/gpu/hf_throughput.py" "$OUT/hf-throughput-gpu.json" 2>&1 | grep -v -i warn
echo "done"
