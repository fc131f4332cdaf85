#!/usr/bin/env bash
# Makes the two payloads of bench/gpu/install.sh (issue 17: install the release's tarballs on a
# GPU machine that has no Node):
#   .gpu-npm/  node.xz (this machine's Node), npm.tar.xz (its npm), npm-cache.tar.xz (an npm
#              cache holding kvgpt's dependencies, so that `npm install --offline` resolves them)
#   .gpu-pkg/  the three tarballs of scripts/pack.sh, the CUDA one holding
#              $KVGPT_CUDA_PACKAGE_BINARY (default ./kvgpt.linux-x64-gnu.cuda.node, as
#              `CUDA_COMPUTE_CAP=80 bash scripts/build-cuda.sh` writes it for a release), and
#              kvgpt.cuda90.node.xz when $CUDA90 names a build for compute 9.0 to time beside it.
# Needs `npm run build` first.
set -euo pipefail
cd "$(dirname "$0")/../.."
rm -rf .gpu-npm .gpu-pkg && mkdir -p .gpu-npm .gpu-pkg
KVGPT_CUDA_PACKAGE_BINARY="${KVGPT_CUDA_PACKAGE_BINARY:-$PWD/kvgpt.linux-x64-gnu.cuda.node}" bash scripts/pack.sh .gpu-pkg
if [ -n "${CUDA90:-}" ]; then xz -T2 -6 -c "$CUDA90" > .gpu-pkg/kvgpt.cuda90.node.xz; fi
xz -T2 -6 -c "$(command -v node)" > .gpu-npm/node.xz
tar -C "$(dirname "$(dirname "$(readlink -f "$(command -v npm)")")")/.." -cJf .gpu-npm/npm.tar.xz npm
# The cache: kvgpt's dependencies, at the ranges its package.json gives, installed once here.
tmp=$(mktemp -d)
deps=$(node -p "Object.entries(require('./package.json').dependencies).map(([n, v]) => n + '@' + v).join(' ')")
(cd "$tmp" && npm init -y >/dev/null && npm install --cache "$tmp/cache" --no-audit --no-fund --loglevel=error $deps)
tar -C "$tmp" -cJf .gpu-npm/npm-cache.tar.xz cache
rm -rf "$tmp"
du -sh .gpu-npm .gpu-pkg
ls -la .gpu-npm .gpu-pkg
