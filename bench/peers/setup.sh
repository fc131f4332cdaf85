#!/usr/bin/env bash
# One-time setup of `npm run bench -- vs-peers` (issue 15), into bench/peers/work/ (git-ignored):
#   1. the peers themselves: `npm install` here (node-llama-cpp 3.21.1, pinned: newer ones may
#      not install on this machine), apart from kvgpt's own dependencies;
#   2. one checkpoint for every engine: GPT-2 small's config with seeded random weights in HF's
#      layout (bench/hf/hf_perplexity.py make-model; needs KVGPT_HF_PYTHON, default
#      .venv-hf/bin/python with torch and transformers, as the README's Benchmarks section makes
#      it), plus `n_ctx` in its config.json, which llama.cpp's GPT-2 converter reads and
#      transformers 5 no longer writes;
#   3. its GGUF files for node-llama-cpp, f32, f16 and q8_0, made by llama.cpp's own converter
#      (convert_hf_to_gguf.py, from the llama.cpp source node-llama-cpp ships as
#      llama/gitRelease.bundle; it runs in the same Python).
# About 2 minutes and 900 MB. Rerunning it redoes only what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work="$here/work"
python="${KVGPT_HF_PYTHON:-$root/.venv-hf/bin/python}"
mkdir -p "$work"
[ -d "$here/node_modules/node-llama-cpp" ] || (cd "$here" && npm install --no-audit --no-fund --loglevel=error)
model="$work/gpt2-small-random"
if [ ! -f "$model/model.safetensors" ]; then
  "$python" "$root/bench/hf/hf_perplexity.py" make-model "$model"
  "$python" -c "import json, sys; f = sys.argv[1]; c = json.load(open(f)); c['n_ctx'] = c['n_positions']; json.dump(c, open(f, 'w'), indent=2)" "$model/config.json"
fi
[ -d "$work/llama.cpp" ] || git clone -q "$here/node_modules/node-llama-cpp/llama/gitRelease.bundle" "$work/llama.cpp"
for t in f32 f16 q8_0; do
  out="$work/gpt2-small-random-$t.gguf"
  [ -f "$out" ] || "$python" "$work/llama.cpp/convert_hf_to_gguf.py" "$model" --outtype "$t" --outfile "$out" 2>&1 | tail -1
done
ls -la "$work"
