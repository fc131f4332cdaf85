//! Products of a batched decode step on the CPU, f32: for m rows (m sequences' next tokens),
//! the matvec kernels (`RowPlan` small) against gemm (one group), on GPT-2 small's c_fc and
//! lm_head shapes; then whole decode steps of S sequences at context C through
//! `Gpt2::forward_batch`, in turns. `batch_probe [REPEATS]`.
use candle_core::{Device, Tensor};
use kvgpt::cpu::matvec::{matvec_cpu, RowPlan};
use kvgpt::{Gpt2Config, LoadOptions, Logits, Model, Segment, Session};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let repeats: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(7);
    let d = Device::Cpu;
    for (name, n, k) in [("c_fc", 3072, 768), ("lm_head", 50257, 768)] {
        let w = Tensor::randn(0f32, 0.02, (n, k), &d).unwrap();
        for m in [1usize, 4, 8, 16, 32, 64] {
            let x = Tensor::randn(0f32, 1.0, (m, k), &d).unwrap();
            let (small, big) = (RowPlan { small: m, chunk_rows: 0, big: vec![] }, RowPlan { small: 0, chunk_rows: 0, big: vec![m] });
            let (mut a, mut b) = (vec![], vec![]);
            for _ in 0..repeats {
                let t = Instant::now();
                std::hint::black_box(matvec_cpu(&x, &w, None, Some(&small)).unwrap());
                a.push(t.elapsed().as_secs_f64() * 1e3);
                let t = Instant::now();
                std::hint::black_box(matvec_cpu(&x, &w, None, Some(&big)).unwrap());
                b.push(t.elapsed().as_secs_f64() * 1e3);
            }
            let (a, b) = (median(a), median(b));
            let gf = |ms: f64| 2.0 * (m * n * k) as f64 / ms / 1e6;
            println!("{name} m={m:>2}: matvec {a:7.2} ms ({:5.1} GFLOP/s)  gemm {b:7.2} ms ({:5.1} GFLOP/s)", gf(a), gf(b));
        }
    }
    let model = Model::random(Gpt2Config::gpt2_small(), 0, &LoadOptions::default()).unwrap();
    let ctx = 128;
    for s in [1usize, 4, 16, 64] {
        // Each session holds a prompt of `ctx`; the timed steps write position ctx again and again
        // (the caches are not advanced), so every step sees the same context.
        let sessions: Vec<Session> = (0..s)
            .map(|_| {
                let mut session = Session::new(model.gpt2(), ctx + 2, true).unwrap();
                session.feed(model.gpt2(), &(0..ctx as u32).collect::<Vec<_>>()).unwrap();
                session
            })
            .collect();
        let mut times = vec![];
        for _ in 0..repeats {
            let ids = [464u32];
            let segs: Vec<Segment> = sessions.iter().map(|s| Segment { ids: &ids, cache: s.cache().unwrap(), logits: Logits::Last }).collect();
            let t = Instant::now();
            std::hint::black_box(model.gpt2().forward_batch(&segs).unwrap());
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let ms = median(times);
        println!("decode step, {s:>2} sequences at context {ctx}: {ms:7.1} ms, {:6.1} tokens/s", s as f64 / ms * 1e3);
    }
}

