# Sourced by bench/gpu/run.sh and batch.sh on the GPU machine (no Rust, no Node there): the
# payload that bench/gpu/stage.sh made ($PAYLOAD, default .gpu) is unpacked, CUDA 13's libraries
# put on the loader path, and the output folder ($OUT, default ./gpu-out) made; everything after
# goes to $OUT/$1 as well.
#   node.xz                            a Node binary, unpacked to /tmp/node
#   kvgpt.linux-x64-gnu.cuda.node.xz   the CUDA build of the addon (scripts/build-cuda.sh)
#   kvgpt.linux-x64-gnu.node.xz        the CPU build, when it travels (loaded first, as in a
#                                      real install; else the CUDA build serves 'cpu' too)
#   repo/                              dist/, index.js, bench/gpu/*, package.json
#   tests/*.xz                         Rust test binaries built with --features cuda
PAYLOAD="$(cd "${PAYLOAD:-.gpu}" && pwd)"
FIXTURES="$(pwd)/test/fixtures"
OUT="${OUT:-$(pwd)/gpu-out}"
mkdir -p "$OUT"
exec > >(tee "$OUT/$1") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
# CUDA 13 libraries: the toolkit's and the ones torch ships (pip's nvidia/cu13/lib).
CU13=$(python3 -c "import nvidia, os; print(os.path.join(nvidia.__path__[0], 'cu13', 'lib'))" 2>/dev/null)
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${CU13}:${LD_LIBRARY_PATH:-}"
xz -dc "$PAYLOAD/node.xz" > /tmp/node && chmod +x /tmp/node
for f in "$PAYLOAD"/*.node.xz "$PAYLOAD"/tests/*.xz; do xz -dkf "$f"; chmod +x "${f%.xz}"; done
/tmp/node --version
export KVGPT_CUDA_BINARY="$PAYLOAD/kvgpt.linux-x64-gnu.cuda.node"
CPU_ADDON="$PAYLOAD/kvgpt.linux-x64-gnu.node"
[ -f "$CPU_ADDON" ] || CPU_ADDON="$KVGPT_CUDA_BINARY"
export NAPI_RS_NATIVE_LIBRARY_PATH="$CPU_ADDON"

# Runs every Rust test binary that travelled, on CUDA, against the checkout's fixtures.
run_test_binaries() {
  for t in $(ls "$PAYLOAD/tests" | grep -v '\.xz$'); do
    KVGPT_TEST_DEVICE=cuda KVGPT_FIXTURES="$FIXTURES" timeout 240 "$PAYLOAD/tests/$t" --test-threads 1 2>&1 |
      grep -v -E '^ +[0-9]+: |^ +at '
  done
}
