#!/usr/bin/env bash
# The GPU check, in one call on a machine with an NVIDIA GPU, no Rust and no Node: everything it
# runs was built elsewhere and travels in $PAYLOAD (default .gpu), made by bench/gpu/stage.sh
# (setup.sh lists it). Results go to $OUT (or ./gpu-out): kvgpt-gpu.json, hf-gpu.json, logs.
set -uo pipefail
. "$(dirname "$0")/setup.sh" run.log

echo "== 1. Rust parity suite on CUDA (f32 logits within 1e-3; f16/bf16/q8_0 greedy ids)"
for t in parity; do
  KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES="$FIXTURES" "$PAYLOAD/tests/$t" --test-threads 1 --nocapture 2>&1 |
    grep -v -E '^ +[0-9]+: |^ +at ' # all of it but backtrace frames
done

echo "== 2. kvgpt through Node: device selection, parity by argmax, decode latency"
cd "$PAYLOAD/repo"
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
