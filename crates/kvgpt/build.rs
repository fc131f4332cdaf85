// Compiles kvgpt's CUDA kernels (src/cuda/attention.cu, decode.cu) to PTX with nvcc when the
// `cuda` feature is on; a CPU build needs no CUDA toolkit. The PTX targets compute capability
// CUDA_COMPUTE_CAP (default 80: Ampere and newer, which the driver compiles it for at load).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    for f in ["attention.cu", "decode.cu", "common.cuh"] {
        println!("cargo:rerun-if-changed=src/cuda/{f}");
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    // The capability candle's static kernels are built for too (the same variable): see
    // cuda::compute_capability.
    println!("cargo:rustc-env=KVGPT_CUDA_COMPUTE_CAP={cap}");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    for name in ["attention", "decode"] {
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "-o"])
            .arg(out_dir.join(format!("{name}.ptx")))
            .arg(format!("src/cuda/{name}.cu"))
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("{nvcc} failed ({s}) compiling src/cuda/{name}.cu"),
            Err(e) => panic!("cannot run {nvcc} for the cuda feature ({e}); set CUDA_HOME or NVCC (scripts/build-cuda.sh does)"),
        }
    }
}
