#!/usr/bin/env bash
# Issue 13 on a GPU, in one call (payload from bench/gpu/stage.sh with KVGPT_GPU_TESTS="score
# parity"; the text file travels as $PAYLOAD/perplexity-text.txt): the Rust scoring and parity
# suites on CUDA (the device-side gather of log-probabilities), then the perplexity of the
# ~100,000-token text with GPT-2 small's shapes (seeded random weights written here by HF's
# save_pretrained) through the Node API in f32 and f16, and HF's perplexity-guide loop on the
# same GPU and checkpoint in float32 and float16. Results go to $OUT (or ./gpu-out).
set -uo pipefail
. "$(dirname "$0")/setup.sh" score.log

echo "== 1. Rust scoring and parity suites on CUDA"
run_test_binaries

echo "== 2. the checkpoint"
MODEL=/tmp/gpt2-small-random
python3 bench/hf/hf_perplexity.py make-model "$MODEL" 2>&1 | grep -v -i -E "warn|it/s"
TEXT="$PAYLOAD/perplexity-text.txt"

echo "== 3. kvgpt through Node"
cd "$PAYLOAD/repo"
/tmp/node bench/gpu/score.js "$OUT/kvgpt-score-gpu.json" "$MODEL" "$TEXT" 1024,512 f32,f16
cd - >/dev/null

echo "== 4. HF's perplexity-guide loop on the same GPU"
for dtype in float32 float16; do
  for stride in 1024 512; do
    python3 bench/hf/hf_perplexity.py run "$MODEL" "$TEXT" --max-length 1024 --stride $stride --device cuda --dtype $dtype 2>/dev/null | tee -a "$OUT/hf-score-gpu.jsonl"
  done
done
echo "done"
