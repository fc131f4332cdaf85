#!/usr/bin/env bash
# Stages what bench/gpu/run.sh needs on a GPU machine that has no Rust and no Node, into
# $PAYLOAD (default .gpu, git-ignored): a Node binary (xz), the CPU and CUDA addons, dist/ and
# the scripts, and the Rust parity and batch test binaries built with --features cuda.
# Run after `npm run build` and `CUDA_COMPUTE_CAP=90 bash scripts/build-cuda.sh` (same CUDA env,
# capability and target dir; 90 builds candle's q8_0 kernels for the H200, whose parity suite runs q8_0).
# The call carries 64 MiB with the repository (about 21 MB): KVGPT_GPU_TESTS picks the test
# binaries (about 8 MB each; default "parity batch"), and KVGPT_STAGE_CPU_ADDON=0 leaves the
# CPU addon out (the CUDA build then serves device 'cpu' too).
set -euo pipefail
cd "$(dirname "$0")/../.."
PAYLOAD="${PAYLOAD:-.gpu}"
T=$(rustc -vV | sed -n 's/host: //p')
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"  # as scripts/build-cuda.sh
H="${CUDA_HOME_DIR:-$PWD/.cuda/home}"
export CUDA_HOME="$H" CUDA_PATH="$H" PATH="$H/bin:$PATH" CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"

rm -rf "$PAYLOAD"; mkdir -p "$PAYLOAD/tests" "$PAYLOAD/repo/bench"
TESTS="${KVGPT_GPU_TESTS:-parity batch}"
cargo test --release --target "$T" -p kvgpt --features cuda $(printf -- '--test %s ' $TESTS) --no-run 2>&1 | tail -3
for t in $TESTS; do
  bin=$(ls -t "$CARGO_TARGET_DIR/$T/release/deps/$t"-* | grep -v '\.d$' | head -1)
  strip -o "$PAYLOAD/tests/$t" "$bin" && xz -T0 -6 "$PAYLOAD/tests/$t"
done
# Everything large travels xz-compressed (the call carries 64 MiB at most); run.sh unpacks.
xz -T0 -6 -c "$(command -v node)" > "$PAYLOAD/node.xz"
ADDONS=kvgpt.linux-x64-gnu.cuda.node
[ "${KVGPT_STAGE_CPU_ADDON:-1}" = 0 ] || ADDONS="$ADDONS kvgpt.linux-x64-gnu.node"
for f in $ADDONS; do
  strip -o "$PAYLOAD/$f" "$f" && xz -T0 -6 "$PAYLOAD/$f"
done
# The library part of dist/ needs no npm dependency (the CLI's bench needs vega: not carried).
cp -r dist index.js package.json "$PAYLOAD/repo/"
cp -r bench/gpu "$PAYLOAD/repo/bench/"
du -sh "$PAYLOAD" "$PAYLOAD"/* "$PAYLOAD"/tests/*
