#!/usr/bin/env bash
# One-time setup of `npm run bench -- vs-peers` (issue 15), into bench/peers/work/ (git-ignored):
#   1. the peers themselves: `npm install` here (node-llama-cpp 3.21.1, pinned: newer ones may
#      not install on this machine; @huggingface/transformers 4.3.2, i.e. transformers.js, with
#      onnxruntime-node 1.30.0, whose install script would fetch a CUDA add-on from a host that
#      may be unreachable: ONNXRUNTIME_NODE_INSTALL=skip, its CPU binary is in the package),
#      apart from kvgpt's own dependencies;
#   2. one checkpoint for every engine: GPT-2 small's config with seeded random weights in HF's
#      layout (bench/hf/hf_perplexity.py make-model; needs KVGPT_HF_PYTHON, default
#      .venv-hf/bin/python with torch and transformers, as the README's Benchmarks section makes
#      it), plus `n_ctx` in its config.json, which llama.cpp's GPT-2 converter reads and
#      transformers 5 no longer writes;
#   3. its GGUF files for node-llama-cpp, f32, f16 and q8_0, made by llama.cpp's own converter
#      (convert_hf_to_gguf.py, from the llama.cpp source node-llama-cpp ships as
#      llama/gitRelease.bundle; it runs in the same Python);
#   4. its ONNX export for transformers.js, work/gpt2-small-random-onnx/: onnx/model.onnx with
#      past key values (optimum's text-generation-with-past export), onnx/model_fp16.onnx and
#      the 8-bit onnx/model_quantized.onnx, made by transformers.js's own conversion script
#      (tjs_scripts/, vendored; `--modes fp16 q8`: of its default modes, the two that
#      transformers.js loads for dtype 'fp16' and 'q8'; its settings for GPT-2: q8 = int8
#      weights per tensor, uint8 activations quantized on the fly, fp16 with float32 inputs and
#      outputs kept). In model_quantized.onnx the lm_head stays f32: it is tied to the token
#      embedding, so its MatMul reads a Transpose of it, which the quantizer leaves alone (as in
#      transformers.js's own conversions, where accelerate lets optimum keep tied weights
#      as one). optimum-onnx 0.1.0 needs
#      transformers < 4.58, so it runs in a venv of its own, work/venv-onnx
#      (requirements-onnx.txt), which sees KVGPT_HF_PYTHON's site-packages (torch) through a
#      .pth file, so no second torch is downloaded.
# About 3 minutes (the ONNX step 1.5 of them) and 4 GB (work/ 2.8 GB, of which the ONNX export
# 1.0 GB and its venv 0.3 GB; node_modules 1.2 GB) on this machine. Rerunning it
# redoes only what is missing.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
work="$here/work"
python="${KVGPT_HF_PYTHON:-$root/.venv-hf/bin/python}"
mkdir -p "$work"
if [ ! -d "$here/node_modules/node-llama-cpp" ] || [ ! -d "$here/node_modules/@huggingface/transformers" ]; then
  (cd "$here" && ONNXRUNTIME_NODE_INSTALL=skip npm install --no-audit --no-fund --loglevel=error)
fi
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
onnx="$work/gpt2-small-random-onnx"
venv="$work/venv-onnx"
if [ ! -f "$onnx/onnx/model.onnx" ] || [ ! -f "$onnx/onnx/model_fp16.onnx" ] || [ ! -f "$onnx/onnx/model_quantized.onnx" ]; then
  if ! "$venv/bin/python" -c 'import optimum.exporters.onnx, onnxruntime, onnxslim, accelerate' 2>/dev/null; then
    "$python" -m venv "$venv"
    purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
    "$python" -c "$purelib" > "$("$venv/bin/python" -c "$purelib")/_kvgpt_hf_python.pth"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-onnx.txt"
  fi
  rm -rf "$work/onnx-export" "$onnx"
  if ! (cd "$work" && PYTHONPATH="$here" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" -m tjs_scripts.convert --model_id gpt2-small-random \
      --task text-generation-with-past --quantize --modes fp16 q8 --output_parent_dir onnx-export) > "$work/onnx-export.log" 2>&1; then
    tail -20 "$work/onnx-export.log"
    exit 1
  fi
  mv "$work/onnx-export/gpt2-small-random" "$onnx"
  rmdir "$work/onnx-export"
fi
ls -la "$work" "$onnx/onnx"
