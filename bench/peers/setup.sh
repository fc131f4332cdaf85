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
#      (tjs_scripts/, vendored; `--modes fp16` and `q8`: of its default modes, the two that
#      transformers.js loads for dtype 'fp16' and 'q8'; its settings for GPT-2: q8 = int8
#      weights per tensor, uint8 activations quantized on the fly, fp16 with float32 inputs and
#      outputs kept), in two exports. The first, with accelerate, makes model.onnx and
#      model_fp16.onnx: accelerate lets optimum keep GPT-2's tied lm_head and token embedding
#      as one tensor (model.onnx 498 MB instead of 652). The second, with accelerate hidden
#      (sys.modules['accelerate'] = None, so transformers and optimum find it unavailable, as
#      if not installed), makes only model_quantized.onnx: that export unties the two, so the
#      lm_head's MatMul reads a weight of its own, which the quantizer makes 8-bit (163 MB); from
#      the tied export the quantizer would leave it f32 (279 MB), its weight coming through a
#      Transpose, and transformers.js's q8 would run the lm_head in f32 (the hub's
#      transformers.js GPT-2 files are said to have the untied, 8-bit form).
#      onnx/model_quantized.form records the form, so that a rerun redoes a model_quantized.onnx
#      made otherwise (e.g. by an older setup.sh). optimum-onnx 0.1.0
#      needs transformers < 4.58, so it runs in a venv of its own, work/venv-onnx
#      (requirements-onnx.txt), which sees KVGPT_HF_PYTHON's site-packages (torch) through a
#      .pth file, so no second torch is downloaded.
# About 4 minutes (the ONNX step 2 of them, about 1 per export) and 4 GB (work/ 2.7 GB, of which
# the ONNX export 0.9 GB and its venv 0.3 GB, the second export 0.8 GB more while it runs;
# node_modules 1.2 GB) on this machine. Rerunning it redoes only what is missing, and a
# model_quantized.onnx whose form it has no record of (the second export alone, about 1 minute).
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
q8_form='8-bit lm_head: exported with accelerate hidden, lm_head and token embedding untied'
# convert NAME PYTHON-ARGS...: transformers.js's conversion of the checkpoint into work/NAME/,
# its output in work/NAME.log.
convert() {
  local out="$1" log="$work/$1.log"
  shift
  if ! (cd "$work" && PYTHONPATH="$here" PYTHONDONTWRITEBYTECODE=1 "$venv/bin/python" "$@" --model_id gpt2-small-random \
      --task text-generation-with-past --quantize --output_parent_dir "$out") > "$log" 2>&1; then
    tail -20 "$log"
    exit 1
  fi
}
if [ ! -f "$onnx/onnx/model.onnx" ] || [ ! -f "$onnx/onnx/model_fp16.onnx" ] || [ ! -f "$onnx/onnx/model_quantized.onnx" ] \
    || [ "$(cat "$onnx/onnx/model_quantized.form" 2>/dev/null)" != "$q8_form" ]; then
  if ! "$venv/bin/python" -c 'import optimum.exporters.onnx, onnxruntime, onnxslim, accelerate' 2>/dev/null; then
    "$python" -m venv "$venv"
    purelib='import sysconfig; print(sysconfig.get_paths()["purelib"])'
    "$python" -c "$purelib" > "$("$venv/bin/python" -c "$purelib")/_kvgpt_hf_python.pth"
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$here/requirements-onnx.txt"
  fi
  if [ ! -f "$onnx/onnx/model.onnx" ] || [ ! -f "$onnx/onnx/model_fp16.onnx" ]; then
    # with accelerate: model.onnx and model_fp16.onnx, the lm_head tied to the embedding
    rm -rf "$work/onnx-export" "$onnx"
    convert onnx-export -m tjs_scripts.convert --modes fp16
    mv "$work/onnx-export/gpt2-small-random" "$onnx"
    rmdir "$work/onnx-export"
  fi
  # without accelerate: model_quantized.onnx alone, the lm_head untied and 8-bit
  rm -rf "$work/onnx-export-q8" "$onnx/onnx/model_quantized.onnx" "$onnx/onnx/model_quantized.form"
  convert onnx-export-q8 -c "import runpy, sys; sys.modules['accelerate'] = None
runpy.run_module('tjs_scripts.convert', run_name='__main__', alter_sys=True)" --modes q8
  if ! grep -q 'Weight deduplication check in the ONNX export requires accelerate' "$work/onnx-export-q8.log"; then
    echo "setup.sh: the q8 export still saw accelerate (see $work/onnx-export-q8.log)" >&2
    exit 1
  fi
  mv "$work/onnx-export-q8/gpt2-small-random/onnx/model_quantized.onnx" "$onnx/onnx/"
  # quantize_config.json: the q8 export's settings (the fp16 export's, but for its modes), both modes
  "$venv/bin/python" -c "import json, sys; c = json.load(open(sys.argv[1])); c['modes'] = ['fp16', 'q8']; json.dump(c, open(sys.argv[2], 'w'), indent=4)" \
    "$work/onnx-export-q8/gpt2-small-random/quantize_config.json" "$onnx/quantize_config.json"
  rm -rf "$work/onnx-export-q8"
  echo "$q8_form" > "$onnx/onnx/model_quantized.form"
fi
ls -la "$work" "$onnx/onnx"
