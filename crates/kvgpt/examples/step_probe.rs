//! Prefill and decode-step latency of GPT-2 small (random weights) without Node:
//! `step_probe CONTEXT STEPS [PREFILL_REPEATS]`; used for the figures in bench/NOTES.md.
//! KVGPT_DTYPE (f32, f16, bf16, q8_0) and KVGPT_DEVICE (cpu, cuda, auto) pick the weights'
//! dtype and the device.
use kvgpt::{DeviceKind, Gpt2Config, LoadOptions, Model, Session, WeightDType};
use std::time::Instant;
fn main() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let opts = LoadOptions {
        dtype: WeightDType::parse(&env("KVGPT_DTYPE", "f32")).unwrap(),
        device: DeviceKind::parse(&env("KVGPT_DEVICE", "cpu")).unwrap(),
        hub: None,
    };
    let model = Model::random(Gpt2Config::gpt2_small(), 0, &opts).unwrap();
    let ctx: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(256);
    let steps: usize = std::env::args().nth(2).map(|s| s.parse().unwrap()).unwrap_or(30);
    let mut s = Session::new(model.gpt2(), ctx + 1, true).unwrap();
    let ids: Vec<u32> = (0..ctx as u32).map(|i| (i * 4099 + 13) % 50257).collect();
    let repeats: usize = std::env::args().nth(3).map(|s| s.parse().unwrap()).unwrap_or(1);
    let mut prefill = vec![];
    for _ in 0..repeats.max(1) {
        s.truncate(0);
        let t = Instant::now();
        s.feed(model.gpt2(), &ids).unwrap();
        prefill.push(t.elapsed().as_secs_f64() * 1e3);
    }
    prefill.sort_by(|a, b| a.partial_cmp(b).unwrap());
    println!("prefill {ctx}: median {:.1} ms of {}", prefill[prefill.len() / 2], prefill.len());
    let mut times = vec![];
    for _ in 0..steps {
        s.truncate(ctx);
        let t = Instant::now();
        let l = s.feed(model.gpt2(), &[464]).unwrap();
        let v: Vec<f32> = l.squeeze(0).unwrap().to_vec1().unwrap();
        std::hint::black_box(v);
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if steps > 0 {
        println!("step at {ctx}: median {:.2} ms, min {:.2}", times[steps / 2], times[0]);
    }
}
