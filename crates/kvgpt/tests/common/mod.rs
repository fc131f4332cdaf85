//! Shared by the integration tests: fixture paths and reference readers.
#![allow(dead_code)]

use candle_core::{Device, Tensor};
use kvgpt::{GenerateOptions, Generation, LoadOptions, Model};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../test/fixtures").join(name)
}

pub fn load(name: &str) -> Model {
    Model::load(fixture(name).to_str().unwrap(), &LoadOptions::default()).unwrap()
}

pub fn reference_json(name: &str) -> serde_json::Value {
    let text = std::fs::read_to_string(fixture(name).join("reference.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

pub fn reference_logits(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture(name).join("reference.safetensors"), &Device::Cpu).unwrap()
}

pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

pub fn greedy(max_new_tokens: usize, use_cache: bool) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: Default::default(),
        stop: vec![],
        ignore_eos: true,
        use_cache,
    }
}

pub fn run(model: &Model, prompt: &[u32], opts: &GenerateOptions) -> Generation {
    model.generate(prompt, opts, &AtomicBool::new(false), &mut |_| {}).unwrap()
}
