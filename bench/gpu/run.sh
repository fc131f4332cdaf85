#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, no Rust and no Node: everything it
# runs was built elsewhere and travels in $PAYLOAD (default .gpu), made by bench/gpu/stage.sh:
#   node.xz                            a Node binary
#   kvgpt.linux-x64-gnu.cuda.node.xz   the CUDA build of the addon (scripts/build-cuda.sh)
#   kvgpt.linux-x64-gnu.node.xz        the CPU build (loaded first, as in a real install)
#   repo/                              dist/, index.js, bench/gpu/*, package.json
#   tests/parity.xz                   the Rust parity test binary built with --features cuda
# Results go to $OUT (or ./gpu-out): kvgpt-gpu.json, hf-gpu.json, logs.
set -uo pipefail
PAYLOAD="$(cd "${PAYLOAD:-.gpu}" && pwd)"
FIXTURES="$(pwd)/test/fixtures"
OUT="${OUT:-$(pwd)/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/run.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
# CUDA 13 libraries: the toolkit's and the ones torch ships (pip's nvidia/cu13/lib).
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
xz -dc "$PAYLOAD/node.xz" > /tmp/node && chmod +x /tmp/node
for f in "$PAYLOAD"/*.node.xz "$PAYLOAD"/tests/*.xz; do xz -dk "$f"; chmod +x "${f%.xz}"; done
/tmp/node --version

echo "== 1. Rust parity suite on CUDA (f32 logits within 1e-3; f16/bf16/q8_0 greedy ids)"
for t in parity; do
  KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES="$FIXTURES" "$PAYLOAD/tests/$t" --test-threads 1 --nocapture 2>&1 |
    grep -v -E '^ +[0-9]+: |^ +at ' # all of it but backtrace frames
done

echo "== 2. kvgpt through Node: device selection, parity by argmax, decode latency"
cd "$PAYLOAD/repo"
export KVGPT_CUDA_BINARY="$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node"
export NAPI_RS_NATIVE_LIBRARY_PATH="$PAYLOAD/kvgpt.linux-x64-gnu.node"
/tmp/node -e "
const { Gpt2 } = require('./dist');
(async () => {
  for (const device of ['auto', 'cuda', 'cpu']) {
    const m = await Gpt2.random({ n_layer: 2 }, { device });
    console.log('device', device, '->', m.info.device, m.info.dtype);
  }
})().catch((e) => { console.error('device check failed:', e.code, e.message); process.exit(1); });
"
KVGPT_FIXTURES="$FIXTURES" /tmp/node bench/gpu/speed.js "$OUT/kvgpt-gpu.json"

echo "== 3. HF transformers on the same GPU"
cd - >/dev/null
PYTHONUNBUFFERED=1 python3 "$PAYLOAD/repo/bench/gpu/hf_gpu.py" "$OUT/hf-gpu.json" 2>&1 | grep -v -i warn
echo "done"
