#!/usr/bin/env bash
# Issue 11 on a GPU, in one call (no Rust, no Node there: bench/gpu/stage.sh packs everything
# into $PAYLOAD, default .gpu; setup.sh unpacks it): the Rust test binaries that travelled
# (parity, batch) on CUDA, batched-vs-solo parity and the throughput table through the Node
# API (throughput.js), batch-1 decode latency in f16 (speed.js; KVGPT_SPEED=0 skips it), then
# HF transformers' batched generate on the same GPU (hf_throughput.py). Results go to $OUT (or
# ./gpu-out).
set -uo pipefail
. "$(dirname "$0")/setup.sh" batch.log

echo "== 1. Rust parity and batching suites on CUDA"
run_test_binaries

echo "== 2. kvgpt through Node: batched parity, throughput, batch-1 latency"
cd "$PAYLOAD/repo"
KVGPT_FIXTURES="$FIXTURES" /tmp/node bench/gpu/throughput.js "$OUT/kvgpt-throughput-gpu.json"
if [ "${KVGPT_SPEED:-1}" != 0 ]; then
  KVGPT_FIXTURES="$FIXTURES" KVGPT_BENCH_DTYPES=f16 /tmp/node bench/gpu/speed.js "$OUT/kvgpt-speed-gpu.json" 2>&1 | grep -v "^parity"
fi

echo "== 3. HF transformers' batched generate on the same GPU"
cd - >/dev/null
PYTHONUNBUFFERED=1 python3 "$PAYLOAD/repo/bench/gpu/hf_throughput.py" "$OUT/hf-throughput-gpu.json" 2>&1 | grep -v -i warn
echo "done"
