#!/usr/bin/env bash
# Packs what a release publishes for linux-x64-gnu into DIR (default .): kvgpt-<version>.tgz
# (the main package, its optionalDependencies pinned as `napi prepublish` pins them),
# kvgpt-linux-x64-gnu-<version>.tgz (the CPU addon, ./kvgpt.linux-x64-gnu.node) and
# kvgpt-linux-x64-gnu-cuda-<version>.tgz (the CUDA addon). Needs `npm run build` first.
#
# The CUDA package holds KVGPT_CUDA_PACKAGE_BINARY when set (scripts/build-cuda.sh's output, as
# the release's), else a stand-in built here: a shared object with the real build's CUDA
# dependencies (libcuda.so.1, libcudart.so.13, libcublas.so.13, libcurand.so.10), linked against
# empty stubs that are then deleted, so that on a machine without CUDA it fails to load exactly
# as the real one does (CI cannot build the real one in its time: 12-30 minutes on 2 cores).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest=$(mkdir -p "${1:-.}" && cd "${1:-.}" && pwd)
platform=linux-x64-gnu
work=$(mktemp -d)
trap 'rm -rf "$work" "$root/npm/$platform/kvgpt.$platform.node" "$root/npm/$platform-cuda/kvgpt.$platform.cuda.node"' EXIT

# What the release workflow does before publishing: `napi artifacts` puts the built binary
# into its npm package, and `napi prepublish` pins every platform package in the main
# package's optionalDependencies (written only then: they are not on the registry before a
# release, so the repository's own package.json and lock file cannot list them).
cp "$root/kvgpt.$platform.node" "$root/npm/$platform/"
if [ -n "${KVGPT_CUDA_PACKAGE_BINARY:-}" ]; then
  cp "$KVGPT_CUDA_PACKAGE_BINARY" "$root/npm/$platform-cuda/kvgpt.$platform.cuda.node"
else
  echo 'int kvgpt_cuda_stand_in(void) { return 0; }' > "$work/addon.c"
  : > "$work/empty.c"
  for lib in libcuda.so.1 libcudart.so.13 libcublas.so.13 libcurand.so.10; do
    cc -shared -fPIC -o "$work/$lib" -Wl,-soname,$lib "$work/empty.c"
  done
  cc -shared -fPIC -o "$root/npm/$platform-cuda/kvgpt.$platform.cuda.node" "$work/addon.c" -L"$work" \
    -Wl,--no-as-needed -l:libcuda.so.1 -l:libcudart.so.13 -l:libcublas.so.13 -l:libcurand.so.10
  rm "$work"/lib*
fi
mkdir -p "$work/stage"
(cd "$root" && cp -r package.json README.md index.js index.d.ts dist "$work/stage/")
node -e "
  const fs = require('fs'), file = process.argv[1], p = JSON.parse(fs.readFileSync(file));
  p.optionalDependencies = Object.fromEntries(fs.readdirSync(process.argv[2]).map((d) => ['kvgpt-' + d, p.version]));
  fs.writeFileSync(file, JSON.stringify(p, null, 2));
" "$work/stage/package.json" "$root/npm"
(cd "$work/stage" && npm pack --ignore-scripts --pack-destination "$dest" >/dev/null)
(cd "$root" && npm pack "./npm/$platform" --pack-destination "$dest" >/dev/null)
(cd "$root" && npm pack "./npm/$platform-cuda" --pack-destination "$dest" >/dev/null)
