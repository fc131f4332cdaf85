// Compiles kvgpt's CUDA kernels (src/cuda/attention.cu) to PTX with nvcc when the `cuda`
// feature is on; a CPU build needs no CUDA toolkit. The PTX targets compute capability
// CUDA_COMPUTE_CAP (default 80: Ampere and newer, which the driver compiles it for at load).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/cuda/attention.cu");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("attention.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // The capability candle's static kernels are built for too (the same variable): see
    // cuda::compute_capability.
    println!("cargo:rustc-env=KVGPT_CUDA_COMPUTE_CAP={cap}");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
        .arg(&out)
        .arg("src/cuda/attention.cu")
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => panic!("{nvcc} failed ({s}) compiling src/cuda/attention.cu"),
        Err(e) => panic!("cannot run {nvcc} for the cuda feature ({e}); set CUDA_HOME or NVCC (scripts/build-cuda.sh does)"),
    }
}
