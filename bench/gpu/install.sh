#!/usr/bin/env bash
# Issue 17 on a GPU machine: kvgpt installed as a user installs it, from the tarballs a release
# publishes (main, kvgpt-linux-x64-gnu, kvgpt-linux-x64-gnu-cuda), with npm, into an empty
# project outside the source tree, no KVGPT_CUDA_BINARY and nothing built there. Then
# device 'cuda' generates HF's reference ids for every prompt of both tiny fixtures, 'auto'
# picks CUDA, the first load's PTX compile (cold driver cache) is timed, and decode speed is
# measured through the installed package beside a build for sm_90 alone ($CUDA90, optional).
#
# The GPU machine has no Node: two calls carry it (the working tree and its carry must fit
# 64 MiB). The first carries $NPM_PAYLOAD (default .gpu-npm: node.xz, npm.tar.xz, and
# npm-cache.tar.xz, an npm cache holding kvgpt's dependencies, made by stage-install.sh) and
# runs `bash bench/gpu/install.sh unpack`; the second, while that machine is warm, carries
# $PKG_PAYLOAD (default .gpu-pkg: the three .tgz files, and kvgpt.cuda90.node.xz) and runs
# `bash bench/gpu/install.sh`. CUDA 13's libraries come from the machine (pip's nvidia/cu13/lib
# beside torch, /usr/local/cuda/lib64) on LD_LIBRARY_PATH, as the package's README asks.
set -uo pipefail
ROOT=$(pwd)
NPM_PAYLOAD="$(cd "${NPM_PAYLOAD:-.gpu-npm}" && pwd)"
N="$NPM_PAYLOAD/root"
if [ "${1:-}" = unpack ]; then
  mkdir -p "$N/bin"
  xz -dc "$NPM_PAYLOAD/node.xz" > "$N/bin/node" && chmod +x "$N/bin/node"
  tar -C "$N" -xJf "$NPM_PAYLOAD/npm.tar.xz"
  tar -C "$N" -xJf "$NPM_PAYLOAD/npm-cache.tar.xz"
  "$N/bin/node" --version && du -sh "$N"/*
  exit 0
fi
PKG_PAYLOAD="$(cd "${PKG_PAYLOAD:-.gpu-pkg}" && pwd)"
OUT="${OUT:-$ROOT/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/install.log") 2>&1
nvidia-smi --query-gpu=name,driver_version,compute_cap --format=csv
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
export PATH="$N/bin:$PATH"
unset KVGPT_CUDA_BINARY NAPI_RS_NATIVE_LIBRARY_PATH
npm() { node "$N/npm/bin/npm-cli.js" "$@"; }

app=$(mktemp -d)/app
mkdir -p "$app" && cd "$app"
cp -r "$ROOT/test/fixtures/tiny-gpt2" "$ROOT/test/fixtures/tiny-gpt2-zh" .
npm init -y >/dev/null
t0=$(date +%s%N)
npm install --offline --cache "$N/cache" --no-audit --no-fund --loglevel=error "$PKG_PAYLOAD"/kvgpt-*.tgz || exit 1
echo "npm install: $(( ($(date +%s%N) - t0) / 1000000 )) ms; node_modules/kvgpt-linux-x64-gnu-cuda: $(du -sh node_modules/kvgpt-linux-x64-gnu-cuda | cut -f1)"
ls node_modules | grep kvgpt
test ! -e node_modules/kvgpt/src && test ! -e node_modules/kvgpt/crates && echo "no sources in the install"

cat > check.js <<'JS'
const { Gpt2 } = require('kvgpt');
const fs = require('fs');
(async () => {
  const t0 = performance.now();
  const cuda = await Gpt2.load('./tiny-gpt2', { device: 'cuda' });
  const loadMs = performance.now() - t0;
  const t1 = performance.now();
  await cuda.generate([1, 2, 3], { maxNewTokens: 2, ignoreEos: true });
  console.log(`${process.argv[2]} driver cache: load ${loadMs.toFixed(0)} ms, first generation ${(performance.now() - t1).toFixed(0)} ms, device ${cuda.info.device}`);
  cuda.dispose();
  if (process.argv[2] !== 'cold') return;
  // q8_0's kernels are machine code for the build's GPU: elsewhere 'cuda' refuses it, 'auto' takes the CPU.
  const q8 = await Gpt2.load('./tiny-gpt2', { device: 'cuda', dtype: 'q8_0' }).then((m) => `loaded on ${m.info.device}`, (e) => `${e.code}: ${e.message}`);
  const q8auto = await Gpt2.load('./tiny-gpt2', { device: 'auto', dtype: 'q8_0' });
  console.log(`q8_0 'cuda': ${q8}\nq8_0 'auto': ${q8auto.info.device}`);
  for (const name of ['tiny-gpt2', 'tiny-gpt2-zh']) {
    const ref = JSON.parse(fs.readFileSync(`./${name}/reference.json`, 'utf8'));
    for (const device of ['cuda', 'auto']) {
      const model = await Gpt2.load(`./${name}`, { device });
      let equal = 0;
      for (const p of ref.prompts) {
        const g = await model.generate(p.input_ids, { maxNewTokens: ref.n_new, ignoreEos: true });
        if (JSON.stringify(g.tokens) === JSON.stringify(p.greedy_new_ids)) equal++;
      }
      console.log(`${name} device '${device}' ran on ${model.info.device}: greedy ids equal HF's for ${equal} of ${ref.prompts.length} prompts (${ref.n_new} steps each)`);
      if (model.info.device !== 'cuda' || equal !== ref.prompts.length) process.exitCode = 1;
      model.dispose();
    }
  }
})().catch((e) => { console.error(e); process.exit(1); });
JS
export CUDA_CACHE_PATH=$(mktemp -d)   # the driver's PTX cache, empty: the first load compiles
node check.js cold || { echo "FAILED"; exit 1; }
node check.js warm

# Decode speed through the installed package (PTX for compute 8.0, compiled by the driver for
# this GPU) and, when it travelled, a build for compute 9.0 (KVGPT_CUDA_BINARY).
export KVGPT_DIST="$app/node_modules/kvgpt/dist" KVGPT_FIXTURES="$ROOT/test/fixtures" KVGPT_BENCH_DTYPES=f32,f16,bf16,q8_0 KVGPT_ARTICLE_DTYPES=
cd "$ROOT/bench/gpu"
node speed.js "$OUT/speed-package-sm80.json"
if [ -f "$PKG_PAYLOAD/kvgpt.cuda90.node.xz" ]; then
  xz -dkf "$PKG_PAYLOAD/kvgpt.cuda90.node.xz"
  KVGPT_CUDA_BINARY="$PKG_PAYLOAD/kvgpt.cuda90.node" node speed.js "$OUT/speed-sm90.json"
fi
echo done
