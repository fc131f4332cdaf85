//! Logits and greedy ids against HF transformers' references (test/fixtures/*/reference.*):
//! f32 logits within 1e-4 (1e-3 on CUDA, whose reductions run in another order), greedy ids
//! identical, with the KV cache on and off. KVGPT_TEST_DEVICE=cuda runs it on a GPU.

mod common;
use candle_core::{DType, Tensor, D};
use common::*;
use kvgpt::{KvCache, Logits, Model, WeightDType};
use std::collections::HashMap;

/// Checks every prompt of a fixture: last-position logits, the logits of the first and last
/// greedy steps (computed through the KV cache), and greedy ids with the cache on and off.
fn check_fixture(name: &str) {
    check_model(&load(name), name);
}

/// `check_fixture` for a model loaded elsewhere, against test/fixtures/<name>'s reference.
fn check_model(model: &Model, name: &str) {
    let tol = if model.gpt2().device().is_cpu() { 1e-4 } else { 1e-3 };
    let reference = reference_json(name);
    let logits = reference_logits(name);
    let n_new = reference["n_new"].as_u64().unwrap() as usize;
    let dev = model.gpt2().device().clone();
    for (i, p) in reference["prompts"].as_array().unwrap().iter().enumerate() {
        let prompt = ids(&p["input_ids"]);
        let expected = ids(&p["greedy_new_ids"]);
        let input = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();

        let last = model.gpt2().forward(&input, 0, None, Logits::Last).unwrap().squeeze(0).unwrap();
        let d = max_abs_diff(&last, &logits[&format!("prompt{i}.logits_last")]);
        assert!(d < tol, "{name} prompt{i} logits_last max diff {d}");
        let d0 = max_abs_diff(&last, &logits[&format!("prompt{i}.step0.logits")]);
        assert!(d0 < tol, "{name} prompt{i} step0 max diff {d0}");

        // Feed the reference greedy ids one at a time through a preallocated cache; the
        // logits of the last step must match HF's, and each step's max logit too.
        let cfg = model.config();
        let mut cache = KvCache::new(cfg, prompt.len() + n_new, model.gpt2().cache_dtype(), &dev).unwrap();
        let (k_before, _) = cache.layer_buffers(0);
        let k_ptr = format!("{:?}", k_before.id());
        let mut step = model.gpt2().forward(&input, 0, Some(&mut cache), Logits::Last).unwrap();
        let max_logits: Vec<f64> = p["greedy_step_max_logit"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        for (s, &tok) in expected.iter().enumerate().take(n_new - 1) {
            let m = step.max(D::Minus1).unwrap().squeeze(0).unwrap().to_scalar::<f32>().unwrap();
            assert!((m as f64 - max_logits[s]).abs() < tol as f64, "{name} prompt{i} step{s} max logit {m} vs {}", max_logits[s]);
            let pos = prompt.len() + s;
            let x = Tensor::new(&[tok], &dev).unwrap().unsqueeze(0).unwrap();
            step = model.gpt2().forward(&x, pos, Some(&mut cache), Logits::Last).unwrap();
        }
        assert_eq!(format!("{:?}", cache.layer_buffers(0).0.id()), k_ptr, "the cache buffer was replaced");
        assert_eq!(cache.len(), prompt.len() + n_new - 1);
        let key = format!("prompt{i}.step{}.logits", n_new - 1);
        let d = max_abs_diff(&step.squeeze(0).unwrap(), &logits[&key]);
        assert!(d < tol, "{name} {key} max diff {d}");

        for use_cache in [true, false] {
            let g = run(model, &prompt, &greedy(n_new, use_cache));
            assert_eq!(g.tokens, expected, "{name} prompt{i} greedy ids, use_cache={use_cache}");
        }
    }
    // All positions of prompt 0 (the scoring path, T > 1 with the causal mask).
    let p0 = ids(&reference["prompts"][0]["input_ids"]);
    let input = Tensor::new(p0.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
    let all = model.gpt2().forward(&input, 0, None, Logits::All).unwrap().squeeze(0).unwrap();
    let d = max_abs_diff(&all, &logits["prompt0.logits_all"]);
    assert!(d < tol, "{name} prompt0 logits_all max diff {d}");
    // HF's loss with labels=input_ids: mean cross-entropy of positions 1.. given the previous.
    let lsm = candle_nn::ops::log_softmax(&all, D::Minus1).unwrap();
    let mut nll = 0f64;
    for t in 0..p0.len() - 1 {
        nll -= lsm.get(t).unwrap().get(p0[t + 1] as usize).unwrap().to_scalar::<f32>().unwrap() as f64;
    }
    let loss = nll / (p0.len() - 1) as f64;
    let expected = reference["prompts"][0]["loss"].as_f64().unwrap();
    assert!((loss - expected).abs() < 1e-4, "{name} loss {loss} vs {expected}");
}

#[test]
fn tiny_gpt2_matches_hf() {
    check_fixture("tiny-gpt2");
}

/// The bundled demo model (models/fortunes-gpt2, trained by scripts/fortunes/train.py; its
/// weights are float16, widened to f32 at load as HF does).
#[test]
fn bundled_fortunes_gpt2_matches_hf() {
    let opts = kvgpt::LoadOptions { device: test_device(), ..Default::default() };
    let model = Model::load(bundled("fortunes-gpt2").to_str().unwrap(), &opts).unwrap();
    check_model(&model, "fortunes-gpt2");
}

#[test]
fn tiny_gpt2_zh_from_pytorch_bin_matches_hf() {
    check_fixture("tiny-gpt2-zh");
    let model = load("tiny-gpt2-zh");
    assert!(model.info().weights_file.ends_with("pytorch_model.bin"));
}

#[test]
fn prefill_in_chunks_equals_one_prefill() {
    // Writing the cache in two pieces (T > 1 at pos > 0) must give the same logits.
    let model = load("tiny-gpt2");
    let dev = model.gpt2().device().clone();
    let prompt: Vec<u32> = vec![464, 509, 53, 12940, 7000, 8251, 290, 3815];
    let whole = Tensor::new(prompt.as_slice(), &dev).unwrap().unsqueeze(0).unwrap();
    let expected = model.gpt2().forward(&whole, 0, None, Logits::Last).unwrap();
    let mut cache = KvCache::new(model.config(), 16, model.gpt2().cache_dtype(), &dev).unwrap();
    let a = Tensor::new(&prompt[..5], &dev).unwrap().unsqueeze(0).unwrap();
    let b = Tensor::new(&prompt[5..], &dev).unwrap().unsqueeze(0).unwrap();
    model.gpt2().forward(&a, 0, Some(&mut cache), Logits::Last).unwrap();
    let got = model.gpt2().forward(&b, 5, Some(&mut cache), Logits::Last).unwrap();
    // On CUDA the two paths run products of other shapes, so other kernels: the HF bound there.
    let tol = if dev.is_cpu() { 1e-5 } else { 1e-3 };
    let d = max_abs_diff(&got, &expected);
    println!("chunked prefill vs one prefill: max diff {d:.2e}");
    assert!(d < tol, "chunked prefill differs by {d:.2e}");
}

#[test]
fn sharded_safetensors_without_prefix_load_and_match() {
    // tiny-gpt2's tensors split over two shards with a model.safetensors.index.json, keys
    // renamed to the prefix-less style (h.0...), as some exports write them.
    let dir = TempDir::new("sharded");
    copy_fixture_files("tiny-gpt2", &["config.json", "tokenizer.json"], dir.path());
    let tensors = candle_core::safetensors::load(fixture("tiny-gpt2").join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let (mut shards, mut weight_map) = (vec![HashMap::new(), HashMap::new()], serde_json::Map::new());
    for (i, name) in names.iter().enumerate() {
        let key = name.strip_prefix("transformer.").unwrap_or(name).to_string();
        let file = format!("model-0000{}-of-00002.safetensors", i % 2 + 1);
        weight_map.insert(key.clone(), file.clone().into());
        shards[i % 2].insert(key, tensors[*name].clone());
    }
    for (i, shard) in shards.iter().enumerate() {
        candle_core::safetensors::save(shard, dir.path().join(format!("model-0000{}-of-00002.safetensors", i + 1))).unwrap();
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.path().join("model.safetensors.index.json"), index.to_string()).unwrap();
    let model = kvgpt::Model::load(dir.path().to_str().unwrap(), &Default::default()).unwrap();
    assert!(model.info().weights_file.ends_with("model.safetensors.index.json"));
    let (prompt, expected) = reference_prompt("tiny-gpt2", 0);
    assert_eq!(run(&model, &prompt, &greedy(40, true)).tokens, expected);
    // A shard named with a path is refused before anything is read.
    let bad = serde_json::json!({ "weight_map": { "wte.weight": "../model.safetensors" } });
    std::fs::write(dir.path().join("model.safetensors.index.json"), bad.to_string()).unwrap();
    let err = kvgpt::Model::load(dir.path().to_str().unwrap(), &Default::default()).err().unwrap();
    assert_eq!(err.code(), "KVGPT_INVALID_FILE");
    assert!(err.to_string().contains("is not a file name in this directory"), "{err}");
}

// Reduced-precision weights (f16, bf16, q8_0) against HF's f32 references: the logits' relative
// error ||l - ref|| / ||ref|| is printed and bounded, and greedy ids must equal the reference's
// for the first steps.

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_device(&candle_core::Device::Cpu).unwrap().to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let norm = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f64>().unwrap();
    norm(&(&a - &b).unwrap()) / norm(&b)
}

/// Greedy ids of `model` from `prompt`, with the step at which they first leave `expected`, and
/// the f32 model's top-1 minus top-2 logit margin at that step (along the reference path).
fn first_divergence(model: &Model, f32: &Model, prompt: &[u32], expected: &[u32], use_cache: bool) -> Option<(usize, f32)> {
    let g = run(model, prompt, &greedy(expected.len(), use_cache));
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
/// is printed with the margin it happened at. (On CUDA, cache off can part elsewhere than cache
/// on: a one-row and a many-row product take different kernels there.)
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
        for use_cache in [true, false] {
            let (steps, tie) = match first_divergence(&model, &f32, &prompt, &expected, use_cache) {
                None => (expected.len(), false),
                Some((s, margin)) => {
                    println!("{name} {} prompt{i} cache {use_cache}: greedy ids leave HF's at step {s}, where f32's top-2 margin is {margin:.2e}", dtype.as_str());
                    (s, margin < 1e-3)
                }
            };
            assert!(tie || steps >= min_steps, "{name} {dtype:?} prompt{i} cache {use_cache}: greedy ids equal HF's for {steps} steps, fewer than {min_steps}");
            if use_cache {
                equal_steps.push(steps);
            }
        }
    }
    println!(
        "{name} {}: logits relative error at most {worst:.2e}; greedy ids equal HF's for the first {equal_steps:?} of {} steps",
        dtype.as_str(),
        reference["n_new"]
    );
    assert!(worst < max_rel, "{name} {dtype:?}: relative error {worst:.2e} >= {max_rel:.0e}");
}

// Bounds from the measured figures. On the CPU every dtype keeps f32 activations (`kvgpt::packed`
// widens the weights in its kernels), so the error is the weights' rounding, plus, since
// 2026-12-02, an f16 cache for the reduced dtypes and, for q8_0, the lm_head's q8_0 rows as the
// tied embedding table. Relative error (tiny-gpt2 / -zh) on 2026-11-28 with an f32 cache: f16
// 2.5e-3 / 5.8e-4, bf16 9.0e-3 / 5.8e-3, q8_0 2.0e-2 / 1.7e-2; on 2026-12-02: f16 1.4e-3 /
// 8.5e-4, bf16 1.0e-2 / 6.0e-3, q8_0 2.0e-2 / 1.6e-2. Greedy ids equal HF's for every step with
// f16, from step 7 on with bf16 (tiny-gpt2 prompt 2, at an f32 margin of 2.4e-2). q8_0: candle's
// kernels, which quantize the activations too, gave 3.6e-2 / 2.4e-2 and fail the CPU bound
// (kvgpt's integer path for q8_0 prompts takes chunks of 16 tokens or more, longer than these
// prompts); the fixtures' n_embd of 32 makes each row one block, and their random weights give
// top-2 margins of 1.5e-2 to 7.5e-2, so greedy ids part from HF's at steps 1 to 29 on 5 of 8
// prompts (each printed with its margin; 0 to 9 on 5 of 8 with an f16 embedding table): no step
// count is asserted for q8_0. Off the CPU (an H200) f16/bf16 compute in their dtype: 3.2e-3 and
// 1.2e-2, bf16 from step 3 on; q8_0 is candle's kernels (3.6e-2).

fn on_cpu() -> bool {
    load("tiny-gpt2").gpt2().device().is_cpu()
}

#[test]
fn f16_weights_keep_greedy_ids() {
    let max_rel = if on_cpu() { 3e-3 } else { 5e-3 };
    check("tiny-gpt2", WeightDType::F16, max_rel, 40);
    check("tiny-gpt2-zh", WeightDType::F16, max_rel, 30);
}

#[test]
fn bf16_weights_keep_greedy_ids() {
    let (max_rel, steps) = if on_cpu() { (1.2e-2, 7) } else { (3e-2, 3) };
    check("tiny-gpt2", WeightDType::Bf16, max_rel, steps);
    check("tiny-gpt2-zh", WeightDType::Bf16, max_rel, steps);
}

#[test]
fn q8_0_weights_keep_greedy_ids() {
    let max_rel = if on_cpu() { 2.5e-2 } else { 5e-2 };
    check("tiny-gpt2", WeightDType::Q8_0, max_rel, 0);
    check("tiny-gpt2-zh", WeightDType::Q8_0, max_rel, 0);
}

/// f32 weights keep an f32 cache; f16/bf16 halve it (on the CPU an f16 cache beside f32
/// activations, elsewhere the activations' dtype); q8_0 has an f16 cache on the CPU, f32 off it.
#[test]
fn cache_dtype_follows_the_weights_and_device() {
    let f32 = load("tiny-gpt2");
    assert_eq!(f32.gpt2().cache_dtype(), DType::F32);
    let f32 = f32.info().cache_bytes_per_token;
    for dtype in [WeightDType::F16, WeightDType::Bf16] {
        let half = load_as("tiny-gpt2", dtype).info().cache_bytes_per_token;
        assert_eq!(half, f32 / 2, "{dtype:?}");
    }
    let q8 = load_as("tiny-gpt2", WeightDType::Q8_0);
    assert_eq!(q8.info().cache_bytes_per_token, if on_cpu() { f32 / 2 } else { f32 }, "q8_0");
    if on_cpu() {
        assert_eq!(q8.gpt2().cache_dtype(), DType::F16);
    }
}
