#!/usr/bin/env bash
# Proves the install as a user gets it: packs kvgpt, its linux-x64-gnu platform package and the
# CUDA package (kvgpt-linux-x64-gnu-cuda) into tarballs, installs them into an empty project with
# no cargo/rustc on PATH and no access to the sources, then generates from the tiny fixture with a
# plain Node script and with `npx kvgpt`, and checks the ids against HF's reference; and shows
# that on this machine (no GPU, no driver) the CUDA package breaks nothing: 'auto' runs on the
# CPU, 'cuda' is the typed error naming the missing driver. Needs `npm run build` first.
# The tarballs come from scripts/pack.sh (the CUDA package there is a stand-in unless
# KVGPT_CUDA_PACKAGE_BINARY names a real build).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
platform=linux-x64-gnu
version=$(node -p "require('$root/package.json').version")
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
bash "$root/scripts/pack.sh" "$work"

mkdir -p "$work/app" "$work/bin"
cp -r "$root/test/fixtures/tiny-gpt2" "$work/app/model"
for tool in node npm npx; do ln -s "$(command -v $tool)" "$work/bin/$tool"; done
export PATH="$work/bin:/usr/bin:/bin"
if command -v cargo >/dev/null 2>&1 || command -v rustc >/dev/null 2>&1; then
  echo "pack-install-test: cargo or rustc is still on PATH" >&2; exit 1
fi
cd "$work/app"
npm init -y >/dev/null
# The platform packages are not on the registry: install their tarballs beside the main one, as
# npm would fetch them through kvgpt's optionalDependencies after a publish. The other platforms'
# packages are skipped (wrong os/cpu, and unpublished).
npm install --no-audit --no-fund --loglevel=error "$work/kvgpt-$platform-$version.tgz" "$work/kvgpt-$platform-cuda-$version.tgz" "$work/kvgpt-$version.tgz"
node -e "const o = require('kvgpt/package.json').optionalDependencies; if (!o || o['kvgpt-$platform'] !== '$version' || o['kvgpt-$platform-cuda'] !== '$version') process.exit(1)"
test -e "node_modules/kvgpt-$platform-cuda/kvgpt.$platform.cuda.node"
test ! -e node_modules/kvgpt/src && test ! -e node_modules/kvgpt/crates   # no sources shipped

expected=$(node -p "JSON.stringify(require('./model/reference.json').prompts[0].greedy_new_ids)")
cat > generate.js <<'JS'
const { Gpt2 } = require('kvgpt');
(async () => {
  const model = await Gpt2.load('./model');
  const r = await model.generate('Hello, my dog is cute', { maxNewTokens: 40, ignoreEos: true });
  console.log(JSON.stringify(r.tokens));
  model.dispose();
})();
JS
script_ids=$(node generate.js)
cli_ids=$(npx kvgpt generate --model ./model --max-new-tokens 40 --ignore-eos --json "Hello, my dog is cute" | node -p "JSON.stringify(JSON.parse(require('fs').readFileSync(0, 'utf8')).tokens)")
# With the CUDA package installed and no GPU: 'auto' runs on the CPU and gives the same ids;
# 'cuda' rejects with KVGPT_DEVICE naming what is missing.
cat > devices.js <<'JS'
const { Gpt2 } = require('kvgpt');
(async () => {
  const model = await Gpt2.load('./model', { device: 'auto' });
  if (model.info.device !== 'cpu') throw new Error(`'auto' chose ${model.info.device} on a machine without a GPU`);
  const r = await model.generate('Hello, my dog is cute', { maxNewTokens: 40, ignoreEos: true });
  const err = await Gpt2.load('./model', { device: 'cuda' }).then(() => null, (e) => e);
  if (!err || err.code !== 'KVGPT_DEVICE' || !/no NVIDIA driver.*libcuda\.so\.1/.test(err.message)) throw new Error(`'cuda' should be KVGPT_DEVICE naming the driver, got ${err && err.stack}`);
  console.error(`pack-install-test: device 'cuda' said: ${err.message}`);
  console.log(JSON.stringify(r.tokens));
})().catch((e) => { console.error(e); process.exit(1); });
JS
auto_ids=$(node devices.js)
for got in "$script_ids" "$cli_ids" "$auto_ids"; do
  if [ "$got" != "$expected" ]; then
    echo "pack-install-test: ids differ from the reference: $got" >&2; exit 1
  fi
done
echo "pack-install-test: 1 passed, 0 failed (installed from tarballs, the CUDA package too, without cargo; script, npx kvgpt and device 'auto' gave the 40 reference ids; device 'cuda' is KVGPT_DEVICE without a driver)"
