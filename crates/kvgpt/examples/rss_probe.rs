//! RSS over one long generation with the KV cache, without Node: is the native side flat?
//! `rss_probe [NEW_TOKENS]` prints RSS after the first token and every 100 tokens (MB).
use kvgpt::{GenerateOptions, Gpt2Config, Model};
use std::sync::atomic::AtomicBool;

fn rss_mb() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn main() {
    let new_tokens: usize = std::env::args().nth(1).map(|s| s.parse().unwrap()).unwrap_or(905);
    let model = Model::random(Gpt2Config::gpt2_small(), 0, &Default::default()).unwrap();
    let mut opts = GenerateOptions::defaults_for(&model);
    opts.max_new_tokens = new_tokens;
    opts.ignore_eos = true;
    let mut n = 0;
    let mut first = 0.0;
    let mut last = 0.0;
    model
        .generate(&[464, 509, 53, 12940, 7000], &opts, &AtomicBool::new(false), &mut |_| {
            n += 1;
            last = rss_mb();
            if n == 1 {
                first = last;
            }
            if n == 1 || n % 100 == 0 {
                println!("token {n}: RSS {last:.1} MB");
            }
        })
        .unwrap();
    println!("growth after the first token: {:.1} MB over {} tokens", last - first, n - 1);
}
