#!/usr/bin/env bash
# Proves the install as a user gets it: packs kvgpt and its linux-x64-gnu platform package into
# tarballs, installs both into an empty project with no cargo/rustc on PATH and no access to the
# sources, then generates from the tiny fixture with a plain Node script and with `npx kvgpt`,
# and checks the ids against HF's reference. Needs `npm run build` first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
platform=linux-x64-gnu
version=$(node -p "require('$root/package.json').version")
work=$(mktemp -d)
trap 'rm -rf "$work" "$root/npm/$platform/kvgpt.$platform.node"' EXIT

# What the release workflow does before publishing: `napi artifacts` puts the built binary
# into its npm package, and `napi prepublish` pins every platform package in the main
# package's optionalDependencies (written only then: they are not on the registry before a
# release, so the repository's own package.json and lock file cannot list them).
cp "$root/kvgpt.$platform.node" "$root/npm/$platform/"
mkdir -p "$work/stage"
(cd "$root" && cp -r package.json README.md index.js index.d.ts dist "$work/stage/")
node -e "
  const fs = require('fs'), file = process.argv[1], p = JSON.parse(fs.readFileSync(file));
  p.optionalDependencies = Object.fromEntries(fs.readdirSync(process.argv[2]).map((d) => ['kvgpt-' + d, p.version]));
  fs.writeFileSync(file, JSON.stringify(p, null, 2));
" "$work/stage/package.json" "$root/npm"
(cd "$work/stage" && npm pack --ignore-scripts --pack-destination "$work" >/dev/null)
(cd "$root" && npm pack "./npm/$platform" --pack-destination "$work" >/dev/null)

mkdir -p "$work/app" "$work/bin"
cp -r "$root/test/fixtures/tiny-gpt2" "$work/app/model"
for tool in node npm npx; do ln -s "$(command -v $tool)" "$work/bin/$tool"; done
export PATH="$work/bin:/usr/bin:/bin"
if command -v cargo >/dev/null 2>&1 || command -v rustc >/dev/null 2>&1; then
  echo "pack-install-test: cargo or rustc is still on PATH" >&2; exit 1
fi
cd "$work/app"
npm init -y >/dev/null
# The platform package is not on the registry: install its tarball beside the main one, as npm
# would fetch it through kvgpt's optionalDependencies after a publish. The other platforms'
# packages are skipped (wrong os/cpu, and unpublished).
npm install --no-audit --no-fund --loglevel=error "$work/kvgpt-$platform-$version.tgz" "$work/kvgpt-$version.tgz"
node -e "const o = require('kvgpt/package.json').optionalDependencies; if (!o || o['kvgpt-$platform'] !== '$version') process.exit(1)"
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
for got in "$script_ids" "$cli_ids"; do
  if [ "$got" != "$expected" ]; then
    echo "pack-install-test: ids differ from the reference: $got" >&2; exit 1
  fi
done
echo "pack-install-test: 1 passed, 0 failed (installed from tarballs without cargo; script and npx kvgpt gave the 40 reference ids)"
