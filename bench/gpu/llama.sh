#!/usr/bin/env bash
# llama.cpp's llama-bench beside kvgpt and HF on the GPU machine (no internet, no Rust, no Node),
# run from the repository root. The source travels as .gpu-llama/llama-src.tar.xz (git-ignored,
# so the call carries it: carry [".gpu-llama"]): llama.cpp as node-llama-cpp@3.21.1 bundles it
# (llama/gitRelease.bundle, 0.4.0-dev), stripped to what builds llama-bench and runs
# convert_hf_to_gguf.py (about 2.6 MB), made here by `bash bench/gpu/llama.sh source`.
#   bash bench/gpu/llama.sh source          (here, with npm and git) makes .gpu-llama/llama-src.tar.xz
#   bash bench/gpu/llama.sh build           builds llama-bench in /tmp/llama.cpp (CUDA, sm_90,
#                                           LLAMA_JOBS jobs, default 16;
#                                           ninja resumes if a call was cut short: run it again),
#                                           then the checkpoint and its GGUFs (model, below)
#   bash bench/gpu/llama.sh model           only /tmp/gpt2-small-random and its f32/f16/q8_0 GGUFs
#   bash bench/gpu/llama.sh bench OUT.json  llama-bench on each GGUF, one JSON, a table
# The checkpoint is GPT-2 small with seeded random weights, made exactly as hf_gpu.py's model_in
# (torch.manual_seed(0), then GPT2LMHeadModel(GPT2Config())), so that kvgpt (which loads
# /tmp/gpt2-small-random), HF and llama.cpp read the same weights; the tokenizer is the real
# GPT-2 one from test/fixtures/gpt2-tokenizer. CUDA graphs are on by default in this llama.cpp
# (llama.cpp's CMakeLists sets GGML_CUDA_GRAPHS ON; GGML_CUDA_DISABLE_GRAPHS=1 at run time would
# turn them off): left on, as any llama.cpp user gets them.
set -uo pipefail
ROOT="$(pwd)"
SRC=/tmp/llama.cpp
BIN="$SRC/build/bin/llama-bench"
CKPT=/tmp/gpt2-small-random
PY="${PYTHON:-python3}"
TYPES="f32 f16 q8_0"
die() { echo "llama.sh: $*" >&2; exit 1; }

# The tarball: llama.cpp's top-level CMake, its libraries (src, common, include, vendor, app),
# ggml with its CPU and CUDA backends only (the others are added only when their GGML_* option
# is on), the tools tools/CMakeLists.txt adds with the server off (their test media left out),
# and the converter with gguf-py.
make_source() {
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent node-llama-cpp@3.21.1 >/dev/null && tar -xzf node-llama-cpp-3.21.1.tgz package/llama/gitRelease.bundle) ||
    die "npm pack node-llama-cpp@3.21.1 failed"
  git -c advice.detachedHead=false clone -q "$tmp/package/llama/gitRelease.bundle" "$tmp/src" || die "cloning the bundle failed"
  mkdir -p "$ROOT/.gpu-llama"
  (cd "$tmp/src" && tar -cJf "$ROOT/.gpu-llama/llama-src.tar.xz" --exclude='tools/mtmd/test*' \
    CMakeLists.txt LICENSE licenses cmake include src common vendor app convert_hf_to_gguf.py conversion \
    gguf-py/gguf gguf-py/pyproject.toml gguf-py/LICENSE gguf-py/README.md \
    ggml/CMakeLists.txt ggml/cmake ggml/include $(cd "$tmp/src" && find ggml/src -maxdepth 1 -type f) ggml/src/ggml-cpu ggml/src/ggml-cuda \
    tools/CMakeLists.txt tools/batched-bench tools/gguf-split tools/imatrix tools/llama-bench tools/completion tools/perplexity \
    tools/quantize tools/tokenize tools/tts tools/mtmd tools/cvector-generator tools/export-lora tools/fit-params tools/results) ||
    die "tar failed"
  rm -rf "$tmp"
  ls -l "$ROOT/.gpu-llama/llama-src.tar.xz"
}

build() {
  if [ -x "$BIN" ]; then echo "llama-bench already built: $BIN"; return 0; fi
  if [ ! -f "$SRC/CMakeLists.txt" ]; then
    [ -f "$ROOT/.gpu-llama/llama-src.tar.xz" ] || die "no .gpu-llama/llama-src.tar.xz (carry it)"
    mkdir -p "$SRC" && tar -xJf "$ROOT/.gpu-llama/llama-src.tar.xz" -C "$SRC" || die "unpack failed"
  fi
  command -v nvcc >/dev/null || export PATH="/usr/local/cuda/bin:$PATH"
  command -v nvcc >/dev/null || die "nvcc not found"
  local t0=$SECONDS
  # APP (the unified `llama` binary, which links the server) and OpenSSL (HTTPS downloads) are not
  # needed by llama-bench; the rest are the flags of the comparison.
  cmake -S "$SRC" -B "$SRC/build" -G Ninja -DCMAKE_BUILD_TYPE=Release \
    -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_COMPILER="$(command -v nvcc)" \
    -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF -DLLAMA_OPENSSL=OFF >"$SRC/configure.log" 2>&1 ||
    { tail -40 "$SRC/configure.log"; die "configure failed ($SRC/configure.log)"; }
  grep -E "compiler identification is NVIDIA|Including CUDA" "$SRC/configure.log"
  grep -E "^GGML_CUDA_(GRAPHS|FA):" "$SRC/build/CMakeCache.txt"
  cmake --build "$SRC/build" --target llama-bench -j "${LLAMA_JOBS:-16}" 2>&1 | grep -v -E "^\[[0-9]+/[0-9]+\] "
  [ -x "$BIN" ] || die "build failed"
  echo "llama-bench built in $((SECONDS - t0)) s"
}

model() {
  if [ ! -f "$CKPT/model.safetensors" ]; then
    "$PY" - "$CKPT" <<'EOF' || die "checkpoint failed"
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
out = sys.argv[1]
torch.manual_seed(0)  # as hf_gpu.py's model_in
GPT2LMHeadModel(GPT2Config()).save_pretrained(out, safe_serialization=True)
cfg = json.load(open(f"{out}/config.json"))
cfg.setdefault("n_ctx", cfg["n_positions"])  # llama.cpp's GPT-2 converter reads n_ctx (transformers 5 no longer writes it)
open(f"{out}/config.json", "w").write(json.dumps(cfg, indent=2) + "\n")
print("checkpoint:", out)
EOF
    cp test/fixtures/gpt2-tokenizer/{vocab.json,merges.txt,tokenizer.json} \
      test/fixtures/tiny-gpt2/tokenizer_config.json "$CKPT/" || die "tokenizer copy failed"
  fi
  for t in $TYPES; do
    [ -f "$CKPT-$t.gguf" ] && continue
    PYTHONPATH="$SRC/gguf-py${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$SRC/convert_hf_to_gguf.py" "$CKPT" \
      --outtype "$t" --outfile "$CKPT-$t.gguf" >"$CKPT-$t.log" 2>&1 ||
      { tail -20 "$CKPT-$t.log"; die "convert $t failed"; }
    ls -l "$CKPT-$t.gguf"
  done
}

bench() {
  local out="${1:-}"
  [ -n "$out" ] || die "usage: llama.sh bench OUT.json"
  [ -x "$BIN" ] || die "no $BIN: run llama.sh build first"
  for t in $TYPES; do
    [ -f "$CKPT-$t.gguf" ] || die "no $CKPT-$t.gguf: run llama.sh build (or model) first"
    # -p 0 -n 128: 128 decode steps timed after -d tokens of context; -r 5 repetitions (plus a
    # warm-up run). The context is depth + 128, and GPT-2 small has 1024 positions, so 896 is the
    # largest depth; a row at depth d averages contexts d..d+127.
    "$BIN" -m "$CKPT-$t.gguf" -ngl 99 -fa 1 -p 0 -n 128 -r 5 -d 16,256,512,896 -o json \
      >"/tmp/llama-bench-$t.json" || die "llama-bench $t failed"
  done
  "$PY" - "$out" "$SRC/build/CMakeCache.txt" $TYPES <<'EOF' || die "merge failed"
import json, re, sys
out, cache, types = sys.argv[1], sys.argv[2], sys.argv[3:]
graphs = re.search(r"^GGML_CUDA_GRAPHS:BOOL=(\w+)", open(cache).read(), re.M)
rows, raw = [], []
for t in types:
    for r in json.load(open(f"/tmp/llama-bench-{t}.json")):
        raw.append(r)
        rows.append({"dtype": t, "depth": r["n_depth"], "nGen": r["n_gen"], "avg_ts": r["avg_ts"],
                     "stddev_ts": r["stddev_ts"], "msPerToken": 1000 / r["avg_ts"]})
first = raw[0]
res = {"tool": "llama.cpp llama-bench", "build_commit": first.get("build_commit"),
       "build_number": first.get("build_number"), "gpu_info": first.get("gpu_info"),
       "backends": first.get("backends"), "cudaGraphs": graphs and graphs.group(1),
       "flags": "-ngl 99 -fa 1 -p 0 -n 128 -r 5 -d 16,256,512,896", "rows": rows, "raw": raw}
json.dump(res, open(out, "w"), indent=2)
depths = sorted({r["depth"] for r in rows})
print(f"llama.cpp on {res['gpu_info']} (CUDA graphs {res['cudaGraphs']}), ms/token (128 decode steps at depth d)")
print("dtype  " + "".join(f"{'d=' + str(d):>16}" for d in depths))
for t in types:
    cells = {r["depth"]: r for r in rows if r["dtype"] == t}
    print(f"{t:<7}" + "".join(f"{cells[d]['msPerToken']:>9.3f} ±{cells[d]['stddev_ts'] / cells[d]['avg_ts'] * 100:>4.1f}%" for d in depths))
print("wrote", out)
EOF
}

case "${1:-}" in
  source) make_source ;;
  build) build && model ;;
  model) model ;;
  bench) bench "${2:-}" ;;
  *) die "usage: llama.sh source | build | model | bench OUT.json" ;;
esac
