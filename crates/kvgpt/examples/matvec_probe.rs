//! One-row products of the lm_head's shape (50257 x 768), run in turns so that a noisy machine
//! hits each alike: f32 matvec, q8_0 and f16 with f32 activations (`kvgpt::packed`), candle's
//! q8_0 matmul.
//! Prints each median and the bytes it read per second. `matvec_probe [ROWS] [REPEATS]`.
use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{Device, Module, Tensor};
use kvgpt::cpu::packed::{PackedMatrix, Packing};
use std::time::Instant;

fn main() {
    let m: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(1);
    let repeats: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(30);
    let (n, k) = (50257, 768);
    let d = Device::Cpu;
    let w = Tensor::randn(0f32, 0.02, (n, k), &d).unwrap();
    let x = Tensor::randn(0f32, 1.0, (1, m, k), &d).unwrap();
    let wv: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
    let xv: Vec<f32> = x.flatten_all().unwrap().to_vec1().unwrap();
    let q8 = PackedMatrix::pack(&wv, n, k, Packing::Q8_0);
    let h = PackedMatrix::pack(&wv, n, k, Packing::F16);
    let cq = QMatMul::from_qtensor(QTensor::quantize(&w, GgmlDType::Q8_0).unwrap()).unwrap();
    let mut times = [vec![], vec![], vec![], vec![]];
    for _ in 0..repeats {
        let t = Instant::now();
        std::hint::black_box(kvgpt::cpu::matvec::matvec_cpu(&x, &w, None, None).unwrap());
        times[0].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(q8.matmul(&xv, None).unwrap());
        times[1].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(cq.forward(&x).unwrap());
        times[2].push(t.elapsed().as_secs_f64());
        let t = Instant::now();
        std::hint::black_box(h.matmul(&xv, None).unwrap());
        times[3].push(t.elapsed().as_secs_f64());
    }
    println!("triad {:.1} GB/s, read {:.1} GB/s", kvgpt::cpu::bandwidth::triad(128, 5) / 1e9, kvgpt::cpu::bandwidth::read(384, 5) / 1e9);
    let bytes = [n * k * 4, q8.bytes(), n * k / 32 * 34, h.bytes()];
    for (i, name) in ["f32 matvec", "q8_0 (kvgpt, f32 x)", "q8_0 (candle)", "f16 (kvgpt, f32 x)"].iter().enumerate() {
        let t = &mut times[i];
        t.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = t[t.len() / 2];
        println!("{name:22} rows {m}: median {:.2} ms, {:.1} GB/s", med * 1e3, bytes[i] as f64 / med / 1e9);
    }
}
