//! Reduced-precision weights (f16, bf16, q8_0) against HF's f32 references: the logits' relative
//! error ||l - ref|| / ||ref|| is printed and bounded, and greedy ids must equal the reference's
//! for the first steps. KVGPT_TEST_DEVICE=cuda runs them on a GPU.

mod common;
use candle_core::{DType, Tensor};
use common::*;
use kvgpt::{Logits, Model, WeightDType};

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&candle_core::Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f64>().unwrap();
    norm(&(&a - &b).unwrap()) / norm(&b)
}

/// Greedy ids of `model` from `prompt`, with the step at which they first leave `expected`, and
/// the f32 model's top-1 minus top-2 logit margin at that step (along the reference path).
fn first_divergence(model: &Model, f32: &Model, prompt: &[u32], expected: &[u32]) -> Option<(usize, f32)> {
    let g = run(model, prompt, &greedy(expected.len(), true));
    let s = g.tokens.iter().zip(expected).position(|(a, b)| a != b)?;
    let mut path = prompt.to_vec();
    path.extend_from_slice(&expected[..s]);
    let input = Tensor::new(path.as_slice(), f32.gpt2().device()).unwrap().unsqueeze(0).unwrap();
    let mut row: Vec<f32> = f32.gpt2().forward(&input, 0, None, Logits::Last).unwrap().squeeze(0).unwrap().to_vec1().unwrap();
    row.sort_by(|a, b| b.total_cmp(a));
    Some((s, row[0] - row[1]))
}

/// For each reference prompt: the relative error of the last-position logits (at most `max_rel`),
/// and the greedy ids with the cache on and off, which must equal HF's for at least `min_steps`
/// steps on every prompt, except where they part at a near tie (f32's top-2 margin under 1e-3:
/// tiny-gpt2's prompt 3 has one of 6e-5 at step 1, which any rounding flips). Each divergence
/// is printed with the margin it happened at.
fn check(name: &str, dtype: WeightDType, max_rel: f64, min_steps: usize) {
    let model = load_as(name, dtype);
    let f32 = load(name);
    assert_eq!(model.info().dtype, dtype.as_str());
    let reference = reference_json(name);
    let logits = reference_logits(name);
    let dev = model.gpt2().device().clone();
    let mut worst = 0f64;
    let mut equal_steps = vec![];
    for (i, p) in reference["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&p["input_ids"]);
        let expected = ids(&p["greedy_new_ids"]);
        let input = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
        let last = model.gpt2().forward(&input, 0, None, Logits::Last).unwrap().squeeze(0).unwrap();
        assert_eq!(last.dtype(), DType::F32, "logits come back as f32");
        worst = worst.max(rel_err(&last, &logits[&format!("prompt{i}.logits_last")]));
        let (steps, tie) = match first_divergence(&model, &f32, &prompt, &expected) {
            None => (expected.len(), false),
            Some((s, margin)) => {
                println!("{name} {} prompt{i}: greedy ids leave HF's at step {s}, where f32's top-2 margin is {margin:.2e}", dtype.as_str());
                (s, margin < 1e-3)
            }
        };
        let off = run(&model, &prompt, &greedy(steps.min(expected.len()), false));
        assert_eq!(off.tokens, expected[..steps], "{name} {dtype:?} prompt{i}: cache off differs from cache on");
        equal_steps.push(steps);
        assert!(tie || steps >= min_steps, "{name} {dtype:?} prompt{i}: greedy ids equal HF's for {steps} steps, fewer than {min_steps}");
    }
    println!(
        "{name} {}: logits relative error at most {worst:.2e}; greedy ids equal HF's for the first {equal_steps:?} of {} steps",
        dtype.as_str(),
        reference["n_new"]
    );
    assert!(worst < max_rel, "{name} {dtype:?}: relative error {worst:.2e} >= {max_rel:.0e}");
}

// Bounds from the measured figures (CPU, 2026-11-28): relative error f16 3.3e-3 / 1.2e-3,
// bf16 1.4e-2 / 1.1e-2, q8_0 3.6e-2 / 2.4e-2 (tiny-gpt2 / -zh); greedy ids equal for every step but at the
// tie with f16, from step 8 on with bf16, from step 7 on with q8_0 (tiny-gpt2 prompt 2, at an
// f32 margin of 2.4e-2: the fixtures' n_embd of 32 makes each row one q8_0 block, and candle's
// q8_0 matmul quantizes the activations too).

#[test]
fn f16_weights_keep_greedy_ids() {
    check("tiny-gpt2", WeightDType::F16, 5e-3, 40);
    check("tiny-gpt2-zh", WeightDType::F16, 5e-3, 30);
}

#[test]
fn bf16_weights_keep_greedy_ids() {
    check("tiny-gpt2", WeightDType::Bf16, 3e-2, 8);
    check("tiny-gpt2-zh", WeightDType::Bf16, 3e-2, 8);
}

#[test]
fn q8_0_weights_keep_greedy_ids() {
    check("tiny-gpt2", WeightDType::Q8_0, 5e-2, 7);
    check("tiny-gpt2-zh", WeightDType::Q8_0, 5e-2, 7);
}

#[test]
fn reduced_precision_halves_the_cache() {
    let f16 = load_as("tiny-gpt2", WeightDType::F16);
    let f32 = load("tiny-gpt2");
    assert_eq!(f16.info().cache_bytes_per_token * 2, f32.info().cache_bytes_per_token);
    let q8 = load_as("tiny-gpt2", WeightDType::Q8_0);
    assert_eq!(q8.info().cache_bytes_per_token, f32.info().cache_bytes_per_token, "q8_0 keeps an f32 cache");
}
