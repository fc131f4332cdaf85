#!/usr/bin/env bash
# Builds the CUDA variant of the addon: kvgpt.linux-x64-gnu.cuda.node, a separate artifact from the
# CPU build (a CPU-only user never loads it, so never needs CUDA libraries).
#
# Needs no CUDA install on this machine and no GPU: the CUDA 13.0 toolchain comes from PyPI's NVIDIA
# wheels (nvcc, runtime, cccl, cublas, curand, nvrtc), installed under $CUDA_WHEELS (default
# .cuda/wheels). The driver library (libcuda) is never in a toolkit wheel, so the link uses a
# stub with libcuda's soname; the real one comes from the GPU machine's driver at run time.
#
#   bash scripts/build-cuda.sh            # -> kvgpt.linux-x64-gnu.cuda.node
#   CUDA_COMPUTE_CAP (default 80, as the release's npm package: the kernels are PTX for compute
#   8.0, which the driver compiles for Ampere, Ada, Hopper and newer; candle's q8_0 kernels are
#   machine code for that capability alone, so q8_0 runs on 8.x GPUs; 90 builds them for
#   H100/H200), CARGO_TARGET_DIR (default target-cuda)
#
# Run time needs: an NVIDIA driver for CUDA 13 (>= 580), and libcudart.so.13, libcublas.so.13,
# libcublasLt.so.13, libcurand.so.10, libnvrtc.so.13 on the loader path (LD_LIBRARY_PATH), e.g. from
# /usr/local/cuda/lib64 or the same PyPI wheels.
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_VERSION_PIN=13.0.88
WHEELS="${CUDA_WHEELS:-$PWD/.cuda/wheels}"
HOME_DIR="${CUDA_HOME_DIR:-$PWD/.cuda/home}"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-80}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"

if [ ! -x "$WHEELS/nvidia/cu13/bin/nvcc" ]; then
  python3 -m pip install --quiet --no-deps --target "$WHEELS" \
    "nvidia-cuda-nvcc==$CUDA_VERSION_PIN" "nvidia-cuda-runtime==$CUDA_VERSION_PIN" \
    "nvidia-cuda-crt==$CUDA_VERSION_PIN" "nvidia-nvvm==$CUDA_VERSION_PIN" \
    "nvidia-cuda-nvrtc==$CUDA_VERSION_PIN" nvidia-cuda-cccl==13.0.85 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
fi

CUDARC_DIR=$(cargo metadata --format-version 1 --manifest-path crates/kvgpt-node/Cargo.toml --features cuda |
  python3 -c "import json, os, sys; print(next(os.path.dirname(p['manifest_path']) for p in json.load(sys.stdin)['packages'] if p['name'] == 'cudarc'))")

# A CUDA_HOME laid out as the toolkit's: bin, include, nvvm, lib64 with the unversioned names the
# linker asks for, and the libcuda stub.
S="$WHEELS/nvidia/cu13"
rm -rf "$HOME_DIR"; mkdir -p "$HOME_DIR/lib64/stubs"
ln -s "$S/bin" "$HOME_DIR/bin"; ln -s "$S/include" "$HOME_DIR/include"; ln -s "$S/nvvm" "$HOME_DIR/nvvm"
for f in "$S"/lib/*.so.* "$S"/lib/*.a; do ln -s "$f" "$HOME_DIR/lib64/"; done
( cd "$HOME_DIR/lib64"
  for n in cudart nvrtc cublas cublasLt; do ln -sf "lib$n.so.13" "lib$n.so"; done
  ln -sf libcurand.so.10 libcurand.so
  # Every driver entry point cudarc binds (an executable, unlike the addon, must resolve all of
  # them at link time); the bodies are never run: the soname sends the loader to the real driver.
  grep -o 'fn cu[A-Za-z0-9_]*' "$CUDARC_DIR/src/driver/sys/mod.rs" | sort -u | sed 's/^fn \(.*\)$/void \1(void) {}/' > stubs/cuda_stub.c
  cc -shared -fPIC -o stubs/libcuda.so -Wl,-soname,libcuda.so.1 stubs/cuda_stub.c
  ln -sf stubs/libcuda.so libcuda.so )

export CUDA_HOME="$HOME_DIR" CUDA_PATH="$HOME_DIR" PATH="$HOME_DIR/bin:$PATH"
export CUDAFORGE_THREADS="${CUDAFORGE_THREADS:-$(nproc)}"
nvcc --version | tail -1

npx napi build --platform --release --manifest-path crates/kvgpt-node/Cargo.toml \
  --features cuda --output-dir .cuda/out --no-js --dts cuda.d.ts
mv .cuda/out/kvgpt.linux-x64-gnu.node kvgpt.linux-x64-gnu.cuda.node
echo "built kvgpt.linux-x64-gnu.cuda.node:"
ls -la kvgpt.linux-x64-gnu.cuda.node
readelf -d kvgpt.linux-x64-gnu.cuda.node | grep NEEDED
